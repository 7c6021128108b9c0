"""Win-rate of one policy against another under a judge, with a bootstrap interval."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def win_rate(scores_a: Sequence[float], scores_b: Sequence[float], *, resamples: int = 1000,
             seed: int = 0) -> tuple[float, tuple[float, float]]:
    """Fraction of prompts where a's response out-scores b's (ties count half), and a 95% interval.

    ``scores_a[i]`` and ``scores_b[i]`` are a judge's scores of the two responses to prompt i.
    The interval is the 2.5th and 97.5th percentiles of the rate over bootstrap resamples of prompts.
    """
    a, b = torch.as_tensor(scores_a, dtype=torch.float64), torch.as_tensor(scores_b, dtype=torch.float64)
    wins = (a > b).double() + 0.5 * (a == b).double()  # (N,)
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(len(wins), (resamples, len(wins)), generator=g)
    rates = wins[idx].mean(1)
    return wins.mean().item(), (rates.quantile(0.025).item(), rates.quantile(0.975).item())
