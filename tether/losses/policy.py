"""Policy-gradient pieces: GAE, whitening, the PPO clip and value losses, GRPO and RLOO.

Conventions for token tensors (B, T): ``mask`` is 1 on the response tokens that the policy
generated and 0 on prompt and padding. The response of each row must be contiguous (a 0
after the 1s ends the episode). A "masked mean" is Σ(x·mask)/Σ mask over the whole batch
(every token weighs the same), unless a docstring says otherwise. Masked positions of every
returned (B, T) tensor are 0.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch

from tether.losses.kl import kl_estimate


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Σ(x·mask)/max(Σ mask, 1) over ``dim`` (all dims when None). Shape: (B, T), (B, T) -> () or reduced."""
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


class GAEOutput(NamedTuple):
    """advantages: (B, T) Â_t. returns: (B, T) Â_t + V_t (the value targets). Both 0 where mask is 0."""

    advantages: torch.Tensor
    returns: torch.Tensor


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0, lam: float = 0.95
) -> GAEOutput:
    """Generalised advantage estimation, vectorised over the batch (one backward pass over T).

        δ_t = r_t + γ·V_{t+1}·m_{t+1} − V_t,   Â_t = δ_t + γλ·m_{t+1}·Â_{t+1}

    Schulman et al. 2016, "High-Dimensional Continuous Control Using GAE", eqs. 11–16. The
    value after the last response token is 0 (the episode ends; no bootstrap). In RLHF the
    reward is usually the per-token −β·KL plus the sequence reward on the last token.
    Shape: rewards (B, T), values (B, T), mask (B, T) -> advantages (B, T), returns (B, T).
    """
    mask = mask.to(values.dtype)
    rewards = rewards * mask  # (B, T)
    values = values * mask  # (B, T)
    B, T = rewards.shape
    next_value = torch.zeros(B, dtype=values.dtype, device=values.device)  # (B,) V_{t+1}·m_{t+1}
    next_adv = torch.zeros_like(next_value)  # (B,) Â_{t+1}·m_{t+1}
    advantages = torch.zeros_like(values)  # (B, T)
    for t in reversed(range(T)):
        delta = rewards[:, t] + gamma * next_value - values[:, t]  # (B,)
        adv = (delta + gamma * lam * next_adv) * mask[:, t]  # (B,)
        advantages[:, t] = adv
        next_value, next_adv = values[:, t], adv
    return GAEOutput(advantages, (advantages + values) * mask)


def gae_reference(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0, lam: float = 0.95
) -> GAEOutput:
    """Plain-loop GAE, Â_t = Σ_l (γλ)^l δ_{t+l} summed directly over each row's response span.

    For tests only: O(B·T²) Python loops. Same conventions as :func:`gae`.
    """
    B, T = rewards.shape
    adv = torch.zeros(B, T, dtype=torch.float64)
    for b in range(B):
        span = [t for t in range(T) if mask[b, t]]
        r = [float(rewards[b, t]) for t in span]
        v = [float(values[b, t]) for t in span] + [0.0]
        deltas = [r[i] + gamma * v[i + 1] - v[i] for i in range(len(span))]
        for i, t in enumerate(span):
            adv[b, t] = sum((gamma * lam) ** l * deltas[i + l] for l in range(len(span) - i))
    adv = adv.to(values.dtype)
    return GAEOutput(adv, (adv + values) * mask.to(values.dtype))


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8,
           total: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """(x − μ)/sqrt(σ² + eps) with μ, σ² the masked mean and (biased) variance over the batch.

    With ``shift_mean=False`` the mean is added back (only the scale changes), as done for
    rewards in Ziegler et al. 2019. Masked positions of the output are 0. ``total`` sums a
    tensor over the whole batch when it is split across processes (e.g. an all-reduce; the
    identity by default), so μ and σ² are those of the whole batch.
    Shape: x (B, T), mask (B, T) -> (B, T).
    """
    if total is None:
        mean = masked_mean(x, mask)  # ()
        var = masked_mean((x - mean).square(), mask)  # ()
    else:
        m = mask.to(x.dtype)
        count = total(m.sum()).clamp(min=1)
        mean = total((x * m).sum()) / count
        var = total(((x - mean).square() * m).sum()) / count
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask.to(x.dtype)


# --- PPO's per-token reward and its diagnostics (Ziegler et al. 2019) ---


def last_token(mask: torch.Tensor) -> torch.Tensor:
    """Index of each row's last response token. Shape: (B, T) -> (B,)."""
    positions = torch.arange(mask.size(1), device=mask.device).expand_as(mask)
    return (positions * mask).argmax(-1)


def shaped_rewards(score: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, beta: float) -> torch.Tensor:
    """r_t = −β·kl_t on every response token, plus the sequence reward on the last one.

    Ziegler et al. 2019, eq. 2. Shape: score (B,), kl (B, T), mask (B, T) -> (B, T).
    """
    rewards = -beta * kl * mask  # (B, T)
    rewards[torch.arange(len(score)), last_token(mask)] += score
    return rewards


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """1 − Var(G − V) / Var(G) over response tokens: 1 is a perfect critic, 0 no better than a constant."""
    var = masked_mean((returns - masked_mean(returns, mask)).square(), mask)
    resid = returns - values
    var_resid = masked_mean((resid - masked_mean(resid, mask)).square(), mask)
    return (1 - var_resid / var.clamp(min=1e-8)).item()



