"""``tether rlaif label``: preference data from an AI judge (RLAIF; Bai et al. 2022, Lee et al. 2023).

1. sample ``samples`` responses a prompt from the policy (as the ``sampling`` group says: temperature
   sampling by default; top-k / top-p and stop strings if asked; seeded) and pair
   them consecutively (1st with 2nd, 3rd with 4th, ...); a pair of identical responses, or one
   with an empty side, carries no preference and is left out (counted);
2. sample a principle of the constitution for each pair (seeded; P(i) ∝ weight);
3. ask the judge in both orders (tether.rlaif.judge): P(a ≻ b) = ½ [P_A(x, a, b) + 1 − P_A(x, b, a)];
4. write the pair in tether's preference format, the judge's favourite as ``chosen``, with

       label_prob      P(chosen ≻ rejected) ≥ ½: the soft label (``tether rm --label-field label_prob``)
       judge           which judge (a folder, a hub name, or url + model; never a key)
       principle       the id of the principle asked
       order_results   {"chosen_first": P(chosen picked | shown as A), "chosen_second": P(chosen picked | shown as B)}
       position_flip   whether the two orders picked differently

   plus the prompt row's own extra fields (e.g. the gold world's ``family``), and with ``--gold``
   the gold world's reward of both sides (``gold_chosen``, ``gold_rejected``), so that an RM
   trained on the file reports agreement with the truth.

A summary (counts, mean soft label, flip rate, principles asked, the constitution's fingerprint,
agreement with gold where known) is written beside the file as ``<name>.summary.json``.

Under torchrun (``torchrun --nproc_per_node K -m tether rlaif label ...``) each rank samples a block
of whole generation batches of the prompts × samples rows (``--gen-batch-size``; every chunk seeded
from (seed, its global position), as in one process) and the responses are gathered in order
(tether.instruments.shard). A local judge's scoring splits its texts over ranks itself
(tether.scoring); with ``--url`` each rank sends its own block of whole batches of pairs
(``--batch-size``) and the judgements are gathered. Rank 0 alone writes the file and its summary:
the pairs of one process, their probabilities equal to float rounding.
"""

from __future__ import annotations

import logging
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from tether import distributed
from tether.config import SEED_MAX, check, group, opt, to_dict
from tether.data import load_prompts
from tether.errors import ConfigError
from tether.io import write_json, write_jsonl
from tether.rlaif.constitution import load_constitution
from tether.rlaif.http import ENDPOINTS, HTTPClient, HTTPGenerator, HTTPJudge
from tether.rlaif.judge import LMJudge, judge_pairs, order_stats
from tether.rollout import SamplingConfig

log = logging.getLogger("tether.rlaif")


@dataclass
class HTTPOptions:
    """An OpenAI-compatible endpoint (used instead of a local model when ``url`` is set)."""

    url: str = field(default="", metadata={"help": "base URL of an OpenAI-compatible API, e.g. http://127.0.0.1:8000/v1"})
    url_model: str = field(default="", metadata={"help": "the model name to ask for at that endpoint"})
    endpoint: str = field(default="chat", metadata={"help": "chat (/chat/completions) | completions (/completions)"})
    api_key_env: str = field(default="", metadata={"help": "name of the environment variable holding the API key "
                                                           "(the key is never logged or saved)"})
    retries: int = field(default=5, metadata={"help": "retries of a failed request (exponential backoff)"})
    backoff: float = field(default=1.0, metadata={"help": "seconds before the first retry; doubles each retry"})
    timeout: float = field(default=60.0, metadata={"help": "seconds to wait for one reply"})
    top_logprobs: int = field(default=5, metadata={"help": "log-probs asked for per reply (judge only)"})

    def validate(self) -> None:
        if self.url and not self.url_model:
            raise ConfigError("--url needs --url-model (the model name the endpoint serves)")
        if self.endpoint not in ENDPOINTS:
            raise ConfigError(f"endpoint must be one of {ENDPOINTS}, got {self.endpoint!r}")
        check("retries", self.retries, ge=0, integer=True)
        check("backoff", self.backoff, ge=0)
        check("timeout", self.timeout, gt=0)
        check("top_logprobs", self.top_logprobs, ge=1, le=20, integer=True)

    def client(self) -> HTTPClient:
        return HTTPClient(self.url, api_key_env=self.api_key_env, timeout=self.timeout, retries=self.retries,
                          backoff=self.backoff)


def make_judge(local: str, http: HTTPOptions, *, max_len: int | None = None, batch_size: int = 32):
    """A local-model judge (``local``: a folder or hub name) or an HTTP judge (``http.url``); exactly one."""
    if bool(local) == bool(http.url):
        raise ValueError("give exactly one judge: --judge (a local folder or hub name) or --url (an HTTP endpoint)")
    if local:
        return LMJudge(local, max_len=max_len, batch_size=batch_size)
    return HTTPJudge(http.client(), http.url_model, endpoint=http.endpoint, top_logprobs=http.top_logprobs)


