"""Achieved KL from the base policy, estimated on the policy's own samples.

    KL(π ‖ π_ref) = E_{x, y~π}[ log π(y|x) − log π_ref(y|x) ]

The per-sequence log-ratio is the k1 estimator summed over tokens: unbiased, but noisy, and
negative on single samples. Sampling uses plain temperature-1 sampling, the distribution the
KL is defined on (top-k or top-p would change it).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from tether.data.collate import Encoded, pad
from tether.losses.lm import IGNORE_INDEX, sequence_logprobs
from tether.rollout import sample


@torch.no_grad()
def response_logprobs(model, pairs: Sequence[tuple[list[int], list[int]]], pad_id: int,
                      batch_size: int = 32) -> torch.Tensor:
    """log π(y | x) summed over response tokens, for (prompt ids, response ids) pairs. Shape: (N,)."""
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(pairs), batch_size):
        rows = [Encoded(p + r, [IGNORE_INDEX] * len(p) + r) for p, r in pairs[i : i + batch_size]]
        batch = {k: v.to(device) for k, v in pad(rows, pad_id).items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        out.append(sequence_logprobs(logits, batch["labels"]).cpu())
    return torch.cat(out) if out else torch.zeros(0)


@dataclass
class KLEstimate:
    """Mean sequence log-ratio over samples, its standard error, and the samples' texts."""

    kl: float
    stderr: float
    responses: list[str]


def sampled_kl(policy, reference, tokenizer, prompts: Sequence[str], *, max_new_tokens: int = 64,
               seed: int = 0, batch_size: int = 32) -> KLEstimate:
    """Estimate KL(π ‖ π_ref) from one policy sample per prompt."""
    pairs = sample(policy, tokenizer, prompts, max_new_tokens=max_new_tokens, seed=seed, batch_size=batch_size)
    ratio = response_logprobs(policy, pairs, tokenizer.pad_token_id, batch_size) - \
        response_logprobs(reference, pairs, tokenizer.pad_token_id, batch_size)  # (N,)
    n = len(ratio)
    stderr = ratio.std().item() / math.sqrt(n) if n > 1 else float("nan")
    texts = tokenizer.batch_decode([r for _, r in pairs], skip_special_tokens=True)
    return KLEstimate(ratio.mean().item(), stderr, texts)
