"""Closed forms of the KL-regularised objective and its relatives, in pure NumPy.

    J(π) = E_{y~π}[R(y)] − β · KL(π || π_ref)
    π*(y) = π_ref(y) · exp(R(y)/β) / Z,   Z = Σ_y π_ref(y) · exp(R(y)/β)

(Ziegler et al. 2019, Sec. 2; Rafailov et al. 2023, eq. 4; Korbak et al. 2022.)

Every function takes distributions over a finite response set along the LAST axis, so a
(K,) vector is one prompt and a (P, K) array is P prompts. Work is done in log space, so
β → 0 (all mass on argmax R, ties shared in proportion to π_ref) and β → ∞ (π_ref) are
reached without overflow; ``beta=0`` and ``beta=inf`` are accepted and give those limits.
Responses with π_ref(y) = 0 keep π*(y) = 0 for every β.
"""

from __future__ import annotations

import math

import numpy as np
from numpy.typing import ArrayLike

__all__ = [
    "bon_distribution",
    "bon_kl",
    "bt_preferences",
    "expected_reward",
    "grpo_k3_optimum",
    "ipo_optimum",
    "kl_divergence",
    "kto_tabular_limit",
    "log_partition",
    "optimal_policy",
    "total_variation",
]


def _check(pi_ref: ArrayLike, rewards: ArrayLike, beta: float) -> tuple[np.ndarray, np.ndarray, float]:
    p = np.asarray(pi_ref, dtype=np.float64)
    r = np.asarray(rewards, dtype=np.float64)
    if p.shape != r.shape:
        raise ValueError(f"pi_ref has shape {p.shape} but rewards has shape {r.shape}")
    if np.any(p < 0) or not np.allclose(p.sum(-1), 1.0, atol=1e-6):
        raise ValueError("pi_ref must be non-negative and sum to 1 along the last axis")
    beta = float(beta)
    if math.isnan(beta) or beta < 0:
        raise ValueError(f"beta must be >= 0 (0 and inf allowed), got {beta}")
    return p, r, beta


