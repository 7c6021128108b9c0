"""Batched generation with a KV cache (Hugging Face ``generate``), prompts left-padded.

This is the seam where a faster engine can plug in later: everything else asks for text through
:func:`generate`. Sampling is plain temperature sampling by default: top-k / top-p are off,
because they change the distribution the KL to the reference is measured on.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


@torch.no_grad()
def sample(
    model,
    tokenizer,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    greedy: bool = False,
    batch_size: int = 32,
    seed: int = 0,
) -> list[tuple[list[int], list[int]]]:
    """Continue each prompt; returns (prompt token ids, response token ids) per prompt.

    The response ends with EOS when the model stopped, and is cut at ``max_new_tokens`` otherwise.
    Token ids (not re-tokenised text) are what exact log-probabilities must be computed on.
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    out: list[tuple[list[int], list[int]]] = []
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            for i in range(0, len(prompts), batch_size):
                enc = tokenizer(list(prompts[i : i + batch_size]), return_tensors="pt", padding=True).to(device)
                ids = model.generate(
                    **enc,
                    max_new_tokens=max_new_tokens,
                    do_sample=not greedy,
                    temperature=temperature if not greedy else None,
                    top_k=None if greedy else 0,
                    top_p=None if greedy else 1.0,
                    pad_token_id=pad,
                    eos_token_id=eos,
                )  # (B, T_prompt + T_new)
                width = enc["input_ids"].shape[1]
                for row, mask in zip(ids.tolist(), enc["attention_mask"].tolist()):
                    prompt = [t for t, m in zip(row[:width], mask) if m]
                    response = row[width:]
                    if eos in response:
                        response = response[: response.index(eos) + 1]
                    elif pad != eos:
                        response = [t for t in response if t != pad]
                    out.append((prompt, response))
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return out


def generate(model, tokenizer, prompts: Sequence[str], **kwargs) -> list[str]:
    """Continue each prompt; returns the generated text only (special tokens removed). See :func:`sample`."""
    pairs = sample(model, tokenizer, prompts, **kwargs)
    return tokenizer.batch_decode([response for _, response in pairs], skip_special_tokens=True)
