"""Win-rate of one policy against another under a judge, with a bootstrap interval.

    win-rate(a, b) = mean over prompts x (and paired samples) of 1[J(x, y_a) > J(x, y_b)] + ½·1[J(x, y_a) = J(x, y_b)]

The judge J is any reward function ``(prompts, responses) -> scores`` (tether.rewards): the
gold reward inside the gold world, a reward model, or a callable. Ties count half, so two
identical policies score ½ in expectation. The interval resamples prompts, not samples, since
samples of one prompt are not independent.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch


def _bootstrap(wins: torch.Tensor, resamples: int, seed: int) -> tuple[float, float]:
    """2.5th and 97.5th percentiles of the mean of ``wins`` (N,) over resamples of its entries."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(len(wins), (resamples, len(wins)), generator=g)
    rates = wins[idx].mean(1)
    return rates.quantile(0.025).item(), rates.quantile(0.975).item()


def win_rate(scores_a: Sequence[float], scores_b: Sequence[float], *, resamples: int = 1000,
             seed: int = 0) -> tuple[float, tuple[float, float]]:
    """Fraction of prompts where a's response out-scores b's (ties count half), and a 95% interval.

    ``scores_a[i]`` and ``scores_b[i]`` are a judge's scores of the two responses to prompt i.
    The interval is the 2.5th and 97.5th percentiles of the rate over bootstrap resamples of prompts.
    """
    a, b = torch.as_tensor(scores_a, dtype=torch.float64), torch.as_tensor(scores_b, dtype=torch.float64)
    wins = (a > b).double() + 0.5 * (a == b).double()  # (N,)
    return wins.mean().item(), _bootstrap(wins, resamples, seed)


class PolicyWinRate(NamedTuple):
    """Result of :func:`policy_win_rate`; counts are over all N·K comparisons.

    rate: win-rate of policy a against policy b, ties counting half
    interval: 95% bootstrap interval of ``rate`` (resampling prompts)
    wins, ties, losses: comparisons a won, tied and lost
    mean_a, mean_b: mean judge score of each policy's samples
    comparisons: N prompts × K samples
    """

    rate: float
    interval: tuple[float, float]
    wins: int
    ties: int
    losses: int
    mean_a: float
    mean_b: float
    comparisons: int


def policy_win_rate(policy_a, policy_b, tokenizer, prompts: Sequence[str],
                    judge: Callable[[Sequence[str], Sequence[str]], torch.Tensor], *, samples: int = 1,
                    max_new_tokens: int = 64, seed: int = 0, tokenizer_b=None, resamples: int = 1000) -> PolicyWinRate:
    """Sample ``samples`` responses per prompt from each policy (temperature 1) and compare them under ``judge``.

    Sample k of a is compared with sample k of b on the same prompt; a prompt's win is the mean
    over its K comparisons, and the interval resamples prompts. ``tokenizer_b`` defaults to
    ``tokenizer`` (two policies from one pipeline share it).
    """
    from tether.rollout import generate

    if samples < 1 or not prompts:
        raise ValueError("policy_win_rate needs at least one prompt and one sample per prompt")
    n = len(prompts)
    repeated = [p for p in prompts for _ in range(samples)]  # (N·K,), sample k of prompt i at i·K + k
    ya = generate(policy_a, tokenizer, repeated, max_new_tokens=max_new_tokens, seed=seed)
    yb = generate(policy_b, tokenizer_b or tokenizer, repeated, max_new_tokens=max_new_tokens, seed=seed)
    sa = torch.as_tensor(judge(repeated, ya), dtype=torch.float64)  # (N·K,)
    sb = torch.as_tensor(judge(repeated, yb), dtype=torch.float64)
    wins = (sa > sb).double() + 0.5 * (sa == sb).double()
    per_prompt = wins.view(n, samples).mean(1)  # (N,)
    return PolicyWinRate(
        rate=per_prompt.mean().item(), interval=_bootstrap(per_prompt, resamples, seed),
        wins=int((sa > sb).sum()), ties=int((sa == sb).sum()), losses=int((sa < sb).sum()),
        mean_a=sa.mean().item(), mean_b=sb.mean().item(), comparisons=n * samples)


