"""A seeded hold-out: the evaluation split every stage makes when it is given no eval data."""

from __future__ import annotations

import random


def split_eval(records: list, fraction: float, seed: int) -> tuple[list, list]:
    """(kept, held out): a seeded hold-out of ``fraction`` of the records (at least one when fraction > 0).

    Both parts keep the records' own order; the same (records, fraction, seed) always gives the same split.
    """
    if fraction == 0:
        return records, []
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    k = max(1, int(len(records) * fraction))
    held = set(order[:k])
    return [r for i, r in enumerate(records) if i not in held], [records[i] for i in sorted(held)]
