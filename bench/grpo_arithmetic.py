r"""GRPO with the exact-match reward on the gold world's arithmetic questions: does accuracy rise on held-out ones?

    OMP_NUM_THREADS=1 python bench/grpo_arithmetic.py --world runs/demo/world --sft runs/demo/sft --out runs/grpo-arith

1. the arithmetic questions of the world's train / eval / test prompt files go to ``OUT/arith_*.jsonl``
   (the splits are disjoint: a test question is never trained on);
2. ``tether grpo --reward exact_match`` from the SFT policy on the train questions (skipped when ``OUT/grpo``
   already holds a finished run);
3. exact match of SFT and GRPO on the train and the test questions, two-term and (in a world exported with
   ``--chain-arithmetic``) three-term ones apart: greedy, and sampled at T = 1 (``--samples`` per question,
   the same seeds for both policies, so each difference is paired).

Prints a table and writes ``OUT/summary.json``. Standard errors treat questions as the unit (the samples
of one question are not independent).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from _run import TETHER, sh  # bench/_run.py (scripts here run as `python bench/NAME.py`)


def arithmetic_files(world: Path, out: Path) -> dict[str, Path]:
    files = {}
    for split in ("train", "eval", "test"):
        rows = [json.loads(line) for line in open(world / f"prompts_{split}.jsonl", encoding="utf-8")]
        files[split] = out / f"arith_{split}.jsonl"
        files[split].write_text("".join(json.dumps(r) + "\n" for r in rows if r["family"] == "arithmetic"))
    return files


def per_question_hits(model, tokenizer, rows: list[dict], samples: int, seed: int) -> dict[str, list[float]]:
    """Per question: greedy hit (0/1) and the share of ``samples`` T = 1 samples that hit."""
    from tether.rollout import generate
    from tether.world import exact_match

    prompts = [r["prompt"] for r in rows]
    greedy = generate(model, tokenizer, prompts, max_new_tokens=32, greedy=True, batch_size=128)
    sampled = generate(model, tokenizer, [p for p in prompts for _ in range(samples)], max_new_tokens=32,
                       batch_size=256, seed=seed)
    return {
        "greedy": [float(exact_match(y, r["answer"])) for r, y in zip(rows, greedy)],
        "sampled": [sum(exact_match(sampled[i * samples + j], r["answer"]) for j in range(samples)) / samples
                    for i, r in enumerate(rows)],
    }


def mean_se(xs: list[float]) -> tuple[float, float]:
    n = len(xs)
    m = sum(xs) / n
    return m, math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1) / n)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--world", default="runs/demo/world")
    ap.add_argument("--sft", default="runs/demo/sft")
    ap.add_argument("--out", default="runs/grpo-arith")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--beta", type=float, default=0.04)
    ap.add_argument("--group-size", type=int, default=8)
    ap.add_argument("--prompts-per-step", type=int, default=32)
    ap.add_argument("--samples", type=int, default=8, help="T = 1 samples per question in the evaluation")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--grpo-args", default="", help="further `tether grpo` options, e.g. \"--r 4 --scale none\"")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    files = arithmetic_files(Path(a.world), out)
    grpo = out / "grpo"
    batch = a.group_size * a.prompts_per_step
    micro = min(64, batch)  # one optimiser step per rollout batch: micro-batches of 64 rows, batch / 64 of them
    if not (grpo / "tether.json").exists():
        sh(TETHER + ["grpo", "--model", a.sft, "--prompts", str(files["train"]), "--eval-prompts", str(files["eval"]),
                     "--reward", "exact_match", "--out", str(grpo), "--group-size", str(a.group_size),
                     "--prompts-per-step", str(a.prompts_per_step), "--max-new-tokens", "24", "--steps", str(a.steps),
                     "--lr", str(a.lr), "--beta", str(a.beta), "--eval-every", "25", "--save-every", "0",
                     "--batch-size", str(micro), "--grad-accum", str(batch // micro), "--gen-batch-size", "256",
                     "--seed", str(a.seed), "--overwrite"]
           + a.grpo_args.split(),
           out / "grpo.log")
    import torch

    from tether.models import load_model, load_tokenizer

    torch.set_num_threads(1)
    rows = {split: [json.loads(line) for line in open(files[split], encoding="utf-8")] for split in ("train", "test")}
    kinds = {split: ["three-term" if r.get("steps") else "two-term" for r in rs] for split, rs in rows.items()}
    hits = {}
    for name, policy in (("sft", Path(a.sft)), ("grpo", grpo)):
        tokenizer, model = load_tokenizer(policy), load_model(policy).eval()
        for split in rows:
            hits[(split, name)] = per_question_hits(model, tokenizer, rows[split], a.samples, a.seed + 1)
    summary = {"config": vars(a)}
    print("| questions | decoding | SFT | GRPO | GRPO − SFT (paired) |\n|---|---|---|---|---|")
    for split in ("train", "test"):
        for kind in sorted(set(kinds[split]), reverse=True):  # two-term first
            keep = [i for i, k in enumerate(kinds[split]) if k == kind]
            for mode in ("sampled", "greedy"):
                s = [hits[(split, "sft")][mode][i] for i in keep]
                g = [hits[(split, "grpo")][mode][i] for i in keep]
                (ms, ss), (mg, sg) = mean_se(s), mean_se(g)
                md, sd = mean_se([y - x for x, y in zip(s, g)])
                summary[f"{split}/{kind}/{mode}"] = {"questions": len(keep), "sft": ms, "sft_se": ss, "grpo": mg,
                                                     "grpo_se": sg, "diff": md, "diff_se": sd}
                label = f"T = 1, {a.samples}/question" if mode == "sampled" else "greedy"
                print(f"| {split}, {kind} ({len(keep)}) | {label} | {ms:.3f} ± {ss:.3f} | {mg:.3f} ± {sg:.3f} | "
                      f"{md:+.3f} ± {sd:.3f} |")
    (out / "summary.json").write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