def make_generator(local: str, http: HTTPOptions, *, max_new_tokens: int, temperature: float, seed: int,
                   gen_batch_size: int = 32):
    """``generate(prompts) -> texts`` from a local model or an HTTP endpoint; exactly one."""
    if bool(local) == bool(http.url):
        raise ValueError("give exactly one writer: --model (a local folder or hub name) or --url (an HTTP endpoint)")
    if http.url:
        return HTTPGenerator(http.client(), http.url_model, endpoint=http.endpoint, max_tokens=max_new_tokens,
                             temperature=temperature)
    sampling = SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature, gen_batch_size=gen_batch_size)
    return LocalGenerator(local, sampling=sampling, seed=seed)


class LocalGenerator:
    """Continuations from a local causal LM, sampled as ``sampling`` says (greedy at temperature 0)."""

    def __init__(self, path: str, *, sampling: SamplingConfig, seed: int):
        from tether.generation import make_backend
        from tether.models import load_model, load_tokenizer

        self.model, self.tokenizer = load_model(path).eval(), load_tokenizer(path)
        self.backend = make_backend(sampling.backend, self.model, self.tokenizer, model_path=path)
        self.name, self.sampling, self.seed = f"lm:{path}", sampling, seed
        self.calls = 0

    def generate(self, prompts: list[str]) -> list[str]:
        from tether.generation import sample_as

        self.calls += 1  # a fresh seed each call, the sequence of calls fixed by ``seed``
        pairs = sample_as(self.backend, self.tokenizer, prompts, self.sampling, seed=self.seed * 1000 + self.calls,
                          greedy=self.sampling.temperature == 0)
        return self.tokenizer.batch_decode([response for _, response in pairs], skip_special_tokens=True)


def _rlaif_sampling() -> SamplingConfig:
    return SamplingConfig(gen_batch_size=32)  # the batch RLAIF always sampled in: the same seed, the same samples


@dataclass
class LabelConfig:
    policy: str = opt("", "policy that writes the responses: an SFT folder, a local path or a hub name")
    prompts: str = opt("", "prompts to sample on (a file or dataset with a prompt field)")
    out: str = opt("runs/rlaif/labels.jsonl", "preference file to write (a summary goes beside it)")
    judge: str = opt("", "judge: a causal LM folder or hub name (or use --url for an HTTP judge)")
    constitution: str = opt("default", "constitution file (YAML), or 'default'")
    principles: str = opt("", "comma-separated principle ids to use (empty: every principle of the constitution)")
    samples: int = opt(2, "responses sampled per prompt, paired consecutively (even, at least 2)")
    limit: int = opt(0, "use at most this many prompts (0: all)")
    min_confidence: float = opt(0.0, "leave out pairs with |P(a ≻ b) − ½| below this (0: keep every pair)")
    judge_max_len: int = opt(0, "longest judge prompt in tokens for a local judge (0: the model's own limit)")
    gold: bool = opt(False, "add the gold world's reward of both sides (gold_chosen, gold_rejected)")
    batch_size: int = opt(32, "pairs judged per batch")
    seed: int = opt(0, "seed of sampling and of the principles drawn")
    overwrite: bool = opt(False, "replace an existing output file")
    sampling: SamplingConfig = group(_rlaif_sampling, "how the policy's responses are sampled")
    http: HTTPOptions = group(HTTPOptions)

    def validate(self) -> None:
        if not self.policy or not self.prompts:
            raise ConfigError("--policy and --prompts are required")
        if bool(self.judge) == bool(self.http.url):
            raise ConfigError("give exactly one judge: --judge (a local folder or hub name) or --url (an HTTP endpoint)")
        if not isinstance(self.samples, int) or self.samples < 2 or self.samples % 2:
            raise ConfigError(f"--samples must be an even number of at least 2, got {self.samples}")
        check("batch_size", self.batch_size, ge=1, integer=True)
        self.sampling.validate()
        check("limit", self.limit, ge=0, integer=True, note="0: all")
        check("min_confidence", self.min_confidence, ge=0, lt=0.5)
        check("judge_max_len", self.judge_max_len, ge=0, integer=True, note="0: the model's own limit")
        check("seed", self.seed, ge=0, le=SEED_MAX, integer=True)
        self.http.validate()


def sample_pairs(policy_path: str, rows: list, *, samples: int, sampling: SamplingConfig,
                 seed: int) -> tuple[list[tuple[int, str, str]], Counter]:
    """(prompt row index, a, b) pairs of the policy's samples, and counts of pairs left out.

    Under torchrun each rank samples a block of whole generation batches, gathered on every rank (module doc)."""
    from tether.generation import make_backend, sample_as
    from tether.instruments.shard import AtPosition, map_blocks
    from tether.models import load_model, load_tokenizer

    policy, tokenizer = load_model(policy_path).eval(), load_tokenizer(policy_path)
    backend = make_backend(sampling.backend, policy, tokenizer, model_path=policy_path)
    prompts = [r.prompt for r in rows for _ in range(samples)]  # sample k of row i at i·samples + k

    def draw(part: list[str], lo: int) -> list[str]:  # this rank's rows, from global row lo on
        pairs = sample_as(AtPosition(backend, lo), tokenizer, part, sampling, seed=seed)
        return tokenizer.batch_decode([response for _, response in pairs], skip_special_tokens=True)

    responses = map_blocks(draw, prompts, sampling.gen_batch_size)
    pairs, left_out = [], Counter()
    for i in range(len(rows)):
        for k in range(0, samples, 2):
            a, b = responses[i * samples + k], responses[i * samples + k + 1]
            if a == b:
                left_out["identical"] += 1
            elif not a.strip() or not b.strip():
                left_out["empty"] += 1
            else:
                pairs.append((i, a, b))
    return pairs, left_out


