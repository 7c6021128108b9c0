"""Sample estimators of KL(π || π_ref) from log-probabilities of tokens drawn from π.

Schulman, "Approximating KL Divergence" (2020, joschu.net/blog/kl-approx.html). With
log r = log π_ref(y) − log π(y) for y ~ π:

    k1 = −log r                 unbiased, high variance, can be negative per sample
    k2 = ½ (log r)²             biased (it is unbiased for a different f-divergence), low variance
    k3 = (r − 1) − log r        unbiased, always ≥ 0, low variance when π ≈ π_ref

Used in the reward (PPO, RLOO: k1 per token) and in the loss (GRPO: k3 per token).
"""

from __future__ import annotations

from typing import Callable

import torch


def _k1(log_ratio: torch.Tensor) -> torch.Tensor:
    return -log_ratio


def _k2(log_ratio: torch.Tensor) -> torch.Tensor:
    return 0.5 * log_ratio.square()


def _k3(log_ratio: torch.Tensor) -> torch.Tensor:
    return torch.expm1(log_ratio) - log_ratio


KL_ESTIMATORS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"k1": _k1, "k2": _k2, "k3": _k3}


def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str = "k3") -> torch.Tensor:
    """Per-sample estimate of KL(π || π_ref) where the sample was drawn from π.

    log r = ref_logp − logp;  k1 = −log r,  k2 = ½(log r)²,  k3 = (r − 1) − log r.
    Source: Schulman 2020, "Approximating KL Divergence". Elementwise, no reduction and no
    masking (multiply by the mask and reduce in the caller). Gradients flow through both
    inputs; note that the gradient of E_π[k3] taken with the samples held fixed is
    ∇KL(π_ref || π), not ∇KL(π || π_ref) (see tether.theory.grpo_k3_optimum).

    Shape: logp (...), ref_logp (...) -> (...).
    """
    try:
        estimator = KL_ESTIMATORS[kind]
    except KeyError:
        raise ValueError(f"unknown KL estimator {kind!r}; choose one of {sorted(KL_ESTIMATORS)}") from None
    return estimator(ref_logp - logp)


def adaptive_kl_coef(beta: float, kl: float, target: float, horizon: float, n_steps: int) -> float:
    """The adaptive KL controller of Ziegler et al. 2019 ("Fine-Tuning Language Models from Human
    Preferences", Sec. 2.2), which steers the achieved KL toward ``target``:

        e = clip(KL / KL_target − 1, −0.2, 0.2),   β ← β · (1 + K_β · e),   K_β = n_steps / horizon

    ``kl`` is the measured KL(π ‖ π_ref) of the last batch (nats per sequence), ``n_steps`` the
    number of episodes it held. Too much KL raises β, too little lowers it, at most by 20%·K_β.
    """
    error = min(max(kl / target - 1.0, -0.2), 0.2)
    return beta * (1.0 + error * n_steps / horizon)
