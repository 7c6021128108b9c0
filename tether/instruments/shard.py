"""Per-prompt work split over torchrun ranks, for the commands that only sample and score: ``tether eval``,
``tether bon`` and ``tether rlaif label``.

Every rank takes a contiguous block of whole *chunks* of rows (tether.distributed.shard_bounds over
the chunks), works on it, and the results are gathered in order on every rank
(tether.distributed.gather_objects), so each rank ends with what one process computes. A chunk is
the batch the work runs in (a generation batch, a reward model's batch): blocks start at multiples
of it, so every batch holds the rows it holds in one process, and a sample seeded from the global
position of its chunk (tether.rollout.sample's ``index_offset``) is the sample one process draws.
A rank whose block is empty (fewer chunks than ranks) still joins every gather. At world size 1
the block is everything and the gathers are identities.

What runs inside a block must not be a collective: tether.scoring's row scorers (an LLM judge,
multiple-choice log-likelihoods) already split their rows over ranks and are called by every rank
with every row instead. Generation and reward models (tether.rewards) are per-rank work.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from tether import distributed


def block(n: int, chunk: int = 1, rank: int | None = None, world: int | None = None) -> tuple[int, int]:
    """This rank's rows [lo, hi) of ``n``: a block of whole chunks of ``chunk`` rows (the last chunk may be short)."""
    lo, hi = distributed.shard_bounds(-(-n // chunk), rank, world)
    return min(lo * chunk, n), min(hi * chunk, n)


def map_blocks(fn: Callable[[list, int], Sequence], items: Sequence, chunk: int = 1) -> list:
    """``fn(items[lo:hi], lo)`` on this rank's :func:`block` (one result per item), every rank's results gathered
    in order on every rank. ``lo`` is the block's global position (the ``index_offset`` of its samples).
    ``fn`` must not itself make collective calls: it runs on some ranks only."""
    lo, hi = block(len(items), chunk)
    mine = list(fn(list(items[lo:hi]), lo)) if hi > lo else []
    if len(mine) != hi - lo:
        raise RuntimeError(f"map_blocks: {len(mine)} results for {hi - lo} items")
    return distributed.gather_objects(mine)


def generate(model, tokenizer, prompts: Sequence[str], *, batch_size: int = 32, **kwargs) -> list[str]:
    """tether.rollout.generate over ranks, each chunk of ``batch_size`` prompts seeded from its global position."""
    from tether.rollout import generate as one

    return map_blocks(lambda part, lo: one(model, tokenizer, part, batch_size=batch_size, index_offset=lo, **kwargs),
                      prompts, batch_size)


def as_floats(scores) -> list[float]:
    """A reward function's output as Python floats (exact for float32 and float64 scores)."""
    return torch.as_tensor(scores, dtype=torch.float64).tolist()


def reward_over_ranks(reward_fn, chunk: int = 32):
    """``reward_fn`` with its rows split over ranks in blocks of whole chunks (a reward model's batch: 32) and the
    scores gathered (float64) on every rank; at world size 1, ``reward_fn`` itself. Every rank must call it
    with the same rows (a collective)."""
    if not distributed.env().active:
        return reward_fn

    def scored(prompts: Sequence[str], responses: Sequence[str]) -> torch.Tensor:
        rows = list(zip(prompts, responses))
        return torch.tensor(map_blocks(lambda part, _: as_floats(reward_fn([p for p, _ in part], [y for _, y in part])),
                                       rows, chunk), dtype=torch.float64)

    return scored


class AtPosition:
    """A generation backend whose samples are seeded from global position ``offset`` (for tether.generation.sample_as,
    which does not pass an ``index_offset`` itself)."""

    def __init__(self, backend, offset: int):
        self.backend, self.offset = backend, offset

    def sample(self, prompts, **kwargs):
        return self.backend.sample(prompts, index_offset=self.offset, **kwargs)
