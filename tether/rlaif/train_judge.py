"""A small judge that tether trains in the gold world, so that RLAIF runs on a CPU and can be checked.

The judge is the tiny default fine-tuned (with the SFT machinery: ``encode_sft`` + ``fit_causal_lm``)
to answer judge prompts written in natural language (tether.rlaif.judge.judge_prompt) with " A"
or " B". Its training comparisons are the world's answers of graded quality (tether.world.candidates)
on training questions, each asked under a principle sampled from the constitution and labelled
by the truth *for that principle*: the gold world splits its gold reward into parts
(tether.world.gold.gold_parts: family, core, style), and each principle of the default
constitution reads the part it is about:

    helpful    the whole gold reward, core + style
    harmless   harmful requests: the core (refusing +1.5, complying −2.0); any other request:
               −1.0 for a refusal ("while still being helpful"), else 0
    honest     arithmetic and knowledge: the core (right +1.5, wrong or agreeing with a wrong
               belief −1.0), 0 for a refusal; other families 0
    polite     −1.0 if rude, else 0
    concise    style without the rudeness: −1.5 × repeated-sentence share − 0.04 per word over budget

A pair whose two answers score the same under its principle is a tie. By default ties are left
out of training (about half the comparisons tie under the narrow principles, and a tiny judge
trained on them as noise learned nothing in 400 steps); with ``ties`` each of a tie's two orders
gets a target drawn at random, so that the judge learns to say ½ there. Every comparison is
written in both orders (a first, then b first), so position carries no information about the answer.

The held-out report (``judge_eval.json``, also in ``tether.json``) is measured on comparisons
between answers to *test* questions: agreement with the gold reward's ordering when the judge is
asked the ``helpful`` principle, agreement with each principle's own truth under that principle,
and the flip rate (how often the choice changes when the order is swapped). Ties under the truth
are left out of agreement.
"""

from __future__ import annotations

import logging
import random
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch

from tether.config import SEED_MAX, check, check_fields, group, opt
from tether.data import fingerprint, load_sft
from tether.data.collate import encode_sft
from tether.errors import ConfigError
from tether.io import write_json, write_jsonl
from tether.loop import TrainConfig
from tether.models import count_parameters, load_model, load_tokenizer
from tether.rlaif.constitution import Constitution, load_constitution
from tether.rlaif.judge import CHOICES, LMJudge, judge_pairs, judge_prompt, order_stats
from tether.trainers.artifact import check_output, data_info, prepare_output, write_artifact
from tether.trainers.sft import fit_causal_lm
from tether.world import WorldConfig, candidates, format_prompt
from tether.world.build import split_items
from tether.world.gold import gold_parts, is_refusal
from tether.world.tasks import RUDE

log = logging.getLogger("tether.rlaif")


def _is_rude(response: str) -> bool:
    low = response.lower()
    return any(r.lower() in low for r in RUDE)


def aspect_score(principle_id: str, prompt: str, response: str) -> float:
    """The gold world's truth for one principle (table in the module doc)."""
    family, core, style = gold_parts(prompt, response)
    rude = _is_rude(response)
    if principle_id == "helpful":
        return core + style
    if principle_id == "harmless":
        return core if family == "harmful" else (-1.0 if is_refusal(response) or not response.strip() else 0.0)
    if principle_id == "honest":
        if family not in ("arithmetic", "knowledge"):
            return 0.0
        return 0.0 if is_refusal(response) else core
    if principle_id == "polite":
        return -1.0 if rude else 0.0
    if principle_id == "concise":
        return style + (1.0 if rude else 0.0)
    raise ValueError(f"the gold world has no truth for principle {principle_id!r}; it knows {', '.join(ASPECTS)}")


ASPECTS = ("helpful", "harmless", "honest", "polite", "concise")


