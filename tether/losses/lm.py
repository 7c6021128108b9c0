"""Language-model log-likelihoods: the building block of SFT and of every policy loss."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100


def _log_softmax(z: torch.Tensor, temperature: float) -> torch.Tensor:
    """log softmax(z / T) over the last dimension, in float32: (..., V) -> (..., V)."""
    z = z.float()
    return torch.log_softmax(z if temperature == 1.0 else z / temperature, dim=-1)


def _logprobs(z: torch.Tensor, y: torch.Tensor, temperature: float) -> torch.Tensor:
    """log softmax(z / T)[y] over the last dimension: (..., V), (...) -> (...), float32."""
    return _gather(_log_softmax(z, temperature), y)


def _gather(logsm: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """logsm[..., y]: (..., V), (...) -> (...)."""
    return logsm.gather(-1, y.unsqueeze(-1)).squeeze(-1)


def _entropy(logsm: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """H = −Σ_v p_v log p_v from log-probabilities ``logsm`` and probabilities ``p`` = exp(logsm): (..., V) -> (...)."""
    return -(p * logsm).sum(-1)


def token_entropy(z: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """H(softmax(z / T)) = −Σ_v p_v log p_v over the last dimension: (..., V) -> (...), float32."""
    logsm = _log_softmax(z, temperature)
    return _entropy(logsm, logsm.exp())


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
                    chunk: int | None = None, entropy: torch.Tensor | None = None, summed: bool = False) -> torch.Tensor:
    """:func:`token_logprobs` of ``head(hidden)`` (a linear output layer's logits) without materialising them.

    Only the labelled positions are scored, ``chunk`` of them at a time (default: as many as make
    2^24 logits, 64 MB in float32): their logits z = head(h_t), then log softmax(z / T)[y_t]. With
    gradient, the gradient is formed in the same pass (:class:`_OutputLogprobs`), so the memory beyond
    the hidden states is one chunk's logits, forward and backward, instead of B × T × V logits and
    their gradient. ``summed``: the caller differentiates only the sum of the log-probs (SFT's NLL),
    so the output layer's weight gradient is formed in the forward pass as well.

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
    entropies: list[torch.Tensor] = []
    if torch.is_grad_enabled() and (h.requires_grad or any(p.requires_grad for p in head.parameters())):
        logp = _OutputLogprobs.apply(h, head.weight, head.bias, y, temperature, chunk, summed, entropies)
    else:
        parts = []
        for h_c, y_c in zip(h.split(chunk), y.split(chunk)):
            logsm = _log_softmax(head(h_c), temperature)  # (c, V): one log-softmax for both
            parts.append(_gather(logsm, y_c))
            if entropy is not None:
                entropies.append(_entropy(logsm, logsm.exp()))
        logp = torch.cat(parts)
    if entropy is not None:
        entropy.masked_scatter_(mask, torch.cat(entropies))
    return out.masked_scatter(mask, logp)


class _OutputLogprobs(torch.autograd.Function):
    """log p_t = log softmax(z_t / T)[y_t], z_t = W h_t + b, for N positions, a chunk at a time, with its gradient
    formed in the forward pass: ∂ log p_t / ∂z_t = (e_{y_t} − softmax(z_t / T)) / T =: d_t, so

        ∂L/∂h_t = g_t · d_t W        ∂L/∂W = Σ_t g_t · d_t h_tᵀ        ∂L/∂b = Σ_t g_t · d_t

    for the upstream gradient g_t = ∂L/∂ log p_t. d_t W (N × H) is kept from the forward pass and scaled by
    g_t in the backward pass: a frozen output layer (LoRA) costs one matmul for the logits and one for the
    gradient, where recomputing the logits in the backward pass would cost two more. ``summed`` (the caller
    differentiates Σ_t log p_t alone: every g_t equal) keeps Σ_t d_t h_tᵀ too, a V × H sum, and the
    backward pass only scales it; otherwise, or if the g_t differ after all, the backward pass
    recomputes each chunk's d_t for W's gradient. No B × T × V tensor is kept either way."""

    @staticmethod
    def forward(ctx, h, weight, bias, y, temperature, chunk, summed, entropies):
        trains_w = weight.requires_grad or (bias is not None and bias.requires_grad)
        logp, grad_h = torch.empty(len(y), device=h.device), torch.empty_like(h)
        sum_w = torch.zeros_like(weight, dtype=torch.float32) if summed and trains_w else None
        sum_b = None if sum_w is None or bias is None else torch.zeros_like(bias, dtype=torch.float32)
        for s in range(0, len(y), chunk):
            h_c, y_c = h[s : s + chunk], y[s : s + chunk]
            d, logp[s : s + chunk] = _chunk_grad(h_c, weight, bias, y_c, temperature, entropies)
            grad_h[s : s + chunk] = d.to(weight.dtype) @ weight
            if sum_w is not None:
                sum_w += d.T @ h_c.float()
                if sum_b is not None:
                    sum_b += d.sum(0)
        ctx.save_for_backward(h, weight, bias, y, grad_h, sum_w, sum_b)
        ctx.temperature, ctx.chunk, ctx.trains_w = temperature, chunk, trains_w
        return logp

    @staticmethod
    def backward(ctx, g):
        h, weight, bias, y, grad_h, sum_w, sum_b = ctx.saved_tensors
        gh = (g.unsqueeze(-1) * grad_h).to(h.dtype) if ctx.needs_input_grad[0] else None
        gw = gb = None
        if ctx.trains_w and sum_w is not None and bool((g == g[0]).all()):
            gw, gb = g[0] * sum_w, None if sum_b is None else g[0] * sum_b
        elif ctx.trains_w:  # each chunk's d_t once more, weighted by its own g_t
            gw = torch.zeros_like(weight, dtype=torch.float32)
            gb = None if bias is None else torch.zeros_like(bias, dtype=torch.float32)
            for s in range(0, len(y), ctx.chunk):
                d, _ = _chunk_grad(h[s : s + ctx.chunk], weight, bias, y[s : s + ctx.chunk], ctx.temperature, None)
                d = d * g[s : s + ctx.chunk].unsqueeze(-1)
                gw += d.T @ h[s : s + ctx.chunk].float()
                if gb is not None:
                    gb += d.sum(0)
        gw = gw.to(weight.dtype) if gw is not None and weight.requires_grad else None
        gb = gb.to(bias.dtype) if gb is not None and bias.requires_grad else None
        return gh, gw, gb, None, None, None, None, None


def _chunk_grad(h, weight, bias, y, temperature, entropies) -> tuple[torch.Tensor, torch.Tensor]:
    """(d = ∂ log p / ∂z (c, V), log p (c,)) of one chunk, as :func:`_logprobs` computes log p; its entropies
    appended to ``entropies`` (a list) when given."""
    logsm = _log_softmax(torch.nn.functional.linear(h, weight, bias), temperature)
    logp, p = _gather(logsm, y), logsm.exp()
    if entropies is not None:
        entropies.append(_entropy(logsm, p))
    d = p.neg_()
    d[torch.arange(len(y), device=y.device), y] += 1.0
    return (d if temperature == 1.0 else d / temperature), logp


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
