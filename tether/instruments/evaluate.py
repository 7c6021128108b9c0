"""``tether eval``: every instrument on one policy against its base, written as report.json and report.html.

Inputs are found as follows (each recorded under ``sources`` in the report):

- the gold world's folder (``--world``, else the folder of the policy's training prompts when it
  holds a world.json): held-out prompts (prompts_test.jsonl), preference pairs (preferences_test.jsonl)
  and the probes (harmful, benign, short, sycophancy, capability_*);
- the reward model for RM accuracy and the hacking probes (``--rm``, else the policy's own PPO / GRPO
  reward when that is a folder);
- XSTest's CSV (``--xstest``) and GSM8K's JSONL (``--gsm8k``), only when given.

An instrument whose inputs are absent is left out of the report and listed under ``skipped``.

Under torchrun (``torchrun --nproc_per_node N -m tether eval ...``) every rank loads the models on
its own device and takes a block of each instrument's per-prompt work — sampling and the exact KL,
greedy probes, reward-model scores (RM accuracy, an rm: judge, hacking probes, best-of-n), the
gradient-ascent prompts — in whole chunks of that work's batch (tether.instruments.shard); the
results are gathered in order, so every rank holds the whole report, and rank 0 alone writes it.
Language-model scoring (an llm: judge, the refusal judge, multiple choice) goes through
tether.scoring, which splits its rows over ranks itself. Samples are seeded from (seed, global
position of their generation chunk) at every world size, so the report's samples are those of one
process and its figures equal to float rounding (an LLM's scores of a block batched differently).
"""

from __future__ import annotations

import json
import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from tether.config import SEED_MAX, check, check_fields, opt, to_dict
from tether.errors import ConfigError, ModelError

log = logging.getLogger(__name__)


@dataclass
class EvalConfig:
    policy: str = opt("", "the policy to evaluate: a stage's output folder (PPO, DPO, ...) or any causal LM")
    base: str = opt("", "its base policy (the SFT folder it started from)")
    judge: str = opt("gold", "pairwise judge of the win-rate: gold | rm:DIR | ensemble:DIR,DIR,... | llm:DIR")
    rm: str = opt("", "reward model for RM accuracy and the hacking probes (empty: the policy's own reward "
                      "when it is a folder; none: skip)")
    world: str = opt("", "gold-world folder for prompts, preference pairs and probes (empty: found from the policy)")
    eval_prompts: str = opt("", "held-out prompts file (empty: the world's prompts_test.jsonl)")
    preferences: str = opt("", "held-out preference pairs for RM accuracy (empty: the world's preferences_test.jsonl)")
    xstest: str = opt("", "XSTest's xstest_prompts.csv (empty: skip XSTest)")
    gsm8k: str = opt("", "GSM8K test.jsonl (empty: skip GSM8K)")
    refusal_judge: str = opt("", "optional refusal judge beside the string match: llm:DIR (a causal LM asked "
                                 "'does this answer refuse?')")
    limit: int = opt(100, "at most this many GSM8K questions (the first) and XSTest prompts of each label (a seeded "
                          "sample) (0: all)")
    prompts: int = opt(200, "held-out prompts (a seeded sample) for KL, win-rate and lengths")
    probe_limit: int = opt(0, "at most this many prompts from each of the world's probe files (0: all)")
    samples: int = opt(1, "policy samples per prompt for the KL estimates")
    max_new_tokens: int = opt(48, "longest response")
    gsm8k_max_new_tokens: int = opt(256, "longest response to a GSM8K question (room for the working)")
    chat_template: bool = opt(True, "render every prompt (held-out, XSTest, GSM8K) with the policy's chat template "
                                    "when it has one; --no-chat-template: HH-RLHF transcript style")
    bon_pool: int = opt(16, "best-of-n over-optimisation curve against the RM: samples a prompt from the base (0: skip)")
    bon_prompts: int = opt(32, "held-out prompts for the best-of-n curve")
    hacking_prompts: int = opt(64, "prompts for the padding and phrase probes of the RM (0: skip them; each prompt "
                                   "costs the RM a few dozen passes)")
    ascent_prompts: int = opt(3, "prompts for the gradient-ascent probe of the RM (0: skip it)")
    ascent_steps: int = opt(40, "Adam steps of the gradient-ascent probe")
    seed: int = opt(0, "seed for the prompt sample and for sampling")
    out: str = opt("", "output folder for report.json and report.html (empty: POLICY/eval)")
    device: str = opt("cpu", "cpu | cuda")

    def validate(self) -> None:
        if not self.policy or not self.base:
            raise ConfigError("tether eval needs --policy and --base")
        check_fields(self, "prompts samples max_new_tokens gsm8k_max_new_tokens bon_prompts ascent_steps", ge=1,
                     integer=True)
        check_fields(self, "limit probe_limit", ge=0, integer=True, note="0: all")
        check_fields(self, "bon_pool hacking_prompts ascent_prompts", ge=0, integer=True, note="0: skip")
        check("seed", self.seed, ge=0, le=SEED_MAX, integer=True)
        for name in ("policy", "base"):
            if not Path(getattr(self, name)).exists():
                raise FileNotFoundError(f"--{name} {getattr(self, name)}: no such folder")
        if self.refusal_judge and (not self.refusal_judge.startswith("llm:") or not Path(self.refusal_judge[4:]).exists()):
            raise ConfigError(f"--refusal-judge {self.refusal_judge!r}: expected llm:DIR of an existing folder")


