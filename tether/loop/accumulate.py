"""Gradient accumulation by sums and counts: the one rule by which every stage turns micro-batches into a step.

A stage's loss over one optimiser step is a weighted sum of terms, each a mean over its own units
(labelled tokens for an NLL, pairs for a preference loss, response tokens for a PPO surrogate):

    L = Σ_k  (1 / N_k) Σ_{u ∈ step} ℓ_k(u),      N_k = Σ_{micro-batches m, ranks r} n_k(m, r)

The step's rows are cut into micro-batches (``grad_accum``) and, under torchrun, spread over ranks.
Each micro-batch reports the sum S_k(m) = Σ_{u ∈ m} ℓ_k(u) of every term (its ``loss_fn``) and, from
the batch alone, before any forward pass, how many units n_k(m) it holds (its ``count``). The step's
counts N_k are summed over the micro-batches and all-reduced over the ranks first; then each
micro-batch back-propagates Σ_k S_k(m) / N_k (times the world size W, because DDP and FSDP2
average gradients over ranks). The gradients add up to ∇L exactly, whatever the split: averaging
each micro-batch's own mean instead (what tether did before) weights a token of a short micro-batch
more than one of a long one, so the gradient depended on the split (rows with 18 and 2 labelled
tokens, batch 4 × 1 against 2 × 2: cosine 0.56). Hugging Face's Trainer passes the same global count
as ``num_items_in_batch``.

Because the split does not matter, a micro-batch of rows of unequal length can itself be cut into
forward passes of like-length rows (:func:`length_passes`): each pass pads only to its own longest
row, so less padding is computed, and the gradient is the same.

Metrics a ``loss_fn`` reports are means over its micro-batch; they are weighted by the micro-batch's
share of the first term's count, so that they too are means over the step (a ``tokens`` entry is
summed instead: it feeds the throughput figure).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch

from tether import distributed

Counts = dict[str, float]
LossFn = Callable[[object], tuple[dict[str, torch.Tensor], dict[str, float]]]


def rows(batch: dict) -> Counts:
    """The default count: every row of the batch is one unit."""
    return {"rows": float(len(next(iter(batch.values()))))}


def step_counts(counts: Sequence[Counts], keys: Sequence[str] = ()) -> Counts:
    """N_k: each term's units summed over the step's micro-batches (``counts``, this rank's) and every rank
    (float64, one all-reduce). ``keys``: the terms to count when this rank has no micro-batch (every rank
    must reduce the same ones)."""
    local: Counts = dict.fromkeys(keys, 0.0)
    for c in counts:
        for k, v in c.items():
            local[k] = local.get(k, 0.0) + float(v)
    if not distributed.env().active:
        return local
    keys = sorted(local)  # the same order on every rank
    total = dict(zip(keys, distributed.all_reduce(torch.tensor([local[k] for k in keys], dtype=torch.float64)).tolist()))
    return {k: total[k] for k in local}  # in the loss's own order, as in one process: the first term weighs metrics


def length_passes(lengths: Sequence[int], cost: int) -> list[list[int]]:
    """One micro-batch's rows (positions into ``lengths``, each row's length in tokens) cut into forward passes.

    A pass pads its rows to its longest, so it computes rows × longest tokens, and costs about ``cost`` tokens'
    worth more for being a pass of its own (kernel launches, per-operator overhead: a forward and backward pass of
    the demo's 1M-parameter model costs 7.5 ms + 0.056 ms a token on two CPU cores, so about 135 tokens; a PPO
    pass runs policy, critic and loss, and its update was fastest at 256-512). Over the rows sorted by length,
    the cut into runs that minimises
        Σ_pass (cost + rows · longest)
    is found by dynamic programming (n ≤ a micro-batch: O(n²)). Rows of one length, or ``cost`` 0: one pass, in
    the given order. The update is the same for any cut (the module's docstring); only the padding differs.
    """
    n = len(lengths)
    if cost <= 0 or n < 2:
        return [list(range(n))]
    order = sorted(range(n), key=lambda i: lengths[i])
    best, start = [0.0] + [math.inf] * n, [0] * (n + 1)  # best[j]: the cheapest cut of the j shortest rows
    for j in range(1, n + 1):
        longest = lengths[order[j - 1]]
        for i in range(j):  # the last pass: sorted rows i .. j - 1
            c = best[i] + cost + (j - i) * longest
            if c < best[j]:
                best[j], start[j] = c, i
    passes, j = [], n
    while j > 0:
        passes.append(order[start[j] : j])
        j = start[j]
    return [list(range(n))] if len(passes) == 1 else passes[::-1]


class Accumulated(NamedTuple):
    """One step's gradient is in the parameters' ``.grad``. loss: L over the whole step (every rank);
    metrics: the step means of what ``loss_fn`` reported (reduced over ranks); nonfinite: what went
    wrong when a micro-batch's loss was not finite on this or another rank (None when all were finite);
    terms: each term's own step mean Σ S_k / N_k (every rank; L is their sum)."""

    loss: float
    metrics: dict[str, float]
    nonfinite: str | None
    terms: dict[str, float] = {}


def accumulate(module: torch.nn.Module, batches: Sequence, count: Callable[[object], Counts], loss_fn: LossFn,
               *, context=None, filler=None) -> Accumulated:
    """Back-propagate one step of ``batches`` (this rank's micro-batches) into ``module``'s gradients.

    ``count(batch)`` gives n_k(m) for every term from the batch alone; ``loss_fn(batch)`` runs the
    forward pass and returns ({term: S_k(m)}, metrics). ``context()``, if given, wraps each forward
    pass (autocast). Under torchrun every rank must run as many backward passes as the others (DDP
    synchronises on the last): a rank with fewer micro-batches repeats ``filler`` (by default its
    first batch) with weight 0. A non-finite loss is recorded, not raised, so every rank stops together.
    """
    env = distributed.env()
    counts = [count(batch) for batch in batches]
    totals = step_counts(counts, keys=count(filler) if filler is not None else ())
    n = len(batches)
    if env.active:
        n = int(distributed.all_reduce(torch.tensor(n), "max").item())
    padded = list(batches) + [filler if filler is not None else batches[0]] * (n - len(batches))
    primary = next(iter(totals), None)
    sums: dict[str, float] = {}
    bad = None
    for i, batch in enumerate(padded):
        weight = 0.0 if i >= len(batches) else float(env.world_size)
        with context() if context is not None else contextlib.nullcontext():
            terms, metrics = loss_fn(batch)
        if missing := [k for k in terms if k not in totals]:
            raise ValueError(f"loss terms {missing} have no count: count(batch) must give the units of every term "
                             f"the loss returns (it gave {sorted(totals)})")
        loss = sum(s / totals[k] for k, s in terms.items() if totals[k] > 0)
        if not torch.is_tensor(loss):  # no term has a unit anywhere in the step: nothing to learn from
            loss = next(iter(terms.values())).sum() * 0.0
        if i < len(batches):
            if not torch.isfinite(loss) and bad is None:
                bad = loss.item()
            share = counts[i][primary] / totals[primary] if primary and totals[primary] > 0 else 0.0
            sums["loss"] = sums.get("loss", 0.0) + loss.item()
            for k, v in terms.items():
                if totals[k] > 0:
                    sums[f"_term/{k}"] = sums.get(f"_term/{k}", 0.0) + float(v.detach()) / totals[k]
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + (v if k == "tokens" else v * share)
        with distributed.accumulating(module, last=i == n - 1):
            (loss * weight).backward()
    if bad is not None:
        sums["_nonfinite"] = 1.0
    sums = distributed.reduce_metrics(sums)
    flagged = sums.pop("_nonfinite", 0.0)
    nonfinite = f"the loss is {bad}" if bad is not None else ("the loss is not finite on another rank" if flagged
                                                               else None)
    terms = {k[6:]: sums.pop(k) for k in [k for k in sums if k.startswith("_term/")]}
    return Accumulated(sums.get("loss", 0.0), sums, nonfinite, terms)

