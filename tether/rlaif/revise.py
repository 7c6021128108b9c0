"""``tether rlaif revise``: the supervised stage of Constitutional AI (Bai et al. 2022, Sec. 3).

For each prompt: the policy writes a response (sampled as the ``sampling`` group says; greedy at
``--temperature 0``); then, ``rounds`` times, a principle is sampled (seeded) and the reviser (a
local causal LM, by default the policy itself as in the paper, or an OpenAI-compatible endpoint)
is asked for a critique and then a revision, in the paper's format:

    <conversation> <response>

    Critique request: <the principle's critique request>

    Critique: <the reviser writes this>

    Revision request: <the principle's revision request>

    Revision: <the reviser writes this; it becomes the response of the next round>

The final revision becomes the SFT target: rows {"prompt", "completion"} plus provenance
(``original``, ``critiques``, ``principles``, ``reviser``), readable by ``tether sft``. A revision
that comes back empty ends that prompt's chain and the row is left out (counted in the summary,
``<name>.summary.json`` beside the file). Principles without critique and revision requests are
not used here.
"""

from __future__ import annotations

import logging
import random
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

from tqdm.auto import tqdm

from tether.config import SEED_MAX, check, check_fields, group, opt, to_dict
from tether.data import load_prompts
from tether.errors import ConfigError
from tether.io import write_json, write_jsonl
from tether.rlaif.constitution import Constitution, load_constitution
from tether.rlaif.label import HTTPOptions, LocalGenerator, make_generator
from tether.rollout import SamplingConfig

log = logging.getLogger("tether.rlaif")


def critique_prompt(prompt: str, response: str, critique_request: str) -> str:
    """The critique request after the conversation and response; the reviser continues after "Critique:"."""
    return f"{prompt.rstrip()} {response.strip()}\n\nCritique request: {critique_request.strip()}\n\nCritique:"


def revision_prompt(prompt: str, response: str, critique_request: str, critique: str, revision_request: str) -> str:
    """The critique prompt, the critique, and the revision request; the reviser continues after "Revision:"."""
    return (f"{critique_prompt(prompt, response, critique_request)} {critique.strip()}\n\n"
            f"Revision request: {revision_request.strip()}\n\nRevision:")


def _revise_sampling() -> SamplingConfig:
    return SamplingConfig(max_new_tokens=64, gen_batch_size=32)


@dataclass
class ReviseConfig:
    policy: str = opt("", "policy that writes the first responses: a folder, local path or hub name")
    prompts: str = opt("", "prompts (a file or dataset with a prompt field), e.g. red-team requests")
    out: str = opt("runs/rlaif/revisions.jsonl", "SFT file to write (a summary goes beside it)")
    model: str = opt("", "reviser: a causal LM folder or hub name (empty with no --url: the policy itself)")
    constitution: str = opt("default", "constitution file (YAML), or 'default'")
    principles: str = opt("", "comma-separated principle ids to use (empty: every one with critique and revision)")
    rounds: int = opt(1, "critique-then-revise rounds per response, a principle sampled each round")
    reviser_temperature: float = opt(0.0, "temperature of critiques and revisions (0: greedy); their length is "
                                          "--max-new-tokens, and --temperature 0 makes the first responses greedy")
    limit: int = opt(0, "use at most this many prompts (0: all)")
    batch_size: int = opt(32, "prompts per batch")
    seed: int = opt(0, "seed of sampling and of the principles drawn")
    overwrite: bool = opt(False, "replace an existing output file")
    sampling: SamplingConfig = group(_revise_sampling, "how the first responses are sampled (top-k, top-p and stop "
                                                       "strings apply to them only; max_new_tokens to every text)")
    http: HTTPOptions = group(HTTPOptions)

    def validate(self) -> None:
        if not self.policy or not self.prompts:
            raise ConfigError("--policy and --prompts are required")
        if self.model and self.http.url:
            raise ConfigError("give one reviser: --model or --url, not both")
        check_fields(self, "rounds batch_size", ge=1, integer=True)
        check("temperature", self.sampling.temperature, ge=0, note="0: greedy")
        check("reviser_temperature", self.reviser_temperature, ge=0, note="0: greedy")
        replace(self.sampling, temperature=self.sampling.temperature or 1.0).validate()  # the rest; 0 is greedy here
        check("limit", self.limit, ge=0, integer=True, note="0: all")
        check("seed", self.seed, ge=0, le=SEED_MAX, integer=True)
        self.http.validate()


