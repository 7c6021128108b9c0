"""Response lengths of a policy against its base: does RLHF make answers longer?

Length growth is the commonest reward hack (Singhal et al. 2023, "A Long Way to Go"): reward
models trained on human preferences favour longer answers, and the policy follows. Lengths are
counted in whitespace-separated words, overall and on prompts whose best answer is short (where
any growth is padding).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def length_stats(lengths: Sequence[float]) -> dict[str, float]:
    """Mean, median and 95th percentile (linear interpolation between order statistics)."""
    x = torch.as_tensor(list(lengths), dtype=torch.float64)
    if len(x) == 0:
        return {"mean": float("nan"), "median": float("nan"), "p95": float("nan")}
    return {"mean": x.mean().item(), "median": x.quantile(0.5).item(), "p95": x.quantile(0.95).item()}


def words(text: str) -> int:
    return len(text.split())


def length_report(policy: Sequence[str], base: Sequence[str], short: Sequence[bool] | None = None) -> dict[str, float]:
    """Length statistics of paired policy and base responses (the same prompts), keyed ``lengths/...``.

    ``short[i]`` marks prompts whose best answer is short; the ratio is mean policy / mean base length.
    """
    if len(policy) != len(base):
        raise ValueError(f"length_report: {len(policy)} policy and {len(base)} base responses")
    out: dict[str, float] = {}
    groups = {"all": [True] * len(policy)}
    if short is not None:
        groups["short"] = list(short)
    for group, keep in groups.items():
        lp = [words(y) for y, k in zip(policy, keep) if k]
        lb = [words(y) for y, k in zip(base, keep) if k]
        for who, lengths in (("policy", lp), ("base", lb)):
            out.update({f"lengths/{group}_{who}_{k}": v for k, v in length_stats(lengths).items()})
        out[f"lengths/{group}_ratio"] = (sum(lp) / max(sum(lb), 1)) if lp else float("nan")
        out[f"lengths/{group}_count"] = float(len(lp))
    return out
