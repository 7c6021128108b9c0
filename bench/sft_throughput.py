"""SFT throughput and peak memory of tether's training loop.

    python bench/sft_throughput.py                 # the tiny default and a ~25M-parameter Llama
    python bench/sft_throughput.py --device cuda   # the same on a GPU (bf16 autocast)

Each model runs in a fresh process, so its peak memory is its own: peak resident set size on
CPU, peak allocated CUDA memory on a GPU. Tokens/s counts real (non-pad) tokens per second over
the timed steps, after warm-up steps that are not timed.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODELS = {
    # name: (vocab, hidden, layers, heads, intermediate)
    "tiny-default": (1024, 128, 4, 4, 384),
    "llama-25m": (12000, 512, 6, 8, 1408),
}


def run_one(name: str, device: str, seq_len: int, batch_size: int, steps: int, warmup: int) -> dict:
    import torch

    from tether.data.collate import Encoded, pad
    from tether.loop import TrainConfig, train
    from tether.models import TinyConfig, build_tiny, count_parameters
    from tether.trainers.sft import lm_loss

    vocab, hidden, layers, heads, inter = MODELS[name]

    class _Tok:  # build_tiny needs only these from a tokenizer
        eos_token_id, pad_token_id = 0, 1

        def __len__(self):
            return vocab

    model = build_tiny(_Tok(), TinyConfig(vocab, hidden, layers, heads, inter, max_positions=seq_len))
    g = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(256):  # SFT-shaped rows: a quarter prompt (masked), the rest response
        ids = torch.randint(2, vocab, (seq_len,), generator=g).tolist()
        cut = seq_len // 4
        rows.append(Encoded(ids, [-100] * cut + ids[cut:]))
    times: list[float] = []

    def timed_loss(m, batch):
        times.append(time.perf_counter())
        return lm_loss(m, batch)

    cfg = TrainConfig(steps=warmup + steps, batch_size=batch_size, lr=1e-4, warmup_steps=1, eval_every=0,
                      save_every=0, device=device)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory() as out:
        train(model, len(rows), lambda idx: pad([rows[i] for i in idx], 1), timed_loss, cfg, Path(out), desc=name)
    end = time.perf_counter()
    seconds = end - times[warmup]
    if device.startswith("cuda"):
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
    return {
        "model": name,
        "parameters": count_parameters(model),
        "device": device,
        "seq_len": seq_len,
        "batch_size": batch_size,
        "tokens_per_s": steps * batch_size * seq_len / seconds,
        "peak_memory_mb": peak_mb,
        "threads": torch.get_num_threads(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one, args.device, args.seq_len, args.batch_size, args.steps, args.warmup)))
        return
    print(f"{'model':<14}{'params':>12}{'device':>8}{'tokens/s':>12}{'peak MB':>10}")
    for name in args.models.split(","):
        cmd = [sys.executable, __file__, "--one", name, "--device", args.device, "--seq-len", str(args.seq_len),
               "--batch-size", str(args.batch_size), "--steps", str(args.steps), "--warmup", str(args.warmup)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"{name} failed:\n{proc.stderr[-3000:]}")
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"{r['model']:<14}{r['parameters']:>12,}{r['device']:>8}{r['tokens_per_s']:>12,.0f}{r['peak_memory_mb']:>10,.0f}")


if __name__ == "__main__":
    main()