def revisable(constitution: Constitution, ids: str) -> Constitution:
    """The principles that have both a critique and a revision request (restricted to ``ids`` if given)."""
    if ids:
        constitution = constitution.only([p.strip() for p in ids.split(",") if p.strip()])
    kept = tuple(p for p in constitution.principles if p.critique and p.revision)
    if not kept:
        raise ValueError(f"{constitution.source or 'the constitution'}: no principle has both 'critique' and "
                         "'revision', which revise needs")
    return Constitution(kept, constitution.name, constitution.description, constitution.source)


def critique_and_revise(reviser, prompts: list[str], responses: list[str], constitution: Constitution,
                        rng: random.Random, rounds: int) -> list[dict]:
    """Run ``rounds`` critique → revision steps on each (prompt, response); returns one record each:
    {"revision", "critiques", "principles"}; "revision" is "" where a revision came back empty."""
    records = [{"revision": r, "critiques": [], "principles": []} for r in responses]
    for _ in range(rounds):
        live = [i for i, rec in enumerate(records) if rec["revision"].strip()]
        if not live:
            break
        chosen = {i: constitution.sample(rng) for i in live}
        critiques = reviser.generate([critique_prompt(prompts[i], records[i]["revision"], chosen[i].critique) for i in live])
        revisions = reviser.generate([revision_prompt(prompts[i], records[i]["revision"], chosen[i].critique, c,
                                                      chosen[i].revision) for i, c in zip(live, critiques)])
        for i, c, r in zip(live, critiques, revisions):
            records[i]["critiques"].append(c.strip())
            records[i]["principles"].append(chosen[i].id)
            records[i]["revision"] = " " + r.strip() if r.strip() else ""
    return records


def run_revise(cfg: ReviseConfig) -> Path:
    """Sample, critique, revise and write the SFT file (module doc); returns its path."""
    cfg.validate()
    out = Path(cfg.out)
    if out.exists() and not cfg.overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite to replace it, or choose another --out")
    constitution = revisable(load_constitution(cfg.constitution), cfg.principles)
    rows = load_prompts(cfg.prompts, limit=cfg.limit or None)
    if not rows:
        raise ValueError(f"{cfg.prompts}: no prompts")
    policy = LocalGenerator(cfg.policy, sampling=cfg.sampling, seed=cfg.seed)
    reviser = make_generator(cfg.model or ("" if cfg.http.url else cfg.policy), cfg.http,
                             max_new_tokens=cfg.sampling.max_new_tokens, temperature=cfg.reviser_temperature,
                             seed=cfg.seed + 1, gen_batch_size=cfg.sampling.gen_batch_size)
    rng = random.Random(cfg.seed)
    out_rows, left_out = [], Counter()
    for s in tqdm(range(0, len(rows), cfg.batch_size), desc="rlaif revise", unit="batch"):
        batch = rows[s : s + cfg.batch_size]
        prompts = [r.prompt for r in batch]
        originals = policy.generate(prompts)
        for row, original, rec in zip(batch, originals, critique_and_revise(reviser, prompts, originals, constitution,
                                                                           rng, cfg.rounds)):
            if not rec["revision"].strip():
                left_out["empty_original" if not original.strip() else "empty_revision"] += 1
                continue
            out_row = {"prompt": row.prompt, "completion": rec["revision"], "original": original,
                       "critiques": rec["critiques"], "principles": rec["principles"], "reviser": reviser.name}
            out_row.update({k: v for k, v in row.extra.items() if k not in out_row})
            out_rows.append(out_row)
    write_jsonl(out, out_rows)
    summary = {"file": str(out), "rows": len(out_rows), "prompts": len(rows), "left_out": dict(left_out),
               "reviser": reviser.name, "policy": policy.name,
               "constitution": {"source": constitution.source or cfg.constitution, "fingerprint": constitution.fingerprint(),
                                "principles": [p.id for p in constitution.principles]},
               "changed": sum(r["completion"].strip() != r["original"].strip() for r in out_rows),
               "config": to_dict(cfg)}
    write_json(out.with_name(out.name.removesuffix(".jsonl") + ".summary.json"), summary)
    log.info("%d revisions in %s (left out: %s)", len(out_rows), out, dict(left_out))
    return out