def _log(p: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore"):
        return np.log(p)


def _logsumexp(a: np.ndarray) -> np.ndarray:
    """log Σ exp(a) over the last axis; rows of all −inf give −inf."""
    m = np.max(a, axis=-1, keepdims=True)  # (..., 1)
    m_safe = np.where(np.isfinite(m), m, 0.0)
    with np.errstate(divide="ignore"):
        return np.log(np.exp(a - m_safe).sum(-1)) + m_safe[..., 0]


def _argmax_share(p: np.ndarray, r: np.ndarray) -> np.ndarray:
    """The β → 0 limit: π_ref restricted to the reward maximisers within its support, renormalised."""
    r_supp = np.where(p > 0, r, -np.inf)  # (..., K)
    top = r_supp == r_supp.max(-1, keepdims=True)  # (..., K)
    mass = np.where(top, p, 0.0)
    return mass / mass.sum(-1, keepdims=True)


def optimal_policy(pi_ref: ArrayLike, rewards: ArrayLike, beta: float) -> np.ndarray:
    """π*(y) = π_ref(y) · exp(R(y)/β) / Z, the maximiser of E_π[R] − β·KL(π || π_ref).

    Source: Ziegler et al. 2019; Rafailov et al. 2023, eq. 4. β = 0 gives π_ref restricted to
    argmax R (ties share in proportion to π_ref); β = inf gives π_ref.
    Shape: pi_ref (..., K), rewards (..., K) -> (..., K).
    """
    p, r, beta = _check(pi_ref, rewards, beta)
    if beta == 0.0:
        return _argmax_share(p, r)
    if math.isinf(beta):
        return p.copy()
    logits = _scaled_logits(p, r, beta)  # (..., K)
    return np.exp(logits - _logsumexp(logits)[..., None])


def _scaled_logits(p: np.ndarray, r: np.ndarray, beta: float) -> np.ndarray:
    """log π_ref + (R − max R)/β: the shift keeps every exponent ≤ 0, so tiny β cannot overflow."""
    r_supp = np.where(p > 0, r, -np.inf)  # (..., K)
    top = r_supp.max(-1, keepdims=True)  # (..., 1)
    with np.errstate(over="ignore"):
        return _log(p) + np.where(p > 0, r - top, 0.0) / beta


def log_partition(pi_ref: ArrayLike, rewards: ArrayLike, beta: float) -> np.ndarray:
    """log Z = log Σ_y π_ref(y) · exp(R(y)/β), computed by log-sum-exp.

    β = inf gives log Z = 0 (Z → Σ π_ref = 1). β = 0 gives the limit of log Z: +inf when the
    best supported reward is positive, −inf when negative, log π_ref(argmax) when it is 0.
    Shape: pi_ref (..., K), rewards (..., K) -> (...).
    """
    p, r, beta = _check(pi_ref, rewards, beta)
    if math.isinf(beta):
        return np.zeros(p.shape[:-1])
    if beta == 0.0:
        r_supp = np.where(p > 0, r, -np.inf)
        best = r_supp.max(-1)  # (...)
        at_zero = _log(np.where(r_supp == best[..., None], p, 0.0).sum(-1))
        return np.where(best > 0, np.inf, np.where(best < 0, -np.inf, at_zero))
    top = np.where(p > 0, r, -np.inf).max(-1)  # (...)
    with np.errstate(over="ignore"):
        return _logsumexp(_scaled_logits(p, r, beta)) + top / beta


def kl_divergence(p: ArrayLike, q: ArrayLike) -> np.ndarray:
    """KL(p || q) = Σ_y p(y) · log(p(y)/q(y)), with 0·log 0 = 0 and +inf where p > 0 = q.

    Shape: p (..., K), q (..., K) -> (...).
    """
    p = np.asarray(p, dtype=np.float64)
    q = np.asarray(q, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, p * (_log(p) - _log(q)), 0.0)  # (..., K)
    return terms.sum(-1)


def expected_reward(p: ArrayLike, rewards: ArrayLike) -> np.ndarray:
    """E_{y~p}[R(y)] = Σ_y p(y) R(y). Shape: p (..., K), rewards (..., K) -> (...)."""
    p = np.asarray(p, dtype=np.float64)
    r = np.asarray(rewards, dtype=np.float64)
    return np.where(p > 0, p * r, 0.0).sum(-1)


def total_variation(p: ArrayLike, q: ArrayLike) -> np.ndarray:
    """TV(p, q) = ½ Σ_y |p(y) − q(y)|. Shape: (..., K), (..., K) -> (...)."""
    return 0.5 * np.abs(np.asarray(p, dtype=np.float64) - np.asarray(q, dtype=np.float64)).sum(-1)


def bon_distribution(pi_ref: ArrayLike, rewards: ArrayLike, n: int) -> np.ndarray:
    """Exact distribution of best-of-n: draw n responses from π_ref, keep the one of highest R.

    With F(r) = π_ref(R(Y) ≤ r) and F(r⁻) = π_ref(R(Y) < r), the kept reward equals r with
    probability F(r)^n − F(r⁻)^n. Within a tie the kept response is a draw from π_ref
    conditioned on that reward level (true for any tie-break that ignores the response's
    identity, e.g. "first of the tied samples"), so

        π_BoN(y) = π_ref(y) / m(R(y)) · (F(R(y))^n − F(R(y)⁻)^n),   m(r) = π_ref(R(Y) = r).

    Without ties this is Beirami et al. 2024, Lemma 1. Shape: pi_ref (..., K), rewards (..., K) -> (..., K).
    """
    p, r, _ = _check(pi_ref, rewards, 1.0)
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    flat_p, flat_r = p.reshape(-1, p.shape[-1]), r.reshape(-1, r.shape[-1])  # (N, K)
    out = np.zeros_like(flat_p)
    for row, (pr, rr) in enumerate(zip(flat_p, flat_r)):
        levels = np.unique(rr)  # sorted distinct rewards
        level_of = np.searchsorted(levels, rr)  # (K,)
        mass = np.bincount(level_of, weights=pr, minlength=len(levels))  # (L,) m(r)
        f_le = np.minimum(np.cumsum(mass), 1.0)  # (L,) F(r)
        f_lt = np.clip(f_le - mass, 0.0, None)  # (L,) F(r⁻)
        p_level = f_le**n - f_lt**n  # (L,) P(kept reward = r)
        share = np.divide(pr, mass[level_of], out=np.zeros_like(pr), where=mass[level_of] > 0)
        out[row] = share * p_level[level_of]
    return out.reshape(p.shape)


def bon_kl(n: int) -> float:
    """KL(π_BoN || π_ref) = log n − (n − 1)/n for best-of-n with continuous, tie-free rewards.

    Stiennon et al. 2020, Appendix G.3 (also Hilton & Gao 2022). Beirami et al. 2024 show it is an
    upper bound on the exact KL when the response set is finite; :func:`bon_distribution`
    gives the exact distribution. Shape: scalar.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    return math.log(n) - (n - 1) / n


def bt_preferences(rewards: ArrayLike) -> np.ndarray:
    """Bradley–Terry probabilities P[i, j] = P(y_i ≻ y_j) = σ(R(y_i) − R(y_j)).

    Bradley & Terry 1952; Christiano et al. 2017, eq. 1. Shape: rewards (..., K) -> (..., K, K).
    """
    r = np.asarray(rewards, dtype=np.float64)
    diff = r[..., :, None] - r[..., None, :]  # (..., K, K)
    return 0.5 * (1.0 + np.tanh(0.5 * diff))  # σ(diff) without overflow


def ipo_optimum(pi_ref: ArrayLike, preferences: ArrayLike, beta: float, mu: ArrayLike | None = None) -> np.ndarray:
    """The fixed point of IPO: π(y) ∝ π_ref(y) · exp(p(y ≻ μ)/β), p(y ≻ μ) = Σ_y' μ(y') P(y ≻ y').

    Azar et al. 2024 (ΨPO with Ψ = identity), eqs. 6–8 and Sec. 5. Derivation for the expected
    IPO loss over pairs (y, y') ~ μ × μ labelled by P: with g(y) = log π(y)/π_ref(y) and
    h = g(y) − g(y'), a pair costs (h − 1/(2β))² if y wins and (h + 1/(2β))² if y' wins, i.e.
    (h − (P(y≻y') − ½)/β)² in expectation up to a constant. Setting the gradient in g(a) to zero
    gives Σ_y' μ(y')(g(a) − g(y') − (P(a≻y') − ½)/β) = 0, so g(a) = p(a ≻ μ)/β + const
    for every a with μ(a) > 0. When μ covers π_ref's support this is the unique minimiser.
    μ defaults to π_ref (pairs sampled from the reference policy).
    Shape: pi_ref (..., K), preferences (..., K, K), mu (..., K) -> (..., K).
    """
    p = np.asarray(pi_ref, dtype=np.float64)
    pref = np.asarray(preferences, dtype=np.float64)
    if pref.shape != p.shape + p.shape[-1:]:
        raise ValueError(f"preferences must have shape {p.shape + p.shape[-1:]}, got {pref.shape}")
    m = p if mu is None else np.asarray(mu, dtype=np.float64)
    win_vs_mu = (pref * m[..., None, :]).sum(-1)  # (..., K)
    return optimal_policy(p, win_vs_mu, beta)


def grpo_k3_optimum(pi_ref: ArrayLike, rewards: ArrayLike, beta: float, group_size: int | None = None) -> np.ndarray:
    """Fixed point of GRPO with the k3 KL in the loss and unscaled advantages (Dr. GRPO's "none").

    Differentiating the k3 term k3 = π_ref/π − 1 − log(π_ref/π) on samples y ~ π gives
    E_π[(1 − π_ref/π)∇log π] = −Σ_y π_ref(y)∇log π(y) = ∇KL(π_ref || π): the REVERSE KL.
    The group-mean baseline includes the sample itself, which scales the policy gradient by
    c = 1 − 1/G. The expected gradient therefore vanishes at the maximiser of
        c · E_π[R] − β · KL(π_ref || π),
    whose Lagrange condition gives π(y) = β·π_ref(y) / (λ − c·R(y)) with λ chosen so that
    Σ π = 1 (λ ∈ (c·max R, c·max R + β]; found by bisection). This is NOT π* in general;
    it coincides with π* only to first order in R/β. c = 1 when group_size is None.
    Shape: pi_ref (..., K), rewards (..., K) -> (..., K).
    """
    p, r, beta = _check(pi_ref, rewards, beta)
    c = 1.0 if group_size is None else 1.0 - 1.0 / group_size
    if beta == 0.0:
        return _argmax_share(p, r)
    if math.isinf(beta):
        return p.copy()
    cr = c * np.where(p > 0, r, -np.inf)  # (..., K)
    top = cr.max(-1, keepdims=True)  # (..., 1)
    lo, hi = top.copy(), top + beta
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        with np.errstate(divide="ignore"):
            total = np.where(p > 0, beta * p / np.maximum(mid - cr, 1e-300), 0.0).sum(-1, keepdims=True)
        lo = np.where(total > 1.0, mid, lo)
        hi = np.where(total > 1.0, hi, mid)
    out = np.where(p > 0, beta * p / np.maximum(hi - cr, 1e-300), 0.0)
    return out / out.sum(-1, keepdims=True)


def kto_tabular_limit(pi_ref: ArrayLike, desirable: ArrayLike) -> np.ndarray:
    """Where exact KTO drives a tabular policy: π_ref conditioned on the desirable set D.

    Not a formula from Ethayarajh et al. 2024; derived here for the population KTO loss with
    y ~ π_ref, reference point z0 = KL(π || π_ref) held fixed in each gradient step (as the
    paper does), and a softmax policy. Undesirable terms λ_U(1 − σ(β(z0 − r))) always push
    r(y) = log π(y)/π_ref(y) down, so undesirable mass goes to 0 (logits to −∞). At
    π = π_ref(·|D), r(y) = −log π_ref(D) = KL(π || π_ref) = z0 for every y ∈ D, so all desirable
    terms sit at σ(0) with equal slope and the logit gradient Σ_{k∈D} π_ref(k)(δ_kj − π_j) is 0:
    a stationary point for every β, λ_D, λ_U, reached only in the limit.
    Shape: pi_ref (..., K), desirable (..., K) bool -> (..., K).
    """
    p = np.asarray(pi_ref, dtype=np.float64)
    mass = np.where(np.asarray(desirable, dtype=bool), p, 0.0)
    total = mass.sum(-1, keepdims=True)
    if np.any(total <= 0):
        raise ValueError("every prompt needs a desirable response with π_ref > 0")
    return mass / total
