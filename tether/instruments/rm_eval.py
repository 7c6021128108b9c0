"""How good is a reward model? Accuracy, margin, calibration, length bias, agreement with gold.

All functions take the RM's rewards of chosen and rejected responses (the data's label says
chosen ≻ rejected) and return plain floats, so they apply to any reward function.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def accuracy(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> float:
    """Fraction of pairs where the chosen response scores higher; ties count half. Shape: (N,), (N,)."""
    delta = r_chosen - r_rejected
    return ((delta > 0).float() + 0.5 * (delta == 0).float()).mean().item()


def expected_calibration_error(r_chosen: torch.Tensor, r_rejected: torch.Tensor, bins: int = 10) -> float:
    """ECE of the Bradley–Terry probability p = σ(Δr) against the labels (Guo et al. 2017).

    Each pair is a binary prediction with confidence max(p, 1 − p), correct when p > ½ (the
    chosen side wins). ECE = Σ_b (n_b / N) · |accuracy_b − confidence_b| over equal-width
    confidence bins on [½, 1].
    """
    p = torch.sigmoid(r_chosen - r_rejected)
    confidence = torch.maximum(p, 1 - p)
    correct = (p > 0.5).float()
    edges = torch.linspace(0.5, 1.0, bins + 1)
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        in_bin = (confidence >= lo) & ((confidence < hi) | (hi == 1.0))
        if in_bin.any():
            ece += in_bin.float().mean().item() * abs(correct[in_bin].mean().item() - confidence[in_bin].mean().item())
    return ece


def length_breakdown(r_chosen: torch.Tensor, r_rejected: torch.Tensor, len_chosen: Sequence[int],
                     len_rejected: Sequence[int], gold_label: Sequence[bool] | None = None) -> dict[str, float]:
    """Does the RM just prefer the longer answer?

    Accuracy in three buckets of the length difference (chosen shorter, about equal within 10%,
    chosen longer), and how often the RM picks the longer of two answers of different length,
    beside how often the labels do (and the gold reward, when ``gold_label`` says which side is
    truly better).
    """
    lc, lr = torch.tensor(len_chosen, dtype=torch.float32), torch.tensor(len_rejected, dtype=torch.float32)
    rel = (lc - lr) / torch.maximum(torch.maximum(lc, lr), torch.ones_like(lc))
    buckets = {"chosen_shorter": rel < -0.1, "similar_length": rel.abs() <= 0.1, "chosen_longer": rel > 0.1}
    out: dict[str, float] = {}
    for name, m in buckets.items():
        if m.any():  # an empty bucket has no accuracy (its fraction says 0): none is logged
            out[f"accuracy_{name}"] = accuracy(r_chosen[m], r_rejected[m])
        out[f"fraction_{name}"] = m.float().mean().item()
    differ = lc != lr
    if differ.any():
        chosen_is_longer = lc[differ] > lr[differ]
        rm_prefers_chosen = r_chosen[differ] > r_rejected[differ]
        out["rm_prefers_longer"] = (rm_prefers_chosen == chosen_is_longer).float().mean().item()
        out["labels_prefer_longer"] = chosen_is_longer.float().mean().item()
        if gold_label is not None:
            gold = torch.tensor(gold_label)[differ]
            out["gold_prefers_longer"] = (gold == chosen_is_longer).float().mean().item()
    return out


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman rank correlation (average ranks for ties)."""
    def ranks(v: torch.Tensor) -> torch.Tensor:
        order = v.argsort()
        r = torch.empty_like(v)
        r[order] = torch.arange(len(v), dtype=v.dtype)
        for value in v.unique():  # average the ranks of ties
            tie = v == value
            if tie.sum() > 1:
                r[tie] = r[tie].mean()
        return r

    rx, ry = ranks(torch.as_tensor(x, dtype=torch.float64)), ranks(torch.as_tensor(y, dtype=torch.float64))
    rx, ry = rx - rx.mean(), ry - ry.mean()
    return (rx @ ry / (rx.norm() * ry.norm()).clamp(min=1e-12)).item()


def rm_report(r_chosen: torch.Tensor, r_rejected: torch.Tensor, len_chosen: Sequence[int], len_rejected: Sequence[int],
              gold_chosen: Sequence[float] | None = None, gold_rejected: Sequence[float] | None = None) -> dict[str, float]:
    """Every RM metric at once, keyed ``rm/...``; gold metrics only when gold rewards are given."""
    out = {
        "rm/accuracy": accuracy(r_chosen, r_rejected),
        "rm/margin": (r_chosen - r_rejected).mean().item(),
        "rm/ece": expected_calibration_error(r_chosen, r_rejected),
    }
    gold_label = None
    if gold_chosen is not None and gold_rejected is not None:
        gc, gr = torch.tensor(gold_chosen, dtype=torch.float32), torch.tensor(gold_rejected, dtype=torch.float32)
        gold_label = (gc > gr).tolist()
        decided = gc != gr
        # agreement with gold: orient each pair by the gold reward instead of the rater's label
        sign = torch.where(gc > gr, 1.0, -1.0)[decided]
        out["rm/gold_accuracy"] = accuracy(sign * r_chosen[decided], sign * r_rejected[decided])
        out["rm/labels_gold_agreement"] = (gc > gr)[decided].float().mean().item()
        out["rm/gold_spearman"] = spearman(torch.cat([r_chosen, r_rejected]).tolist(), torch.cat([gc, gr]).tolist())
    out.update({f"rm/{k}": v for k, v in length_breakdown(r_chosen, r_rejected, len_chosen, len_rejected, gold_label).items()})
    return out