def gold_comparisons(items: list, constitution: Constitution, n: int, seed: int) -> list[dict]:
    """``n`` comparisons of two different candidate answers to a question from ``items``, each with a
    principle sampled from ``constitution`` and the truth under it (``score_a``, ``score_b``) and
    the gold reward of both answers. The family is drawn uniformly first, then a question of it
    (harmful and benign requests are a tenth of the world's questions, and the harmless principle
    has little to learn from the rest)."""
    for p in constitution.principles:
        if p.id not in ASPECTS:
            raise ValueError(f"principle {p.id!r}: the gold world has no truth for it; it knows {', '.join(ASPECTS)}")
    rng = random.Random(seed)
    by_family = defaultdict(list)
    for item in items:
        by_family[item.family].append(item)
    families = sorted(by_family)
    out = []
    for _ in range(n):
        item = rng.choice(by_family[rng.choice(families)])
        (kind_a, a), (kind_b, b) = rng.sample(candidates(item, rng), 2)
        principle = constitution.sample(rng)
        prompt = format_prompt(item.question)
        out.append({"prompt": prompt, "a": a, "b": b, "kind_a": kind_a, "kind_b": kind_b, "family": item.family,
                    "principle": principle.id, "score_a": aspect_score(principle.id, prompt, a),
                    "score_b": aspect_score(principle.id, prompt, b),
                    "gold_a": aspect_score("helpful", prompt, a), "gold_b": aspect_score("helpful", prompt, b)})
    return out


def judge_sft_rows(comparisons: list[dict], constitution: Constitution, seed: int, ties: bool = True) -> list[dict]:
    """SFT rows {"prompt": judge prompt, "completion": " A" | " B"}, two a comparison (both orders);
    a tie's targets are drawn at random, or the tie is left out when ``ties`` is False."""
    rng = random.Random(seed)
    rows = []
    for c in comparisons:
        if not ties and c["score_a"] == c["score_b"]:
            continue
        question = constitution.get(c["principle"]).question
        for first, second, s1, s2 in ((c["a"], c["b"], c["score_a"], c["score_b"]),
                                      (c["b"], c["a"], c["score_b"], c["score_a"])):
            target = CHOICES[0] if s1 > s2 else CHOICES[1] if s2 > s1 else rng.choice(CHOICES)
            rows.append({"prompt": judge_prompt(question, c["prompt"], first, second), "completion": target,
                         "principle": c["principle"], "tie": s1 == s2})
    return rows


def agreement(probs: list[float], score_a: list[float], score_b: list[float]) -> tuple[float, int]:
    """Share of pairs not tied under the truth where the judge's side (prob > ½) is the truth's; and their count."""
    kept = [(p > 0.5) == (sa > sb) for p, sa, sb in zip(probs, score_a, score_b) if sa != sb]
    return (sum(kept) / len(kept) if kept else float("nan")), len(kept)


def evaluate_judge(judge, comparisons: list[dict], constitution: Constitution) -> dict[str, float]:
    """Held-out agreement and position bias (module doc) of ``judge`` on gold comparisons."""
    prompts, a, b = [c["prompt"] for c in comparisons], [c["a"] for c in comparisons], [c["b"] for c in comparisons]
    helpful = constitution.get("helpful") if "helpful" in {p.id for p in constitution.principles} else None
    metrics: dict[str, float] = {}
    if helpful is not None:  # every pair asked the helpful principle: agreement with the gold reward itself
        js = judge_pairs(judge, prompts, a, b, [helpful] * len(comparisons))
        acc, n = agreement([j.prob for j in js], [c["gold_a"] for c in comparisons], [c["gold_b"] for c in comparisons])
        stats = order_stats(js)
        metrics.update({"judge/gold_agreement": acc, "judge/gold_pairs": n, "judge/flip_rate": stats.flip_rate,
                        "judge/first_bias": stats.first_bias})
        single = [j.p_a_first for j in js]  # one order only: what asking once would have given
        metrics["judge/gold_agreement_one_order"] = agreement(single, [c["gold_a"] for c in comparisons],
                                                              [c["gold_b"] for c in comparisons])[0]
    js = judge_pairs(judge, prompts, a, b, [constitution.get(c["principle"]) for c in comparisons])
    by = defaultdict(list)
    for c, j in zip(comparisons, js):
        by[c["principle"]].append((j, c))
    for pid, rows in sorted(by.items()):
        acc, n = agreement([j.prob for j, _ in rows], [c["score_a"] for _, c in rows], [c["score_b"] for _, c in rows])
        metrics[f"judge/{pid}_agreement"] = acc
        metrics[f"judge/{pid}_pairs"] = n
        metrics[f"judge/{pid}_flip_rate"] = order_stats([j for j, _ in rows]).flip_rate
    acc, n = agreement([j.prob for j in js], [c["score_a"] for c in comparisons], [c["score_b"] for c in comparisons])
    metrics["judge/principle_agreement"] = acc
    metrics["judge/flip_rate_sampled_principles"] = order_stats(js).flip_rate
    return metrics


def _judge_defaults() -> TrainConfig:
    return TrainConfig(steps=2000, batch_size=32, lr=1e-3, warmup_steps=50, eval_every=250, save_every=0)


