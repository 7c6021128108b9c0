"""Language-model log-likelihoods: the building block of SFT and of every policy loss."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log π(y_t | y_<t) = log softmax(z_t)[y_t], with z_t = logits[:, t] / temperature, for each position.

    The next-token shift is done here: logits[:, t] predicts labels[:, t + 1]. Positions whose
    label is IGNORE_INDEX get 0. Computed a row at a time, so on a large vocabulary no full-size
    copy of the logits is made (temperature, float32, log-softmax): beyond the logits the memory is
    one row's (T × V), with gradient too (each row's log-softmax is recomputed in the backward pass).

    Shape: logits (B, T, V), labels (B, T) -> (B, T - 1), float32.
    """
    targets = labels[:, 1:]  # (B, T-1)
    mask = targets != IGNORE_INDEX
    safe = targets.masked_fill(~mask, 0)

    def row_logprobs(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:  # (1, T-1, V), (1, T-1) -> (1, T-1)
        z = z.float() if temperature == 1.0 else z.float() / temperature
        return torch.log_softmax(z, dim=-1).gather(2, y.unsqueeze(-1)).squeeze(-1)

    rows = []
    for z, y in zip(logits[:, :-1].split(1), safe.split(1)):
        # with gradient the row's log-softmax is recomputed in the backward pass rather than kept
        rows.append(checkpoint(row_logprobs, z, y, use_reentrant=False) if z.requires_grad else row_logprobs(z, y))
    if not rows:
        return torch.zeros(targets.shape, device=logits.device)
    return torch.cat(rows) * mask


def sequence_logprobs(logits: torch.Tensor, labels: torch.Tensor, average: bool = False) -> torch.Tensor:
    """log π(y | x) = Σ_t log π(y_t | x, y_<t) over the labelled (response) tokens.

    With ``average`` the sum is divided by the number of labelled tokens (SimPO's length
    normalisation). Shape: logits (B, T, V), labels (B, T) -> (B,).
    """
    per_token = token_logprobs(logits, labels)  # (B, T-1)
    total = per_token.sum(-1)
    if average:
        total = total / (labels[:, 1:] != IGNORE_INDEX).sum(-1).clamp(min=1)
    return total


class Summed(NamedTuple):
    """A loss as its sum over units (labelled tokens, pairs, rows) and the number of units.

    A step's loss is Σ total / Σ count over all of its micro-batches and ranks, which
    tether.loop.accumulate forms; ``mean()`` is that of this batch alone. total (), count ().
    """

    total: torch.Tensor
    count: torch.Tensor

    def mean(self) -> torch.Tensor:
        return self.total / self.count.clamp(min=1)


def labelled_tokens(labels: torch.Tensor) -> torch.Tensor:
    """N: the labelled (response) tokens a causal-LM loss runs over, from the labels alone. (B, T) -> ()."""
    return (labels[:, 1:] != IGNORE_INDEX).sum()


def sft_nll(logits: torch.Tensor, labels: torch.Tensor) -> Summed:
    """Supervised fine-tuning loss: L = −(1/N) Σ_{t ∈ response} log π(y_t | x, y_<t).

    The mean runs over the N labelled tokens of the whole step (prompt tokens carry IGNORE_INDEX and
    are masked), so every response token weighs the same, whatever micro-batch it falls in: this
    returns the sum and N of this batch, and the step divides (tether.loop.accumulate).

    Shape: logits (B, T, V), labels (B, T) -> Summed(total (), count ()).
    """
    return Summed(-token_logprobs(logits, labels).sum(), labelled_tokens(labels))
