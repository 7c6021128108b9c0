"""How much of sampling is Hugging Face ``generate``'s own overhead? A measurement, not a feature.

    OMP_NUM_THREADS=1 python bench/decode_probe.py                     # both models of compare_trl.py
    OMP_NUM_THREADS=1 python bench/decode_probe.py --models tiny-default

Samples the same batch (16 rows, 16-token prompts, 40 new tokens, temperature 1, no EOS stop)
twice: with ``model.generate`` (what tether.rollout.sample and TRL both call) and with a lean
decoder written here for the Llama architecture alone (preallocated key/value buffers, one
functional pass per token through the model's own modules, no cache objects, masks or output
classes). It checks that both give the same tokens from the same seed, then prints CPU seconds
per batch (best of the rounds). bench/compare_trl.py found GRPO on the 0.9M model spending half
its time in generation at about 7% of the matmul roofline; this says how much of that a
decoder of tether's own could win back before anyone writes one (left padding, EOS, other
architectures and LoRA are not handled here).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import compare_trl  # noqa: E402  the same tokenizer and models

BATCH, PROMPT, NEW = 16, 16, 40


@torch.no_grad()
def lean_sample(model, ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """Temperature-1 sampling, the Llama forward written out with key/value buffers. (B, P) -> (B, P + new)."""
    cfg = model.config
    B, P = ids.shape
    H = cfg.num_attention_heads
    D = cfg.hidden_size // H
    layers, inv_freq = model.model.layers, model.model.rotary_emb.inv_freq  # (D/2,)
    K = torch.empty(len(layers), B, H, P + new_tokens, D)
    V = torch.empty_like(K)

    def rope(x, pos):  # x (B, H, n, D), pos (n,)
        f = torch.outer(pos.float(), inv_freq)
        cos, sin = torch.cat([f, f], -1).cos(), torch.cat([f, f], -1).sin()
        return x * cos + torch.cat([-x[..., D // 2:], x[..., : D // 2]], -1) * sin

    def rms(x, w):
        return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + cfg.rms_norm_eps))

    def forward(x, start):  # x (B, n, hidden) at positions start .. start + n - 1 -> last logits (B, V)
        n = x.shape[1]
        pos = torch.arange(start, start + n)
        for i, layer in enumerate(layers):
            a, h = layer.self_attn, rms(x, layer.input_layernorm.weight)
            q, k, v = (p(h).view(B, n, H, D).transpose(1, 2) for p in (a.q_proj, a.k_proj, a.v_proj))
            K[i, :, :, start : start + n], V[i, :, :, start : start + n] = rope(k, pos), v
            o = F.scaled_dot_product_attention(rope(q, pos), K[i, :, :, : start + n], V[i, :, :, : start + n],
                                               is_causal=n > 1)
            x = x + a.o_proj(o.transpose(1, 2).reshape(B, n, H * D))
            h, mlp = rms(x, layer.post_attention_layernorm.weight), layer.mlp
            x = x + mlp.down_proj(F.silu(mlp.gate_proj(h)) * mlp.up_proj(h))
        return model.lm_head(rms(x[:, -1], model.model.norm.weight))

    logits, out = forward(model.model.embed_tokens(ids), 0), [ids]
    for j in range(new_tokens):
        nxt = torch.multinomial(torch.softmax(logits.float(), -1), 1)  # (B, 1), as generate samples
        out.append(nxt)
        if j < new_tokens - 1:
            logits = forward(model.model.embed_tokens(nxt), P + j)
    return torch.cat(out, 1)


@torch.no_grad()
def hf_sample(model, ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
    return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                          do_sample=True, temperature=1.0, top_k=0, top_p=1.0, pad_token_id=1, eos_token_id=None)


def cpu_seconds(fn, rounds: int) -> float:
    fn()
    best = float("inf")
    for _ in range(rounds):
        t = time.process_time()
        fn()
        best = min(best, time.process_time() - t)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(compare_trl.MODELS))
    ap.add_argument("--rounds", type=int, default=4)
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as work:
        tok = compare_trl.make_tokenizer(Path(work) / "tok")
        for name in args.models.split(","):
            folder = Path(work) / name
            compare_trl.make_model(name, tok, folder)
            model = AutoModelForCausalLM.from_pretrained(folder).float().eval()
            ids = torch.randint(2, compare_trl.VOCAB, (BATCH, PROMPT), generator=torch.Generator().manual_seed(0))
            torch.manual_seed(1)
            a = hf_sample(model, ids, NEW)
            torch.manual_seed(1)
            b = lean_sample(model, ids, NEW)
            hf = cpu_seconds(lambda: hf_sample(model, ids, NEW), args.rounds)
            lean = cpu_seconds(lambda: lean_sample(model, ids, NEW), args.rounds)
            print(f"{name}: generate {hf:.3f} CPU-s, lean decoder {lean:.3f} CPU-s ({hf / lean:.2f}x); "
                  f"same tokens: {torch.equal(a, b)}")


if __name__ == "__main__":
    main()