@dataclass
class JudgeTrainConfig:
    model: str = opt("", "model to fine-tune into a judge: the pretrained tiny default (or any causal LM) folder")
    constitution: str = opt("default", "constitution file whose principles the judge learns (ids must be gold-world "
                                       "principles: helpful, harmless, honest, polite, concise)")
    world_seed: int = opt(0, "seed of the gold world whose train/test questions are used")
    pairs: int = opt(6000, "training comparisons (each written in both orders)")
    eval_pairs: int = opt(1000, "held-out comparisons on test questions")
    out: str = opt("runs/judge", "output folder")
    max_len: int = opt(256, "longest judge prompt + answer in tokens (longer examples are dropped and counted)")
    ties: bool = opt(False, "train on comparisons the principle ties too, with random targets (teaches ½ there)")
    overwrite: bool = opt(False, "replace the run tether wrote in out, once the new one is complete")
    train: TrainConfig = group(_judge_defaults)

    def validate(self) -> None:
        if not self.model:
            raise ConfigError("--model is required (e.g. the pretrained tiny default of `tether pretrain`)")
        check_fields(self, "pairs eval_pairs", ge=1, integer=True)
        check("max_len", self.max_len, ge=2, integer=True)
        check("world_seed", self.world_seed, ge=0, le=SEED_MAX, integer=True)
        self.train.validate()


def run_train_judge(cfg: JudgeTrainConfig) -> Path:
    """Build the judge's data from the gold world, fine-tune, evaluate on held-out pairs; returns the folder."""
    cfg.validate()
    torch.manual_seed(cfg.train.seed)
    constitution = load_constitution(cfg.constitution)
    splits = split_items(WorldConfig(seed=cfg.world_seed))
    train_cmp = gold_comparisons(splits["train"], constitution, cfg.pairs, cfg.train.seed)
    eval_cmp = gold_comparisons(splits["test"], constitution, cfg.eval_pairs, cfg.train.seed + 1)
    tokenizer = load_tokenizer(cfg.model)
    train_sft = judge_sft_rows(train_cmp, constitution, cfg.train.seed, cfg.ties)
    eval_sft = judge_sft_rows(eval_cmp, constitution, cfg.train.seed + 1, cfg.ties)
    records, eval_records = load_sft(train_sft), load_sft(eval_sft)
    rows, overflow = encode_sft(records, tokenizer, cfg.max_len, "drop")  # a cut judge prompt loses its answer
    eval_rows, _ = encode_sft(eval_records, tokenizer, cfg.max_len, "drop")
    if not rows:
        raise ValueError(f"every one of the {len(records)} judge prompts is longer than max_len={cfg.max_len} tokens "
                         f"with this tokenizer; raise --max-len (the model must take that many positions)")

    check_output(Path(cfg.out), resume=False, overwrite=cfg.overwrite)
    model = load_model(cfg.model)
    out = prepare_output(Path(cfg.out), resume=False, overwrite=cfg.overwrite)  # inputs and model have loaded
    data_dir = out / "data"
    train_file = write_jsonl(data_dir / "judge_sft_train.jsonl", train_sft)
    eval_file = write_jsonl(data_dir / "judge_sft_eval.jsonl", eval_sft)
    write_jsonl(data_dir / "comparisons_eval.jsonl", eval_cmp)
    log.info("judge: fine-tuning %s (%d parameters) on %d judge prompts (%d dropped as too long)", cfg.model,
             count_parameters(model), len(rows), overflow.dropped)
    result = fit_causal_lm(model, tokenizer, rows, eval_rows, cfg.train, out, resume=False, desc="judge")
    model.eval()
    judge = LMJudge(model, tokenizer, max_len=cfg.max_len, name=f"lm:{cfg.out}")
    metrics = {**result.train, **result.eval, **evaluate_judge(judge, eval_cmp, constitution),
               "data/dropped": overflow.dropped, "time/seconds": result.seconds}
    data = {"train": data_info(train_file, records, fingerprint(records)),
            "eval": data_info(eval_file, eval_records, fingerprint(eval_records))}
    write_json(out / "judge_eval.json", {k: v for k, v in metrics.items() if k.startswith("judge/")})
    return write_artifact(out, stage="rlaif-judge", cfg=cfg, model=model, tokenizer=tokenizer, data=data,
                          metrics=metrics)  # tether.json last, then swapped in for an --overwritten run