def run_label(cfg: LabelConfig) -> Path:
    """Sample, judge and write the preference file (module doc); returns its path."""
    from tether.instruments.shard import map_blocks

    cfg.validate()
    main = distributed.env().main
    out = Path(cfg.out)
    if out.exists() and not cfg.overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite to replace it, or choose another --out")
    constitution = load_constitution(cfg.constitution)
    if cfg.principles:
        constitution = constitution.only([p.strip() for p in cfg.principles.split(",") if p.strip()])
    rows = load_prompts(cfg.prompts, limit=cfg.limit or None)
    if not rows:
        raise ValueError(f"{cfg.prompts}: no prompts")
    judge = make_judge(cfg.judge, cfg.http, max_len=cfg.judge_max_len or None, batch_size=cfg.batch_size)

    pairs, left_out = sample_pairs(cfg.policy, rows, samples=cfg.samples, sampling=cfg.sampling, seed=cfg.seed)
    rng = random.Random(cfg.seed)
    principles = [constitution.sample(rng) for _ in pairs]

    def judge_block(part: list, lo: int) -> list:  # pairs from global pair lo on, in whole batches
        judged = []
        with tqdm(total=len(part), desc="rlaif label", unit="pair", disable=not main) as bar:
            for s in range(0, len(part), cfg.batch_size):
                chunk = part[s : s + cfg.batch_size]
                judged += judge_pairs(judge, [rows[i].prompt for i, _, _ in chunk], [a for _, a, _ in chunk],
                                      [b for _, _, b in chunk], principles[lo + s : lo + s + cfg.batch_size])
                bar.update(len(chunk))
        return judged

    if isinstance(judge, LMJudge):  # every rank asks for every pair: its scoring splits the texts over ranks itself
        judgements = judge_block(pairs, 0)
    else:  # an endpoint: each rank sends its own block of pairs, the judgements gathered in order
        judgements = map_blocks(judge_block, pairs, cfg.batch_size)
    if not main:  # every rank has joined the collectives; rank 0 writes
        distributed.barrier()
        return out

    out_rows = []
    for (i, a, b), j in zip(pairs, judgements):
        if abs(j.prob - 0.5) < cfg.min_confidence:
            left_out["unconfident"] += 1
            continue
        a_wins = j.prob >= 0.5
        chosen, rejected = (a, b) if a_wins else (b, a)
        row = {"prompt": rows[i].prompt, "chosen": chosen, "rejected": rejected,
               "label_prob": j.prob if a_wins else 1.0 - j.prob, "judge": judge.name, "principle": j.principle,
               "order_results": {"chosen_first": j.p_a_first if a_wins else 1.0 - j.p_a_second,
                                 "chosen_second": j.p_a_second if a_wins else 1.0 - j.p_a_first},
               "position_flip": j.flip}
        row.update({k: v for k, v in rows[i].extra.items() if k not in row})
        if cfg.gold:
            from tether.world import gold_reward

            row["gold_chosen"], row["gold_rejected"] = gold_reward(row["prompt"], chosen), gold_reward(row["prompt"], rejected)
        out_rows.append(row)
    write_jsonl(out, out_rows)

    stats = order_stats(judgements)
    summary = {"file": str(out), "pairs": len(out_rows), "prompts": len(rows), "left_out": dict(left_out),
               "judge": judge.name, "constitution": {"source": constitution.source or cfg.constitution,
                                                     "fingerprint": constitution.fingerprint(),
                                                     "principles": [p.id for p in constitution.principles]},
               "principles_asked": dict(Counter(r["principle"] for r in out_rows)),
               "mean_label_prob": sum(r["label_prob"] for r in out_rows) / max(len(out_rows), 1),
               "flip_rate": stats.flip_rate, "first_bias": stats.first_bias,
               "config": {k: v for k, v in to_dict(cfg).items()}}
    if getattr(judge, "truncated", 0):
        summary["judge_prompts_truncated"] = judge.truncated
    if cfg.gold:
        decided = [r for r in out_rows if r["gold_chosen"] != r["gold_rejected"]]
        summary["gold_agreement"] = (sum(r["gold_chosen"] > r["gold_rejected"] for r in decided) / len(decided)
                                     if decided else float("nan"))
        summary["gold_pairs"] = len(decided)
    write_json(out.with_name(out.name.removesuffix(".jsonl") + ".summary.json"), summary)
    log.info("%d labelled pairs in %s (left out: %s); flip rate %.3f", len(out_rows), out, dict(left_out), stats.flip_rate)
    distributed.barrier()
    return out
