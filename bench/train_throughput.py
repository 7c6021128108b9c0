"""Training throughput and peak memory of tether's loop: SFT (tokens/s), reward models, DPO and KTO.

    python bench/train_throughput.py                 # every stage, the tiny default and a ~25M-parameter Llama
    python bench/train_throughput.py --stages rm,dpo # some stages only
    python bench/train_throughput.py --device cuda   # the same on a GPU (bf16 autocast)

Each model runs in a fresh process, so its peak memory is its own: peak resident set size on
CPU, peak allocated CUDA memory on a GPU. Rates run from the start of the first timed step to
the start of the last one (so the final checkpoint write is not in them), after warm-up steps
that are not timed, and use tether's own losses and loop. Beside the wall-clock rate, "per CPU-s"
divides by the process's CPU time over the same steps: on a machine shared with other jobs it is
the steadier figure (with one thread, close to the rate on an idle core).

- sft: tokens/s, all tokens of rows of seq_len (a quarter prompt, masked out of the loss);
- rm: pairs/s, each a chosen and a rejected sequence of seq_len tokens in one forward pass;
- dpo: pairs/s of tether.trainers.dpo.dpo_step (sigmoid loss): chosen and rejected in one
  forward with gradients; the reference log-probs are computed once before training, as the
  trainer does (their rate is printed on its own line, "dpo-ref", and is not in the DPO figure);
- kto: examples/s of tether.trainers.kto.kto_step: each example is a matched row with gradients
  plus a mismatched row without (the reference point z0); a preference pair gives two examples.
  Its reference log-probs are precomputed likewise ("kto-ref").
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


UNITS = {"sft": "tokens/s", "rm": "pairs/s", "dpo": "pairs/s", "kto": "ex/s"}


def run_one(name: str, stage: str, device: str, seq_len: int, batch_size: int, steps: int, warmup: int) -> dict:
    import torch

    from tether.data.collate import Encoded, EncodedPair, pad, pad_pairs
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
    ref_rate = None
    if stage == "rm":
        import tempfile as _tf

        from transformers import AutoModelForSequenceClassification

        from tether.losses import bradley_terry_loss
        from tether.models.reward import raw_scores

        with _tf.TemporaryDirectory() as d:  # the same backbone, with a scalar head
            model.save_pretrained(d)
            model = AutoModelForSequenceClassification.from_pretrained(d, num_labels=1)
        model.config.pad_token_id = 1
        pairs = [EncodedPair(rows[i].input_ids, rows[i + 1].input_ids, seq_len // 4) for i in range(0, len(rows), 2)]

        def collate(idx):
            return pad_pairs([pairs[i] for i in idx], 1)

        def loss_fn(m, batch):
            times.append((time.perf_counter(), time.process_time()))
            r_w, r_l = raw_scores(m, batch["input_ids"], batch["attention_mask"]).chunk(2)
            return {"pairs": bradley_terry_loss(r_w, r_l).losses.sum()}, {}

        def count(batch):
            return {"pairs": len(batch["input_ids"]) / 2}

        n = len(pairs)
    elif stage == "dpo":
        from tether.data.collate import pad_pairs_labelled, pair_rows
        from tether.scoring import sequence_logprobs
        from tether.trainers.dpo import DPOConfig, dpo_step
        from tether.trainers.dpo import pair_count as count

        pairs = [EncodedPair(rows[i].input_ids, rows[i + 1].input_ids, seq_len // 4) for i in range(0, len(rows), 2)]
        n = len(pairs)
        t0 = time.perf_counter()  # the reference pass the trainer makes once (here: the initial weights)
        ref = sequence_logprobs(model, pair_rows(pairs), 1, batch_size=2 * batch_size)  # (2N,)
        ref_rate = n / (time.perf_counter() - t0)
        ref_c, ref_r = ref.chunk(2)
        dcfg = DPOConfig(model="bench", data="bench", loss="sigmoid", beta=0.1)

        def collate(idx):
            return {**pad_pairs_labelled([pairs[i] for i in idx], 1), "ref_chosen": ref_c[idx], "ref_rejected": ref_r[idx]}

        def loss_fn(m, batch):
            times.append((time.perf_counter(), time.process_time()))
            return dpo_step(m, batch, dcfg)
    elif stage == "kto":
        from tether.data.collate import EncodedFeedback
        from tether.loop import DataOrder
        from tether.scoring import sequence_logprobs
        from tether.trainers.kto import KTOConfig, kto_step, matched_rows, mismatched_rows

        cut = seq_len // 4
        examples = [EncodedFeedback(r.input_ids[:cut], r.input_ids[cut:], i % 2 == 0) for i, r in enumerate(rows)]
        n = len(examples)
        # as the trainer does: the micro-batches are known in advance (the data order is a pure function
        # of seed and step), so the reference log-probs of matched and mismatched rows are computed once
        order = DataOrder(n, batch_size, 0)
        micro = list(dict.fromkeys(tuple(order.indices(k)) for k in range(warmup + steps)))
        where = {idx: k * batch_size for k, idx in enumerate(micro)}
        kl_rows = [r for idx in micro for r in mismatched_rows([examples[i] for i in idx], seq_len)]
        t0 = time.perf_counter()
        ref = sequence_logprobs(model, matched_rows(examples, seq_len) + kl_rows, 1, batch_size=2 * batch_size)
        ref_rate = n / (time.perf_counter() - t0)
        ref_matched, ref_kl = ref[:n], ref[n:]
        kcfg = KTOConfig(model="bench", data="bench", beta=0.1, train=TrainConfig(batch_size=batch_size))

        def collate(idx):
            batch_examples = [examples[i] for i in idx]
            kl = pad(mismatched_rows(batch_examples, seq_len), 1)
            k = where[tuple(idx)]
            return {**pad(matched_rows(batch_examples, seq_len), 1), **{f"kl_{name}": t for name, t in kl.items()},
                    "ref": ref_matched[idx], "ref_kl": ref_kl[k : k + len(idx)],
                    "label": torch.tensor([e.label for e in batch_examples])}

        def loss_fn(m, batch):
            times.append((time.perf_counter(), time.process_time()))
            return kto_step(m, batch, kcfg)

        def count(batch):
            return {"rows": float(len(batch["label"]))}
    else:
        def collate(idx):
            return pad([rows[i] for i in idx], 1)

        def loss_fn(m, batch):
            times.append((time.perf_counter(), time.process_time()))
            return lm_loss(m, batch)

        from tether.trainers.sft import lm_count as count

        n = len(rows)

    cfg = TrainConfig(steps=warmup + steps, batch_size=batch_size, lr=1e-4, warmup_steps=1, eval_every=0,
                      save_every=0, device=device)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory() as out:
        train(model, n, collate, loss_fn, cfg, Path(out), count=count, desc=f"{stage} {name}")
    timed = len(times) - 1 - warmup  # steps between the first timed step's start and the last one's
    seconds, cpu_seconds = times[-1][0] - times[warmup][0], times[-1][1] - times[warmup][1]
    if device.startswith("cuda"):
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
    per_step = batch_size * (seq_len if stage == "sft" else 1)  # tokens for sft, pairs (rm, dpo) or examples (kto)
    return {
        "model": name,
        "stage": stage,
        "parameters": count_parameters(model),
        "device": device,
        "seq_len": seq_len,
        "batch_size": batch_size,
        "per_s": timed * per_step / seconds,
        "per_cpu_s": timed * per_step / cpu_seconds,
        "peak_memory_mb": peak_mb,
        "threads": torch.get_num_threads(),
        "ref_per_s": ref_rate,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--stages", default="sft,rm,dpo,kto",
                    help="any of sft (tokens/s), rm and dpo (pairs/s), kto (examples/s)")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.steps < 2:
        ap.error("--steps must be at least 2 (rates run from the first timed step to the last)")
    if args.one:
        name, stage = args.one.split(":")
        print(json.dumps(run_one(name, stage, args.device, args.seq_len, args.batch_size, args.steps, args.warmup)))
        return
    print(f"{'stage':<6}{'model':<14}{'params':>12}{'device':>8}{'per second':>16}{'per CPU-s':>10}{'peak MB':>10}")
    for stage, name in ((s, m) for s in args.stages.split(",") for m in args.models.split(",")):
        cmd = [sys.executable, __file__, "--one", f"{name}:{stage}", "--device", args.device, "--seq-len", str(args.seq_len),
               "--batch-size", str(args.batch_size), "--steps", str(args.steps), "--warmup", str(args.warmup)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"{stage} {name} failed:\n{proc.stderr[-3000:]}")
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        unit = UNITS[stage]
        print(f"{stage:<6}{r['model']:<14}{r['parameters']:>12,}{r['device']:>8}{r['per_s']:>9,.1f} {unit:<7}"
              f"{r['per_cpu_s']:>9,.1f}{r['peak_memory_mb']:>10,.0f}")
        if r["ref_per_s"] is not None:
            print(f"{stage + '-ref':<8}{r['model']:<12}{'':>12}{r['device']:>8}{r['ref_per_s']:>9,.1f} {unit:<7}"
                  f"{'':>9}{'(once)':>10}")


if __name__ == "__main__":
    main()
