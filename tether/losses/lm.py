"""Language-model log-likelihoods: the building block of SFT and of every policy loss."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100


def _logprobs(z: torch.Tensor, y: torch.Tensor, temperature: float) -> torch.Tensor:
    """log softmax(z / T)[y] over the last dimension: (..., V), (...) -> (...), float32."""
    z = z.float() if temperature == 1.0 else z.float() / temperature
    return torch.log_softmax(z, dim=-1).gather(-1, y.unsqueeze(-1)).squeeze(-1)


def token_entropy(z: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """H(softmax(z / T)) = −Σ_v p_v log p_v over the last dimension: (..., V) -> (...), float32."""
    logp = torch.log_softmax(z.float() / temperature, dim=-1)
    return -(logp.exp() * logp).sum(-1)


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log π(y_t | y_<t) = log softmax(z_t)[y_t], with z_t = logits[:, t] / temperature, for each position.

    The next-token shift is done here: logits[:, t] predicts labels[:, t + 1]. Positions whose
    label is IGNORE_INDEX get 0. Computed a row at a time, so on a large vocabulary no full-size
    copy of the logits is made (temperature, float32, log-softmax): beyond the logits the memory is
    one row's (T × V), with gradient too (each row's log-softmax is recomputed in the backward pass).
    :func:`output_logprobs` gives the same numbers without the logits at all.

    Shape: logits (B, T, V), labels (B, T) -> (B, T - 1), float32.
    """
    targets = labels[:, 1:]  # (B, T-1)
    mask = targets != IGNORE_INDEX
    safe = targets.masked_fill(~mask, 0)
    rows = []
    for z, y in zip(logits[:, :-1].split(1), safe.split(1)):
        # with gradient the row's log-softmax is recomputed in the backward pass rather than kept
        rows.append(checkpoint(_logprobs, z, y, temperature, use_reentrant=False) if z.requires_grad
                    else _logprobs(z, y, temperature))
    if not rows:
        return torch.zeros(targets.shape, device=logits.device)
    return torch.cat(rows) * mask


def output_logprobs(hidden: torch.Tensor, head: torch.nn.Module, labels: torch.Tensor, temperature: float = 1.0,
                    chunk: int | None = None, entropy: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`token_logprobs` of ``head(hidden)`` (the output layer's logits) without materialising them.

    Only the labelled positions are scored, ``chunk`` of them at a time (default: as many as make
    2^24 logits, 64 MB in float32): their logits z = head(h_t), then log softmax(z / T)[y_t]. With
    gradient each chunk is recomputed in the backward pass (a torch checkpoint), so the memory beyond
    the hidden states is one chunk's logits, forward and backward, instead of B × T × V logits and
    their gradient; the price is the output layer's matmul once more in the backward pass.

    ``entropy``: a (B, T − 1) tensor that receives, without gradient, :func:`token_entropy` at the same
    positions (PPO's objective/entropy), from the same chunks of logits.

    Shape: hidden (B, T, H), labels (B, T) -> (B, T - 1), float32, 0 off the labelled positions.
    """
    targets = labels[:, 1:]  # (B, T-1)
    mask = targets != IGNORE_INDEX
    out = torch.zeros(targets.shape, device=hidden.device)
    h, y = hidden[:, :-1][mask], targets[mask]  # (N, H), (N,): the positions a loss reads
    if not len(y):
        return out + hidden.sum() * 0.0  # no labelled token: 0, still connected to the graph
    chunk = chunk or max(1, 2**24 // head.out_features)

    def scored(h_c: torch.Tensor, y_c: torch.Tensor) -> torch.Tensor:
        return _logprobs(head(h_c), y_c, temperature)

    grad = torch.is_grad_enabled() and h.requires_grad
    parts, entropies = [], []
    for h_c, y_c in zip(h.split(chunk), y.split(chunk)):
        if grad:  # recomputed in the backward pass
            parts.append(checkpoint(scored, h_c, y_c, use_reentrant=False))
            if entropy is not None:
                with torch.no_grad():
                    entropies.append(token_entropy(head(h_c), temperature))
        else:
            z = head(h_c)  # (c, V)
            parts.append(_logprobs(z, y_c, temperature))
            if entropy is not None:
                entropies.append(token_entropy(z, temperature))
    if entropy is not None:
        entropy.masked_scatter_(mask, torch.cat(entropies))
    return out.masked_scatter(mask, torch.cat(parts))


def sequence_logprobs(logits: torch.Tensor, labels: torch.Tensor, average: bool = False) -> torch.Tensor:
    """log π(y | x) = Σ_t log π(y_t | x, y_<t) over the labelled (response) tokens.

    With ``average`` the sum is divided by the number of labelled tokens (SimPO's length
    normalisation). Shape: logits (B, T, V), labels (B, T) -> (B,).
    """
    return sequence_sum(token_logprobs(logits, labels), labels, average)


def sequence_sum(logp: torch.Tensor, labels: torch.Tensor, average: bool = False) -> torch.Tensor:
    """Σ_t of token log-probs ``logp`` (B, T − 1) over each row: log π(y | x); with ``average``, divided by
    the row's labelled tokens. labels (B, T) -> (B,)."""
    total = logp.sum(-1)
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
    return summed_nll(token_logprobs(logits, labels), labels)


def summed_nll(logp: torch.Tensor, labels: torch.Tensor) -> Summed:
    """:func:`sft_nll` from token log-probs ``logp`` (B, T − 1) instead of logits."""
    return Summed(-logp.sum(), labelled_tokens(labels))
