"""The output layer's log-probs with gradient, three ways, on SmolLM2-135M-Instruct (49,152 ids): CPU-s and memory.

    OMP_NUM_THREADS=1 python bench/output_layer.py             # batch 4 x 256 tokens, 3 alternating rounds

One forward and backward pass of the whole model over HH-RLHF rows of 256 tokens (the last 3/4 labelled), with the
log-probs of the labelled tokens taken

- ``logits``: from the model's B × T × V logits (tether.losses.lm.token_logprobs; ``TETHER_SCORE_FROM_LOGITS=1``);
- ``recompute``: by chunks of positions from the hidden states, each chunk's logits recomputed in the backward pass
  (a torch checkpoint: what tether.losses.lm.output_logprobs did before its gradient was formed in the forward pass);
- ``fused``: tether.losses.lm.output_logprobs as it stands: the gradient formed in the same pass, chunk by chunk.

Two losses: SFT's summed NLL with every weight trained (``summed``: the output layer's weight gradient in the forward
pass too), and a DPO-like loss (a nonlinear function of each row's summed log-prob) with LoRA adapters (r = 16) on the
attention and MLP projections, the output layer frozen. Reported: CPU-seconds of the pass (median of the rounds,
modes alternating), the process's peak RSS growth over the pass (ru_maxrss, so each mode runs in its own child
process), and that the three give the same loss and gradients (to 1e-4 relative). Results:
bench/results/output_layer-DATE.json and .md.
"""

from __future__ import annotations

import argparse
import datetime
import gzip
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HH = ROOT.parent / "shared" / "data" / "hh-rlhf" / "harmless-base-test.jsonl.gz"
MODES = ("logits", "recompute", "fused")


def recompute_output_logprobs(hidden, head, labels, temperature=1.0, chunk=None, entropy=None, summed=False):
    """The checkpointed version: each chunk's log-probs recomputed in the backward pass."""
    import torch
    from torch.utils.checkpoint import checkpoint

    from tether.losses.lm import IGNORE_INDEX, _logprobs

    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    out = torch.zeros(targets.shape, device=hidden.device)
    h, y = hidden[:, :-1][mask], targets[mask]
    chunk = chunk or max(1, 2**24 // head.out_features)
    parts = [checkpoint(lambda a, b: _logprobs(head(a), b, temperature), h_c, y_c, use_reentrant=False)
             for h_c, y_c in zip(h.split(chunk), y.split(chunk))]
    return out.masked_scatter(mask, torch.cat(parts))


def child(a) -> None:
    import torch

    torch.set_num_threads(1)
    from tether.data import load_preferences
    from tether.data.collate import IGNORE_INDEX, prompt_ids
    from tether.losses.lm import sequence_sum, summed_nll
    from tether.models import load_model, load_tokenizer
    from tether.scoring import labelled_logprobs

    if a.mode == "logits":
        os.environ["TETHER_SCORE_FROM_LOGITS"] = "1"
    elif a.mode == "recompute":
        import tether.scoring

        tether.scoring.output_logprobs = recompute_output_logprobs
    model, tok = load_model(a.model), load_tokenizer(a.model)
    if a.loss == "dpo":
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(0)  # the same adapters in every mode's process
        model = get_peft_model(model, LoraConfig(r=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                                     "gate_proj", "up_proj", "down_proj"],
                                                 init_lora_weights=False))
    with gzip.open(HH, "rt", encoding="utf-8") as f:
        pairs = load_preferences([json.loads(next(f)) for _ in range(200)], tokenizer=tok)
    texts = [p.prompt + p.chosen for p in pairs if len(prompt_ids(tok, p.prompt + p.chosen)) >= a.length][: a.batch]
    ids = torch.tensor([prompt_ids(tok, t)[: a.length] for t in texts])
    mask, labels = torch.ones_like(ids), ids.clone()
    labels[:, : a.length // 4] = IGNORE_INDEX
    sign = torch.tensor([1.0, -1.0] * (a.batch // 2))

    def loss():
        if a.loss == "sft":
            return summed_nll(*labelled_logprobs(model, ids, mask, labels, summed=True)).total
        s = sequence_sum(*labelled_logprobs(model, ids, mask, labels))
        return -torch.nn.functional.logsigmoid(0.1 * (sign * s).sum() / a.batch * 2)

    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for _ in range(a.rounds):
        model.zero_grad(set_to_none=True)
        c = time.process_time()
        value = loss()
        value.backward()
        times.append(time.process_time() - c)
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    norm = float(torch.sqrt(sum((g.double() ** 2).sum() for g in grads.values())))
    print(json.dumps({"cpu_s": times, "loss": float(value), "grad_norm": norm, "trained_tensors": len(grads),
                      "peak_rss_growth_mb": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--length", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--work", default="/tmp/tether-smollm2-sampler")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    ap.add_argument("--loss", default="sft", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        a.mode = a.child
        child(a)
        return
    from tether.models.gguf import import_gguf

    model = Path(a.work) / "smollm2"
    if not (model / "config.json").exists():
        import_gguf("smollm2", model)
    rows = []
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for loss in ("sft", "dpo"):
        res = {}
        for mode in MODES:
            cmd = [sys.executable, __file__, "--child", mode, "--loss", loss, "--model", str(model), "--batch",
                   str(a.batch), "--length", str(a.length), "--rounds", str(a.rounds)]
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if proc.returncode:
                sys.exit(proc.stderr[-3000:])
            res[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
            r = res[mode]
            print(f"{loss} {mode:9s}: {statistics.median(r['cpu_s']):6.2f} CPU-s (rounds {r['cpu_s']}), peak RSS "
                  f"+{r['peak_rss_growth_mb']:.0f} MB, loss {r['loss']:.6f}, grad norm {r['grad_norm']:.6f}", flush=True)
        base = res["logits"]
        for mode in MODES:
            r = res[mode]
            rows.append({"loss": loss, "mode": mode, "cpu_s": statistics.median(r["cpu_s"]), "rounds": r["cpu_s"],
                         "peak_rss_growth_mb": r["peak_rss_growth_mb"], "loss_value": r["loss"],
                         "grad_norm": r["grad_norm"],
                         "same_as_logits": abs(r["loss"] - base["loss"]) <= 1e-4 * abs(base["loss"])
                         and abs(r["grad_norm"] - base["grad_norm"]) <= 1e-4 * base["grad_norm"]})
    stamp = datetime.date.today().strftime("%Y%m%d")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"batch": a.batch, "length": a.length, "rounds": a.rounds, "load_average": os.getloadavg()}
    (out / f"output_layer-{stamp}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = [f"SmolLM2-135M-Instruct, one forward + backward of {a.batch} rows x {a.length} tokens (3/4 labelled), "
             f"one thread, median of {a.rounds} rounds; load average {meta['load_average'][0]:.2f}", "",
             "| loss | mode | CPU-s | peak RSS growth MB | loss value | grad norm | same as logits |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['loss']} | {r['mode']} | {r['cpu_s']:.2f} | {r['peak_rss_growth_mb']:.0f} | {r['loss_value']:.6f} | "
              f"{r['grad_norm']:.6f} | {r['same_as_logits']} |" for r in rows]
    (out / f"output_layer-{stamp}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
