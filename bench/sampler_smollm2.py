"""The sampler alone on a real chat model: tokens a second of tether's sampler against Hugging Face ``generate``, and
the fraction of the memory-bandwidth bound, SmolLM2-135M-Instruct on the CPU.

    OMP_NUM_THREADS=1 python bench/sampler_smollm2.py                  # batches 8 and 32, 64 new tokens
    OMP_NUM_THREADS=1 python bench/sampler_smollm2.py --batches 8 --new 32 --rounds 1
    OMP_NUM_THREADS=1 python bench/sampler_smollm2.py --batches 32 --groups 1,8    # also 4 prompts x 8 samples

HH-RLHF harmless-base prompts (../shared/data) rendered with the model's chat template, at most ``--max-prompt``
tokens each, are continued at temperature 1 for at most ``--new`` tokens (a row stops at its end of turn) by:

- ``tether``: tether.rollout.sample, the sampler every RL stage, best-of-N and the instruments use (tether's
  decoding loop, tether/decoding.py, for this Llama-family model);
- ``hf``: ``model.generate`` called directly, the same arguments. TRL's trainers sample through this same call
  (GRPO/RLOO/online DPO: ``unwrap_model_for_generation`` then ``generate``, without vLLM), so it stands for
  TRL's generation path here; TRL itself is not installed in this environment.

With ``--groups 1,8`` each batch is also run as batch / 8 prompts, each repeated 8 times in a row (a GRPO group,
several samples a prompt): tether's sampler prefills a repeated prompt once, ``generate`` every row of it. Rows end
at their end of turn, so ``generate`` keeps computing rows that have ended and tether's sampler drops them.

Both are checked to give the same tokens from the same seed (so tokens / s compare like with like). Reported per
(sampler, batch, group): the generated tokens a CPU-second and a wall-second (best of ``--rounds``), and the fraction of the
memory-bandwidth bound: a decoding step reads every weight once (fp32: 4 bytes a parameter), so at most
bandwidth / weight bytes steps run a second, the bandwidth being a measured single-thread copy of a 1 GiB tensor
(read + write counted); the steps are the longest response's tokens, and the time includes the prompts' prefill
(one pass over up to B × ``--max-prompt`` tokens), so the fraction is a lower bound on the decoding steps'. The
decoding steps alone are also shown: a 1-token run times the prefill, and (total − prefill) / (steps − 1) is the
CPU time of one step. (On one core at batch 32 a step's 2 × N × B FLOPs, not its weight reads, are the tighter
bound.) Results:
bench/results/sampler_smollm2-DATE.json and .md.
"""

from __future__ import annotations

import argparse
import datetime
import gzip
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
HH = ROOT.parent / "shared" / "data" / "hh-rlhf" / "harmless-base-test.jsonl.gz"


def copy_bandwidth(gib: float = 1.0, rounds: int = 3) -> float:
    """Bytes a second of a single-threaded tensor copy (read + write counted), best of ``rounds``."""
    src = torch.ones(int(gib * 2**30 // 4))
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(rounds):
        t = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t)
    return 2 * src.numel() * 4 / best


def prompts(tokenizer, n: int, max_prompt: int) -> list[str]:
    from tether.data import load_prompts

    with gzip.open(HH, "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    rendered = [r.prompt for r in load_prompts([{"prompt": r["chosen"].rsplit("\n\nAssistant:", 1)[0] + "\n\nAssistant:"}
                                                for r in rows[: 4 * n]], tokenizer=tokenizer)]
    fitting = [p for p in rendered if len(tokenizer(p)["input_ids"]) <= max_prompt]
    if len(fitting) < n:
        raise SystemExit(f"only {len(fitting)} prompts of at most {max_prompt} tokens")
    return fitting[:n]


