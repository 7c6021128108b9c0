"""Over-optimisation: gold and proxy reward against the distance travelled from the base policy.

Gao et al. 2023 ("Scaling Laws for Reward Model Overoptimization") measure distance as
d = √KL(π ‖ π_ref) and find the gold reward gained over the initial policy follows

    RL (PPO):      R(d) = d · (α − β · log d)
    best-of-N:     R(d) = d · (α − β · d)

Both are linear in (α, β), so they are fitted here by ordinary least squares on the points
(d_i, R_i − R_0). Where each peaks (dR/dd = 0):

    RL:   α − β·log d − β = 0   →   d* = exp(α/β − 1)    (a peak only when β > 0)
    BoN:  α − 2β·d = 0          →   d* = α / (2β)        (a peak only when β > 0)

The points come from a run's evaluations (``metrics.jsonl`` rows of PPO, GRPO, RLOO, DPO or KTO with ``eval/kl`` and
``eval/gold`` and ``eval/reward``, written at every ``--eval-every`` checkpoint, step 0 included)
or from a best-of-N run's curve (``tether.json``: KL and expected reward per N). Under torchrun
:func:`bon_curve` samples and scores its pools over ranks in whole chunks (tether.instruments.shard).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import torch


class Fit(NamedTuple):
    """A fitted form: α, β, the residual root mean square, and the peak d* (NaN when none) and its KL = d*²."""

    form: str
    alpha: float
    beta: float
    rmse: float
    peak_d: float
    peak_kl: float


def _features(d: torch.Tensor, form: str) -> torch.Tensor:
    if form == "rl":
        return torch.stack([d, -d * torch.log(d.clamp(min=1e-12))], 1)  # R = α·d − β·d·log d
    if form == "bon":
        return torch.stack([d, -d * d], 1)  # R = α·d − β·d²
    raise ValueError(f"form must be 'rl' or 'bon', got {form!r}")


def predict(form: str, alpha: float, beta: float, d: Sequence[float]) -> list[float]:
    x = _features(torch.as_tensor(d, dtype=torch.float64), form)
    return (x @ torch.tensor([alpha, beta], dtype=torch.float64)).tolist()


def fit_form(d: Sequence[float], gain: Sequence[float], form: str = "rl") -> Fit:
    """Least-squares α, β of ``form`` on points (d_i, gain_i), gain measured from the initial policy."""
    dt, y = torch.as_tensor(d, dtype=torch.float64), torch.as_tensor(gain, dtype=torch.float64)
    keep = dt > 0  # d = 0 carries no information (every form is 0 there)
    if keep.sum() < 2:
        raise ValueError(f"fit_form: need at least two points with d > 0, got {int(keep.sum())}")
    x = _features(dt[keep], form)
    coef = torch.linalg.lstsq(x, y[keep].unsqueeze(1)).solution.squeeze(1)
    alpha, beta = coef.tolist()
    rmse = (x @ coef - y[keep]).square().mean().sqrt().item()
    if beta > 0 and (form == "bon" or alpha / beta - 1 < 700):  # exp overflows past 709: no peak in reach
        peak = math.exp(alpha / beta - 1) if form == "rl" else alpha / (2 * beta)
    else:
        peak = float("nan")
    if not (peak > 0) or math.isinf(peak):
        peak = float("nan")
    return Fit(form, alpha, beta, rmse, peak, peak * peak)


def run_points(run_dir: str | Path) -> list[dict]:
    """Evaluation points of an RL run: [{"step", "kl", "d", "gold"?, "proxy"}] from its metrics.jsonl."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path}: no metrics.jsonl (is {run_dir} a PPO / GRPO / RLOO run folder?)")
    points = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            row = json.loads(line)
            if "eval/kl" not in row:
                continue
            kl = float(row["eval/kl"])
            point = {"step": row.get("step", line_no), "kl": kl, "d": math.sqrt(max(kl, 0.0)),
                     "proxy": row.get("eval/reward")}
            if "eval/gold" in row:
                point["gold"] = row["eval/gold"]
            points.append(point)
    return points


def overoptimisation(points: Sequence[dict], form: str = "rl") -> dict:
    """Fits of gold and proxy gain against d, and where the measured gold reward peaked.

    ``points``: [{"d", "proxy", "gold"?}, ...] with the initial policy first (d = 0 or the smallest d).
    """
    if len(points) < 3:
        raise ValueError(f"overoptimisation: need at least three evaluation points, got {len(points)}")
    pts = sorted(points, key=lambda p: p.get("step", 0))
    out: dict = {"points": list(pts), "form": form}
    for key in ("gold", "proxy"):
        if all(p.get(key) is not None for p in pts):
            gain = [p[key] - pts[0][key] for p in pts]
            try:
                out[f"fit_{key}"] = fit_form([p["d"] for p in pts], gain, form)._asdict()
            except (ValueError, RuntimeError) as e:  # a degenerate run (every d = 0): no fit, said so
                out[f"fit_{key}"] = {"error": str(e)}
    if all("gold" in p for p in pts):
        best = max(pts, key=lambda p: p["gold"])
        out["gold_peak"] = {"step": best.get("step"), "kl": best.get("kl"), "d": best["d"], "gold": best["gold"],
                            "final_gold": pts[-1]["gold"], "drop_from_peak": best["gold"] - pts[-1]["gold"]}
    return out