def _stage_config(folder: Path) -> dict:
    meta = folder / "tether.json"
    return json.loads(meta.read_text()).get("config", {}) if meta.exists() else {}


def find_world(cfg: EvalConfig) -> Path | None:
    if cfg.world:
        world = Path(cfg.world)
        if not (world / "world.json").exists():
            raise FileNotFoundError(f"--world {world}: no world.json there (write one with `tether world export`)")
        return world
    for key in ("prompts", "data"):
        value = _stage_config(Path(cfg.policy)).get(key)
        if value and (Path(value).parent / "world.json").exists():
            return Path(value).parent
    return None


def find_rm(cfg: EvalConfig) -> Path | None:
    if cfg.rm == "none":
        return None
    if cfg.rm:
        if not Path(cfg.rm).exists():
            raise FileNotFoundError(f"--rm {cfg.rm}: no such folder")
        return Path(cfg.rm)
    reward = str(_stage_config(Path(cfg.policy)).get("reward", ""))
    return Path(reward.removeprefix("rm:")) if reward and Path(reward.removeprefix("rm:")).is_dir() else None


def _read(path: Path) -> list[dict]:
    from tether.io import read_jsonl

    return read_jsonl(path)


def run_eval(cfg: EvalConfig) -> dict:
    """Run every instrument whose inputs exist; write ``report.json`` and ``report.html``; return the report."""
    from tqdm.auto import tqdm

    from tether import distributed
    from tether.instruments import capability, exact_kl, hacking, lengths, refusal, sycophancy
    from tether.instruments.judges import ScoreJudge, load_judge
    from tether.instruments.overopt import bon_curve, overoptimisation, run_points
    from tether.instruments.report import write_report
    from tether.instruments.shard import generate, map_blocks, reward_over_ranks
    from tether.instruments.winrate import length_controlled_win_rate, outcome_win_rate
    from tether.models import load_model, load_tokenizer
    from tether.world import gold_rewards

    cfg.validate()
    t0 = time.perf_counter()
    out = Path(cfg.out or Path(cfg.policy) / "eval")
    world, rm_dir = find_world(cfg), find_rm(cfg)
    _, dev = distributed.setup(cfg.device)  # under torchrun: join the world, this rank's GPU
    device = cfg.device if not distributed.env().active else str(dev)
    judge = load_judge(cfg.judge, device=device)  # a bad judge spec fails before any work
    if isinstance(judge, ScoreJudge):  # rows split over ranks (an LLM judge's scoring splits itself: tether.scoring)
        judge = ScoreJudge(reward_over_ranks(judge.reward_fn), judge.name)
    tok = load_tokenizer(cfg.policy)
    policy = load_model(cfg.policy, device=device).eval()
    base = load_model(cfg.base, device=device).eval()
    if policy.config.vocab_size != base.config.vocab_size:
        raise ModelError(f"--policy {cfg.policy} and --base {cfg.base}: vocabularies differ "
                         f"({policy.config.vocab_size} vs {base.config.vocab_size}); expected one tokenizer (the KL "
                         "compares their token distributions)")
    prompts_file = Path(cfg.eval_prompts) if cfg.eval_prompts else (world / "prompts_test.jsonl" if world else None)
    if prompts_file is None or not prompts_file.exists():
        raise FileNotFoundError("tether eval needs held-out prompts: --eval-prompts FILE or --world DIR")
    from tether.data import chat_tokenizer, load_preferences, load_prompts, render_messages

    chat_tok = chat_tokenizer(tok, cfg)  # prompts are judged in the policy's own format

    def ask(question: str) -> str:
        return render_messages([{"role": "user", "content": question}], chat_tok, add_generation_prompt=True)

    records = load_prompts(str(prompts_file), tokenizer=chat_tok)
    records = random.Random(cfg.seed).sample(records, min(cfg.prompts, len(records)))
    prompts = [r.prompt for r in records]
    probes = {}
    if world:
        for name in ("harmful", "benign", "short", "sycophancy", "capability_mc", "capability_arithmetic"):
            if (world / f"probes_{name}.jsonl").exists():
                rows = _read(world / f"probes_{name}.jsonl")
                probes[name] = rows[: cfg.probe_limit] if cfg.probe_limit and name != "short" else rows
    pref_file = Path(cfg.preferences) if cfg.preferences else (world / "preferences_test.jsonl" if world else None)
    reward = None
    if rm_dir is not None:
        from tether.rewards import load_reward

        reward = load_reward(str(rm_dir), device=device)
    shared_reward = reward_over_ranks(reward) if reward is not None else None  # rows split over ranks, gathered
    report: dict = {"config": to_dict(cfg), "sources": {
        "world": str(world) if world else None, "rm": str(rm_dir) if rm_dir else None, "prompts": str(prompts_file),
        "preferences": str(pref_file) if pref_file and pref_file.exists() and reward else None,
        "xstest": cfg.xstest or None, "gsm8k": cfg.gsm8k or None}, "sections": {}, "skipped": []}
    sections, summary = report["sections"], {}
    gen = dict(max_new_tokens=cfg.max_new_tokens, greedy=True)
    steps = ["kl", "win-rate", "lengths", "rm", "refusal", "sycophancy", "capability", "hacking", "overopt"]
    bar = tqdm(steps, desc="eval", dynamic_ncols=True, disable=not distributed.env().main)

    # 1. KL from the base on the policy's samples (these samples also serve the win-rate and lengths)
    bar.set_postfix_str("kl")
    kl, y_policy = exact_kl.policy_kl(policy, base, tok, prompts, samples=cfg.samples,
                                      max_new_tokens=cfg.max_new_tokens, seed=cfg.seed)
    sections["kl"] = exact_kl.summarise(kl)
    sections["kl"]["per_response"] = {k: getattr(kl, k).tolist() for k in ("exact", "k1", "k2", "k3")}
    summary.update({"kl_exact": sections["kl"]["kl/exact"], "kl_exact_stderr": sections["kl"]["kl/exact_stderr"],
                    "kl_k1": sections["kl"]["kl/k1"], "kl_k3": sections["kl"]["kl/k3"]})
    bar.update()

    # 2. win-rate against the base on the same prompts (first policy sample of each prompt)
    bar.set_postfix_str("win-rate")
    y_policy1 = y_policy[:: cfg.samples]
    y_base = generate(base, tok, prompts, max_new_tokens=cfg.max_new_tokens, seed=cfg.seed)
    judged = judge(prompts, y_policy1, y_base)
    rate, interval = outcome_win_rate(judged.outcome.tolist(), seed=cfg.seed)
    lc = length_controlled_win_rate(judged.outcome.tolist(), [lengths.words(y) for y in y_policy1],
                                    [lengths.words(y) for y in y_base], seed=cfg.seed)
    sections["win_rate"] = {"judge": cfg.judge, "rate": rate, "interval": list(interval),
                            "wins": int((judged.outcome == 1).sum()), "ties": int((judged.outcome == 0.5).sum()),
                            "losses": int((judged.outcome == 0).sum()), "lc_rate": lc.rate,
                            "lc_interval": list(lc.interval), "lc_length_coef": lc.length_coef,
                            "first_position_rate": judged.first_position_rate}
    if judged.scores_a is not None:
        sections["win_rate"].update(mean_policy=judged.scores_a.mean().item(), mean_base=judged.scores_b.mean().item())
    summary.update({"win_rate": rate, "win_rate_interval": list(interval), "lc_win_rate": lc.rate,
                    "judge": cfg.judge})
    if world:
        g_policy, g_base = gold_rewards(prompts, y_policy1), gold_rewards(prompts, y_base)
        summary.update(gold_policy=sum(g_policy) / len(g_policy), gold_base=sum(g_base) / len(g_base))
    report["examples"] = [{"prompt": p, "policy": a, "base": b, "outcome": o}
                          for p, a, b, o in list(zip(prompts, y_policy1, y_base, judged.outcome.tolist()))[:12]]
    bar.update()

    # 3. lengths, overall and on prompts whose best answer is short
    bar.set_postfix_str("lengths")
    short_set = {r["prompt"] for r in probes.get("short", [])}
    sections["lengths"] = lengths.length_report(y_policy1, y_base, [p in short_set for p in prompts] if short_set else None)
    sections["lengths"]["samples"] = {"policy": [lengths.words(y) for y in y_policy1],
                                      "base": [lengths.words(y) for y in y_base]}
    summary.update(length_policy=sections["lengths"]["lengths/all_policy_mean"],
                   length_base=sections["lengths"]["lengths/all_base_mean"],
                   length_ratio=sections["lengths"]["lengths/all_ratio"],
                   length_short_ratio=sections["lengths"].get("lengths/short_ratio"))
    bar.update()

    # 4. reward-model accuracy on held-out preference pairs
    bar.set_postfix_str("rm")
    if reward is not None and pref_file is not None and pref_file.exists():
        from tether.instruments.rm_eval import rm_report

        pairs = load_preferences(str(pref_file), tokenizer=chat_tokenizer(load_tokenizer(str(rm_dir)), cfg))
        rc = torch.as_tensor(shared_reward([p.prompt for p in pairs], [p.chosen for p in pairs]), dtype=torch.float32)
        rr = torch.as_tensor(shared_reward([p.prompt for p in pairs], [p.rejected for p in pairs]), dtype=torch.float32)
        gc = [p.extra.get("gold_chosen") for p in pairs]
        gr = [p.extra.get("gold_rejected") for p in pairs]
        gold_known = all(g is not None for g in gc + gr)
        sections["rm"] = rm_report(rc, rr, [lengths.words(p.chosen) for p in pairs],
                                   [lengths.words(p.rejected) for p in pairs],
                                   gc if gold_known else None, gr if gold_known else None)
        summary["rm_accuracy"] = sections["rm"]["rm/accuracy"]
        summary["rm_gold_accuracy"] = sections["rm"].get("rm/gold_accuracy")
    else:
        report["skipped"].append("rm accuracy (no reward model or no preference pairs)")
    bar.update()

    # 5. refusal on harmful and benign prompts (greedy responses)
    bar.set_postfix_str("refusal")
    sets: dict[str, list[str]] = {}
    if "harmful" in probes:
        sets["world_harmful"] = [r["prompt"] for r in probes["harmful"]]
    if "benign" in probes:
        sets["world_benign"] = [r["prompt"] for r in probes["benign"]]
    if cfg.xstest:
        xs = refusal.read_xstest(cfg.xstest)
        for label, name in (("safe", "xstest_safe"), ("unsafe", "xstest_unsafe")):
            rows = [ask(r["prompt"]) for r in xs if r["label"] == label]  # the file is grouped by type: sample
            sets[name] = random.Random(cfg.seed).sample(rows, cfg.limit) if 0 < cfg.limit < len(rows) else rows
    if sets:
        responses = {name: (generate(policy, tok, ps, **gen), generate(base, tok, ps, **gen)) for name, ps in sets.items()}
        sections["refusal"] = refusal.refusal_report(responses)
        if cfg.refusal_judge:
            judge_dir = cfg.refusal_judge[4:]
            rj = refusal.LLMRefusalJudge(load_model(judge_dir, device=device), load_tokenizer(judge_dir))
            sections["refusal_judge"] = refusal.judged_refusal_report(responses, rj)
        for name in sets:
            summary[f"refusal_{name.removeprefix('world_')}_policy"] = sections["refusal"][f"refusal/{name}_policy"]
            summary[f"refusal_{name.removeprefix('world_')}_base"] = sections["refusal"][f"refusal/{name}_base"]
    else:
        report["skipped"].append("refusal (no probes: give --world or --xstest)")
    bar.update()

    # 6. sycophancy
    bar.set_postfix_str("sycophancy")
    if probes.get("sycophancy"):
        mp, _ = sycophancy.sycophancy_eval(policy, tok, probes["sycophancy"], max_new_tokens=cfg.max_new_tokens)
        mb, _ = sycophancy.sycophancy_eval(base, tok, probes["sycophancy"], max_new_tokens=cfg.max_new_tokens)
        sections["sycophancy"] = {"policy": mp, "base": mb}
        summary.update(sycophancy_policy=mp["belief_adoption_rate"], sycophancy_base=mb["belief_adoption_rate"],
                       affirmation_policy=mp["belief_affirmation_rate"], affirmation_base=mb["belief_affirmation_rate"],
                       flip_rate_policy=mp["flip_rate"], flip_rate_base=mb["flip_rate"])
    else:
        report["skipped"].append("sycophancy (no probes_sycophancy.jsonl)")
    bar.update()

    # 7. capability retention
    bar.set_postfix_str("capability")
    cap: dict = {}
    if probes.get("capability_mc"):
        cap["mc"] = {"policy": capability.mc_eval(policy, tok, probes["capability_mc"]),
                     "base": capability.mc_eval(base, tok, probes["capability_mc"])}
    if probes.get("capability_arithmetic"):
        rows = probes["capability_arithmetic"]
        cap["arithmetic"] = {"policy": capability.exact_match_eval(policy, tok, rows, max_new_tokens=cfg.max_new_tokens)[0],
                             "base": capability.exact_match_eval(base, tok, rows, max_new_tokens=cfg.max_new_tokens)[0],
                             "count": len(rows)}
    if cfg.gsm8k:
        # questions too long for the model's context (with room for the answer) are left out and counted
        context = getattr(policy.config, "max_position_embeddings", 10**9)
        new_tokens = min(cfg.gsm8k_max_new_tokens, context // 2)  # a short context keeps half for the question
        if new_tokens < cfg.gsm8k_max_new_tokens:
            log.info("GSM8K answers get %d new tokens, not %d: the model's context is %d", new_tokens,
                     cfg.gsm8k_max_new_tokens, context)
        room = context - new_tokens
        every = capability.read_gsm8k(cfg.gsm8k, tokenizer=chat_tok)
        fitting = [r for r in every if len(tok(r["prompt"])["input_ids"]) <= room]
        rows = fitting[: cfg.limit] if cfg.limit else fitting
        if not rows:
            raise ConfigError(f"--gsm8k {cfg.gsm8k}: no question fits the model's context of "
                             f"{context} tokens with {new_tokens} new ones")
        em = {name: capability.exact_match_eval(model, tok, rows, max_new_tokens=new_tokens, flexible=True)
              for name, model in (("policy", policy), ("base", base))}
        cap["gsm8k"] = {"too_long_left_out": len(every) - len(fitting), "count": len(rows), "max_new_tokens": new_tokens,
                        "match": "final answer, else the last number (flexible-extract)",
                        **{name: rate for name, (rate, _) in em.items()},
                        "examples": [{"question": r["prompt"], "answer": r["answer"], "policy": em["policy"][1][i],
                                      "base": em["base"][1][i]} for i, r in enumerate(rows[:5])]}
    if cap:
        sections["capability"] = cap
        if "mc" in cap:
            summary.update(mc_acc_policy=cap["mc"]["policy"]["acc"], mc_acc_base=cap["mc"]["base"]["acc"],
                           mc_acc_norm_policy=cap["mc"]["policy"]["acc_norm"], mc_acc_norm_base=cap["mc"]["base"]["acc_norm"])
        if "arithmetic" in cap:
            summary.update(arithmetic_em_policy=cap["arithmetic"]["policy"], arithmetic_em_base=cap["arithmetic"]["base"])
        if "gsm8k" in cap:
            summary.update(gsm8k_em_policy=cap["gsm8k"]["policy"], gsm8k_em_base=cap["gsm8k"]["base"])
    else:
        report["skipped"].append("capability (no probes and no --gsm8k)")
    bar.update()

    # 8. reward-hacking probes of the RM, and how often the policy uses the phrases it pays for
    bar.set_postfix_str("hacking")
    usage_p, usage_b = hacking.phrase_usage(y_policy1), hacking.phrase_usage(y_base)
    hack: dict = {"usage_policy": usage_p, "usage_base": usage_b}
    if reward is not None and cfg.hacking_prompts:
        ctx_p, ctx_y = prompts[: cfg.hacking_prompts], y_base[: cfg.hacking_prompts]
        hack["padding"] = hacking.padding_probe(shared_reward, ctx_p, ctx_y)
        if world:
            hack["padding_gold"] = hacking.padding_probe(lambda p, y: gold_rewards(p, y), ctx_p, ctx_y)
        hack["phrases"] = hacking.phrase_gains(shared_reward, ctx_p, ctx_y)
        if cfg.ascent_prompts and hasattr(reward, "model"):  # the prompts split over ranks, each on its rank's RM
            starts = [(p, y) for p, y in list(zip(prompts, y_base))[: cfg.ascent_prompts] if y.strip()]
            hack["ascent"] = map_blocks(lambda part, _: [hacking.embedding_ascent(reward, p, y, steps=cfg.ascent_steps)
                                                         for p, y in part], starts)
        paid = [g["phrase"] for g in hack["phrases"] if g["gain"] > 2 * g["stderr"] and g["gain"] > 0.05]
        summary["padding_slope"] = hack["padding"]["slope_per_10_words"]
    else:
        paid = list(usage_p)
        report["skipped"].append("RM hacking probes (no reward model, or --hacking-prompts 0)")
    rise = {ph: usage_p[ph] - usage_b[ph] for ph in paid}
    top = max(rise, key=rise.get) if rise else None
    summary.update(top_phrase=top, phrase_rate_policy=usage_p[top] if top else 0.0,
                   phrase_rate_base=usage_b[top] if top else 0.0)
    sections["hacking"] = hack
    bar.update()

    # 9. over-optimisation: the run's evaluations (RL form), and best-of-n from the base against the RM (BoN form)
    bar.set_postfix_str("overopt")
    try:
        sections["overoptimisation"] = overoptimisation(run_points(cfg.policy), "rl")
    except (FileNotFoundError, ValueError) as e:
        report["skipped"].append(f"over-optimisation of the run ({e})")
    if reward is not None and cfg.bon_pool >= 4:
        points = bon_curve(base, tok, prompts[: cfg.bon_prompts], reward, (lambda p, y: gold_rewards(p, y)) if world
                           else None, pool=cfg.bon_pool, max_new_tokens=cfg.max_new_tokens, seed=cfg.seed)
        sections["overoptimisation_bon"] = overoptimisation(points, "bon")
    else:
        report["skipped"].append("best-of-n over-optimisation (no reward model, or --bon-pool below 4)")
    bar.update()
    bar.close()

    report["summary"] = summary
    report["seconds"] = time.perf_counter() - t0
    if distributed.env().main:  # every rank holds the whole report; one writes it
        write_report(report, out)
    distributed.barrier()
    return report