class PolicyLossOutput(NamedTuple):
    """loss: () the scalar to minimise, total / count. clip_fraction: () share of tokens where the clipped
    branch was active (detached). approx_kl: () masked mean of k3 for KL(π_old || π) (detached).
    total: () the per-token losses summed; count: () the response tokens (a step over several
    micro-batches divides the sum of totals by the sum of counts: tether.loop.accumulate)."""

    loss: torch.Tensor
    clip_fraction: torch.Tensor
    approx_kl: torch.Tensor
    total: torch.Tensor
    count: torch.Tensor


def _clipped_surrogate(
    logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, clip_eps: float, clip_eps_high: float | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token −min(ρA, clip(ρ, 1−ε_low, 1+ε_high)A) and whether the clip was active. Shape: (B, T)."""
    high = clip_eps if clip_eps_high is None else clip_eps_high
    ratio = torch.exp(logp - old_logp)  # (B, T)
    unclipped = -advantages * ratio  # (B, T)
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + high)  # (B, T)
    return torch.maximum(unclipped, clipped), (clipped > unclipped)


def ppo_policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float = 0.2,
    clip_eps_high: float | None = None,
) -> PolicyLossOutput:
    """PPO clipped surrogate, L = −masked_mean(min(ρ_t Â_t, clip(ρ_t, 1 − ε, 1 + ε_high) Â_t)).

    ρ_t = π(y_t)/π_old(y_t). Schulman et al. 2017, eq. 7; ε_high ≠ ε is DAPO's clip-higher
    (Yu et al. 2025). The mean runs over all response tokens of the batch.
    Shape: logp (B, T), old_logp (B, T), advantages (B, T), mask (B, T).
    """
    per_token, was_clipped = _clipped_surrogate(logp, old_logp, advantages, clip_eps, clip_eps_high)
    total, count = (per_token * mask.to(per_token.dtype)).sum(), mask.sum()
    clip_fraction = masked_mean(was_clipped.to(logp.dtype), mask).detach()
    approx_kl = masked_mean(kl_estimate(old_logp, logp, "k3"), mask).detach()
    return PolicyLossOutput(total / count.clamp(min=1), clip_fraction, approx_kl, total, count)


class ValueLossOutput(NamedTuple):
    """loss: () the scalar to minimise, total / count. clip_fraction: () share of tokens where the clipped
    value error was the larger one (detached). total: () summed over response tokens; count: () those tokens."""

    loss: torch.Tensor
    clip_fraction: torch.Tensor
    total: torch.Tensor
    count: torch.Tensor


def ppo_value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, clip: float = 0.2
) -> ValueLossOutput:
    """Clipped value loss, L = ½ masked_mean(max((V − G)², (V_old + clip(V − V_old, −c, c) − G)²)).

    The value clipping of Schulman et al.'s PPO baselines, as used by Ziegler et al. 2019 and
    InstructGPT; the ½ makes the gradient V − G. Shape: every input (B, T).
    """
    clipped = old_values + torch.clamp(values - old_values, -clip, clip)  # (B, T)
    err = (values - returns).square()  # (B, T)
    err_clipped = (clipped - returns).square()  # (B, T)
    total, count = 0.5 * (torch.maximum(err, err_clipped) * mask.to(values.dtype)).sum(), mask.sum()
    clip_fraction = masked_mean((err_clipped > err).to(values.dtype), mask).detach()
    return ValueLossOutput(total / count.clamp(min=1), clip_fraction, total, count)


def grpo_advantages(rewards: torch.Tensor, group_size: int, scale: str = "group", eps: float = 1e-6) -> torch.Tensor:
    """Group-relative advantages Â_i = (r_i − mean_group(r)) / s.

    s = std of the group ("group"; Shao et al. 2024, DeepSeekMath, Sec. 4.1.2), std of the
    whole batch ("batch"), or 1 ("none"; Liu et al. 2025, Dr. GRPO). Std is the unbiased one
    (n − 1), plus ``eps``. Groups are contiguous: rows [g·G, (g+1)·G) share a prompt.
    Shape: rewards (B,) with B divisible by group_size -> (B,).
    """
    if group_size < 2 or rewards.numel() % group_size:
        raise ValueError(f"group_size must be >= 2 and divide the batch ({rewards.numel()}), got {group_size}")
    grouped = rewards.view(-1, group_size)  # (B/G, G)
    centered = grouped - grouped.mean(-1, keepdim=True)  # (B/G, G)
    scales: dict[str, Callable[[], torch.Tensor]] = {
        "group": lambda: grouped.std(-1, keepdim=True) + eps,
        "batch": lambda: rewards.std() + eps,
        "none": lambda: torch.ones((), dtype=rewards.dtype, device=rewards.device),
    }
    if scale not in scales:
        raise ValueError(f"unknown scale {scale!r}; choose one of {sorted(scales)}")
    return (centered / scales[scale]()).reshape(-1)


def rloo_advantages(rewards: torch.Tensor, k: int) -> torch.Tensor:
    """REINFORCE leave-one-out: Â_i = r_i − (1/(k−1)) Σ_{j≠i} r_j over the k samples of a prompt.

    Ahmadian et al. 2024, "Back to Basics", eq. 5 (Kool et al. 2019). The baseline does not
    depend on y_i, so the policy gradient stays unbiased. Groups are contiguous rows.
    Shape: rewards (B,) with B divisible by k -> (B,).
    """
    if k < 2 or rewards.numel() % k:
        raise ValueError(f"k must be >= 2 and divide the batch ({rewards.numel()}), got {k}")
    grouped = rewards.view(-1, k)  # (B/k, k)
    baseline = (grouped.sum(-1, keepdim=True) - grouped) / (k - 1)  # (B/k, k)
    return (grouped - baseline).reshape(-1)


def _aggregate_sequence(per_token: torch.Tensor, mask: torch.Tensor, max_tokens: int | None):
    return masked_mean(per_token, mask, dim=-1).sum(), torch.tensor(float(per_token.size(0)))


def _aggregate_token(per_token: torch.Tensor, mask: torch.Tensor, max_tokens: int | None):
    return (per_token * mask.to(per_token.dtype)).sum(), mask.sum().float()


def _aggregate_constant(per_token: torch.Tensor, mask: torch.Tensor, max_tokens: int | None):
    if max_tokens is None:
        raise ValueError('aggregation="constant" needs max_tokens (the generation budget)')
    return (per_token * mask.to(per_token.dtype)).sum() / max_tokens, torch.tensor(float(per_token.size(0)))


# each returns (total, count): the loss of a batch is total / count, that of a step Σ totals / Σ counts
AGGREGATIONS: dict[str, Callable[[torch.Tensor, torch.Tensor, int | None], tuple[torch.Tensor, torch.Tensor]]] = {
    "sequence": _aggregate_sequence,  # GRPO: (1/G) Σ_i (1/|o_i|) Σ_t  (Shao et al. 2024, eq. 3)
    "token": _aggregate_token,  # DAPO: 1/Σ_i|o_i| Σ_i Σ_t  (Yu et al. 2025, eq. 8)
    "constant": _aggregate_constant,  # Dr. GRPO: 1/(G·max_tokens) Σ_i Σ_t  (Liu et al. 2025)
}


def aggregation_count(mask: torch.Tensor, aggregation: str) -> float:
    """The units an aggregation's mean runs over, from the response mask alone (B, T): response tokens
    for "token", rows otherwise (what a step's count is before any forward pass: tether.loop.accumulate)."""
    return float(mask.sum()) if aggregation == "token" else float(mask.size(0))


class GRPOOutput(NamedTuple):
    """loss: () the scalar to minimise, total / count. clip_fraction: () masked share of clipped tokens.
    kl: () masked mean of k3(π || π_ref). total, count: () the aggregation's sum and its units
    (rows, or response tokens for "token"). clip_fraction and kl detached."""

    loss: torch.Tensor
    clip_fraction: torch.Tensor
    kl: torch.Tensor
    total: torch.Tensor
    count: torch.Tensor


def grpo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    ref_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float = 0.2,
    clip_eps_high: float | None = None,
    beta: float = 0.04,
    aggregation: str = "sequence",
    max_tokens: int | None = None,
) -> GRPOOutput:
    """GRPO: L = agg_t[ −min(ρ_t Â, clip(ρ_t, 1 − ε, 1 + ε_high) Â) + β·k3_t ].

    Shao et al. 2024 (DeepSeekMath), eqs. 3–4: the clipped surrogate with one advantage per
    sequence plus β times the k3 estimate (π_ref/π − 1 − log(π_ref/π)) per token inside the
    loss. ``aggregation`` picks the normaliser from AGGREGATIONS: "sequence" (per-sequence
    mean, then mean over sequences; GRPO), "token" (mean over all tokens; DAPO), "constant"
    (sum divided by B·max_tokens; Dr. GRPO). Note: the k3 term's gradient is that of the
    reverse KL(π_ref || π) (see tether.theory.grpo_k3_optimum).
    Shape: logp, old_logp, ref_logp, mask (B, T); advantages (B,) or (B, T).
    """
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation {aggregation!r}; choose one of {sorted(AGGREGATIONS)}")
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(-1)  # (B, 1), broadcast over T
    per_token, was_clipped = _clipped_surrogate(logp, old_logp, advantages, clip_eps, clip_eps_high)  # (B, T)
    kl = kl_estimate(logp, ref_logp, "k3")  # (B, T)
    if beta != 0.0:
        per_token = per_token + beta * kl
    total, count = AGGREGATIONS[aggregation](per_token, mask, max_tokens)
    count = count.to(total.device)
    clip_fraction = masked_mean(was_clipped.to(logp.dtype), mask).detach()
    return GRPOOutput(total / count.clamp(min=1), clip_fraction, masked_mean(kl, mask).detach(), total, count)