def bon_points(run_dir: str | Path) -> list[dict]:
    """A best-of-N run's curve as points [{"n", "kl", "d", "proxy"}] (measured KL on the pool, expected reward)."""
    meta = json.loads((Path(run_dir) / "tether.json").read_text())
    if meta.get("stage") != "bon":
        raise ValueError(f"{run_dir}: not a best-of-N run (stage {meta.get('stage')!r})")
    return [{"step": c["n"], "n": c["n"], "kl": c["kl_measured"], "d": math.sqrt(max(c["kl_measured"], 0.0)),
             "proxy": c["expected_reward"]} for c in meta["curve"]]


def bon_curve(model, tokenizer, prompts: Sequence[str], proxy_fn, gold_fn=None, *, pool: int = 16,
              max_new_tokens: int = 48, seed: int = 0, batch_size: int = 32) -> list[dict]:
    """Best-of-n against ``proxy_fn`` for n = 1, 2, 4, ... ≤ ``pool``: exact KL and expected proxy (and gold) reward.

    ``pool`` responses a prompt are sampled from ``model`` (π_ref) and scored; :func:`pool_curve` does the rest.
    Returns points [{"step": n, "n", "kl", "d", "proxy", "gold"?}] for :func:`overoptimisation` with ``form="bon"``.
    Under torchrun each rank samples and scores a block of whole chunks of ``batch_size`` rows, each chunk
    seeded from its global position (tether.instruments.shard); the curve is computed from every rank's rows.
    ``proxy_fn`` and ``gold_fn`` are called on one rank's rows only (not collectives).
    """
    from tether.instruments.shard import as_floats, map_blocks
    from tether.rollout import sample

    def draw(part: list[str], lo: int) -> list[tuple]:
        pairs = sample(model, tokenizer, part, max_new_tokens=max_new_tokens, seed=seed, batch_size=batch_size,
                       index_offset=lo)
        texts = tokenizer.batch_decode([r for _, r in pairs], skip_special_tokens=True)
        proxy = as_floats(proxy_fn(part, texts))
        gold = as_floats(gold_fn(part, texts)) if gold_fn else [None] * len(part)
        return [(tuple(r), p, g) for (_, r), p, g in zip(pairs, proxy, gold)]

    rows = map_blocks(draw, [p for p in prompts for _ in range(pool)], batch_size)
    proxy = torch.tensor([p for _, p, _ in rows], dtype=torch.float64).view(len(prompts), pool)
    gold = torch.tensor([g for _, _, g in rows], dtype=torch.float64).view(len(prompts), pool) if gold_fn else None
    return pool_curve([r for r, _, _ in rows], proxy, gold)


def pool_curve(responses: Sequence[tuple], proxy: torch.Tensor, gold: torch.Tensor | None = None) -> list[dict]:
    """Best-of-n over sampled pools, exact on each prompt's empirical distribution, for n = 1, 2, 4, ... ≤ pool.

    ``responses``: P·M response token-id tuples, prompt by prompt; ``proxy``, ``gold``: (P, M) rewards. Each
    prompt's pool goes through tether.trainers.bon.pool_stats, the computation `tether bon` uses (identical
    responses merged into π̂_ref, each with one reward: the mean over its copies where they differ;
    π_BoN = tether.theory.bon_distribution(π̂_ref, proxy, n)); KL(π_BoN ‖ π̂_ref), E_{π_BoN}[proxy] and
    E_{π_BoN}[gold] are averaged over prompts.
    """
    import numpy as np

    from tether.trainers.bon import curve_sizes, pool_stats

    n_prompts, pool = proxy.shape
    points = []
    for n in curve_sizes(pool):
        stats = [pool_stats(list(responses[i * pool : (i + 1) * pool]), proxy[i].tolist(), n,
                            gold[i].tolist() if gold is not None else None) for i in range(n_prompts)]
        kl = float(np.mean([s.kl for s in stats]))
        point = {"step": n, "n": n, "kl": kl, "d": math.sqrt(max(kl, 0.0)),
                 "proxy": float(np.mean([s.expected_reward for s in stats]))}
        if gold is not None:
            point["gold"] = float(np.mean([s.expected_gold for s in stats]))
        points.append(point)
    return points