def hf_generate(model, tokenizer, batch: list[str], new: int, seed: int) -> list[list[int]]:
    """``model.generate`` as a trainer calls it: left padding, sampling at temperature 1, no top-k/top-p."""
    from transformers import GenerationConfig

    tokenizer.padding_side = "left"
    enc = tokenizer(batch, return_tensors="pt", padding=True)
    torch.manual_seed(seed)
    out = model.generate(**enc, generation_config=GenerationConfig(), max_new_tokens=new, do_sample=True,
                         temperature=1.0, top_k=None, top_p=None, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    rows = []
    for row in out[:, enc["input_ids"].shape[1]:].tolist():  # cut after the end of turn, as tether's sampler does
        end = tokenizer.eos_token_id
        rows.append(row[: row.index(end) + 1] if end in row else [t for t in row if t != tokenizer.pad_token_id])
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batches", default="8,32")
    ap.add_argument("--groups", default="1", help="samples a prompt: each batch once per group size that divides it")
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--max-prompt", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--work", default="/tmp/tether-smollm2-sampler")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = ap.parse_args()

    from tether.models import load_model, load_tokenizer
    from tether.models.gguf import import_gguf
    from tether.rollout import sample

    folder = Path(args.work) / "smollm2"
    if not (folder / "config.json").exists():
        import_gguf("smollm2", folder)
    model, tokenizer = load_model(folder).eval(), load_tokenizer(folder)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    bandwidth = copy_bandwidth()
    batches = [int(b) for b in args.batches.split(",")]
    texts = prompts(tokenizer, max(batches), args.max_prompt)
    rows = []
    for b, group in [(b, g) for b in batches for g in map(int, args.groups.split(",")) if b % g == 0]:
        batch = [p for p in texts[: b // group] for _ in range(group)]
        ref = hf_generate(model, tokenizer, batch, args.new, seed=0)
        for name in ("tether", "hf"):
            def run(new: int):
                if name == "hf":
                    return hf_generate(model, tokenizer, batch, new, seed=0)
                return [r for _, r in sample(model, tokenizer, batch, max_new_tokens=new, batch_size=b, seed=0)]

            best_cpu, best_wall, prefill_cpu, tokens = float("inf"), float("inf"), float("inf"), 0
            for _ in range(args.rounds):
                c, w = time.process_time(), time.perf_counter()
                got = run(args.new)
                best_cpu, best_wall = min(best_cpu, time.process_time() - c), min(best_wall, time.perf_counter() - w)
                tokens = sum(len(r) for r in got)
                c = time.process_time()
                run(1)  # the prompts' prefill and the first token alone
                prefill_cpu = min(prefill_cpu, time.process_time() - c)
            same = got == ref
            steps = max(len(r) for r in got)  # decoding steps of the batch
            bound = bandwidth / weight_bytes  # steps a second if a step only read the weights
            step_cpu = (best_cpu - prefill_cpu) / max(steps - 1, 1)  # one decoding step after the first token
            rows.append({"sampler": name, "batch": b, "group": group, "new_tokens": args.new, "tokens": tokens, "steps": steps,
                         "prefill_cpu_s": prefill_cpu, "decode_step_cpu_ms": 1e3 * step_cpu,
                         "decode_fraction_of_bound": 1 / step_cpu / bound,
                         "tokens_per_cpu_s": tokens / best_cpu, "tokens_per_s": tokens / best_wall,
                         "steps_per_s": steps / best_wall, "bandwidth_bound_steps_per_s": bound,
                         "fraction_of_bound": steps / best_wall / bound, "same_tokens_as_hf": same})
            print(f"{name:6s} batch {b:3d} group {group}: {tokens / best_cpu:7.1f} tokens/CPU-s, {tokens / best_wall:7.1f} tokens/s, "
                  f"{steps / best_wall:.1f} steps/s = {steps / best_wall / bound:.1%} of the bandwidth bound (prefill "
                  f"{prefill_cpu:.2f} CPU-s, then {1e3 * step_cpu:.0f} ms a step = {1 / step_cpu / bound:.1%}); same "
                  f"tokens as generate: {same}", flush=True)

    import transformers

    stamp = datetime.date.today().strftime("%Y%m%d")
    meta = {"model": "SmolLM2-135M-Instruct", "parameters": sum(p.numel() for p in model.parameters()),
            "weight_bytes": weight_bytes, "copy_bandwidth_gb_s": bandwidth / 1e9, "threads": torch.get_num_threads(),
            "load_average": os.getloadavg(), "machine": platform.processor() or platform.machine(),
            "torch": torch.__version__, "transformers": transformers.__version__, "python": sys.version.split()[0]}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"sampler_smollm2-{stamp}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = [f"SmolLM2-135M-Instruct ({meta['parameters'] / 1e6:.1f}M parameters, {weight_bytes / 1e9:.2f} GB fp32), "
             f"{args.new} new tokens after HH prompts of at most {args.max_prompt} tokens, {meta['threads']} thread(s), "
             f"copy bandwidth {bandwidth / 1e9:.1f} GB/s, load average {meta['load_average'][0]:.2f}", "",
             "| sampler | batch | group | tokens / CPU-s | tokens / s | steps / s | bound (steps / s) | fraction | prefill CPU-s "
             "| decode step CPU-ms | decode fraction | same tokens |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['sampler']} | {r['batch']} | {r['group']} | {r['tokens_per_cpu_s']:.1f} | {r['tokens_per_s']:.1f} | "
              f"{r['steps_per_s']:.1f} | {r['bandwidth_bound_steps_per_s']:.1f} | {r['fraction_of_bound']:.1%} | "
              f"{r['prefill_cpu_s']:.2f} | {r['decode_step_cpu_ms']:.0f} | {r['decode_fraction_of_bound']:.1%} | "
              f"{r['same_tokens_as_hf']} |" for r in rows]
    (out / f"sampler_smollm2-{stamp}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