def fit_logistic(x: torch.Tensor, y: torch.Tensor, *, ridge: float = 1e-4, iterations: int = 50) -> torch.Tensor:
    """Logistic regression with soft labels by Newton's method (IRLS).

    Minimises Σ_i BCE(y_i, σ(x_i·θ)) + ½·ridge·‖θ‖², y_i ∈ [0, 1] (a tie is ½). The small ridge keeps
    θ finite when the outcomes are separable. Shape: x (N, D), y (N,) -> θ (D,).
    """
    x, y = x.double(), y.double()
    theta = torch.zeros(x.shape[1], dtype=torch.float64)
    eye = torch.eye(x.shape[1], dtype=torch.float64)
    for _ in range(iterations):
        p = torch.sigmoid(x @ theta)
        grad = x.T @ (p - y) + ridge * theta
        hess = (x * (p * (1 - p)).unsqueeze(1)).T @ x + ridge * eye
        step = torch.linalg.solve(hess, grad)
        theta = theta - step
        if step.abs().max() < 1e-10:
            break
    return theta


class LCWinRate(NamedTuple):
    """Length-controlled win-rate (see :func:`length_controlled_win_rate`).

    rate: σ(θ0), the predicted win-rate at zero length difference
    interval: 95% bootstrap interval of ``rate`` (resampling prompts)
    length_coef: θ1, how strongly the outcome follows the (tanh-squashed, standardised) length difference
    raw_rate: the plain win-rate of the same outcomes, for comparison
    """

    rate: float
    interval: tuple[float, float]
    length_coef: float
    raw_rate: float


def length_controlled_win_rate(outcomes: Sequence[float], len_a: Sequence[float], len_b: Sequence[float], *,
                               resamples: int = 200, seed: int = 0) -> LCWinRate:
    """The win-rate a would have against b if their responses were of equal length.

        P(a ≻ b | x_i) = σ(θ0 + θ1 · tanh((ℓ_a,i − ℓ_b,i) / sd(ℓ_a − ℓ_b))),   LC win-rate = σ(θ0)

    The idea of AlpacaEval's length-controlled win-rate (Dubois et al. 2024, "Length-Controlled
    AlpacaEval"): regress the judge's preference on the standardised, tanh-squashed length
    difference and read the fit at zero difference. AlpacaEval's GLM also has instruction-difficulty
    terms fitted across many models; with one pair of policies only the intercept and length term
    remain. ``outcomes`` are 1 / ½ / 0 per prompt (ties enter as soft labels of ½). When every
    length difference is the same there is nothing to control for and the rate is the raw one.
    """
    y = torch.as_tensor(outcomes, dtype=torch.float64)
    diff = torch.as_tensor(len_a, dtype=torch.float64) - torch.as_tensor(len_b, dtype=torch.float64)
    if len(y) == 0 or len(y) != len(diff):
        raise ValueError(f"length_controlled_win_rate: {len(y)} outcomes and {len(diff)} length differences")
    raw = y.mean().item()
    sd = diff.std().item() if len(diff) > 1 else 0.0
    if not sd > 0:
        return LCWinRate(raw, _bootstrap(y, resamples, seed), 0.0, raw)
    x = torch.stack([torch.ones_like(diff), torch.tanh(diff / sd)], 1)  # (N, 2)
    theta = fit_logistic(x, y)
    g = torch.Generator().manual_seed(seed)
    rates = []
    for _ in range(resamples):
        idx = torch.randint(len(y), (len(y),), generator=g)
        rates.append(torch.sigmoid(fit_logistic(x[idx], y[idx])[0]).item())
    r = torch.tensor(rates, dtype=torch.float64)
    return LCWinRate(torch.sigmoid(theta[0]).item(), (r.quantile(0.025).item(), r.quantile(0.975).item()),
                     theta[1].item(), raw)


def outcome_win_rate(outcomes: Sequence[float], *, resamples: int = 1000, seed: int = 0) -> tuple[float, tuple[float, float]]:
    """Mean of per-prompt outcomes (1 win, ½ tie, 0 loss) and its 95% bootstrap interval over prompts."""
    y = torch.as_tensor(outcomes, dtype=torch.float64)
    if len(y) == 0:
        raise ValueError("outcome_win_rate: no outcomes")
    return y.mean().item(), _bootstrap(y, resamples, seed)
