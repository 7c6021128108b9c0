"""The exact tabular harness: every algorithm, run through tether.losses, on a problem whose
optimum is known in closed form.

A "policy" is a softmax over K fixed responses for each of P prompts (logits: an
nn.Parameter of shape (P, K), initialised at log π_ref; no language model). The sequence
log-probability of response k to prompt p is log_softmax(logits)[p, k], which is what the
losses take in place of sequence_logprobs(model(...)). Each run_* function gathers inputs the
way a trainer would and calls the same loss functions; tests check that each lands on its
theoretical optimum (tether.theory). Everything runs in float64 under a fixed seed.

Where a run departs from its named algorithm (in the nanochat spirit, stated up front):
- Episodes are one step (the whole response is one action), so GAE reduces to r − V.
- Learning rates decay linearly to 0 so that stochastic runs settle instead of jittering.
- GRPO runs one optimisation pass per batch (μ = 1), so the k3 term is on-policy; its fixed
  point is tether.theory.grpo_k3_optimum, not π* (the k3 gradient is that of KL(π_ref || π)).
- The "exact" preference runs minimise the population loss: every ordered pair (i, j), i ≠ j,
  weighted by π_ref(i)·π_ref(j)·P(i ≻ j), i.e. pairs drawn from π_ref × π_ref and labelled by P.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Callable, TypeVar

import numpy as np
import torch
from torch import nn

from tether import theory
from tether.losses import (
    PREFERENCE_LOSSES,
    gae,
    grpo_advantages,
    grpo_loss,
    kl_estimate,
    kto_loss,
    ppo_policy_loss,
    ppo_value_loss,
    rloo_advantages,
)

DTYPE = torch.float64
F = TypeVar("F", bound=Callable)


def single_threaded(fn: F) -> F:
    """Run on one intra-op thread (restored afterwards): these tensors are tiny, and on a
    loaded 2-core machine the thread pool's synchronisation costs 10–50× the arithmetic."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        before = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return fn(*args, **kwargs)
        finally:
            torch.set_num_threads(before)

    return wrapper  # type: ignore[return-value]


@dataclass
class TabularProblem:
    """P prompts with K responses each: π_ref, and rewards and/or preferences.

    pi_ref: (P, K) rows sum to 1. rewards: (P, K) or None. preferences: (P, K, K) with
    preferences[p, i, j] = P(y_i ≻ y_j | x_p); derived by Bradley–Terry from rewards if not given.
    """

    pi_ref: np.ndarray
    rewards: np.ndarray | None = None
    preferences: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.pi_ref = np.asarray(self.pi_ref, dtype=np.float64)
        if self.pi_ref.ndim != 2 or not np.allclose(self.pi_ref.sum(-1), 1.0):
            raise ValueError("pi_ref must be (P, K) with rows summing to 1")
        if self.rewards is not None:
            self.rewards = np.asarray(self.rewards, dtype=np.float64)
            if self.rewards.shape != self.pi_ref.shape:
                raise ValueError(f"rewards must have shape {self.pi_ref.shape}")
            if self.preferences is None:
                self.preferences = theory.bt_preferences(self.rewards)
        if self.preferences is None:
            raise ValueError("give rewards, preferences, or both")
        self.preferences = np.asarray(self.preferences, dtype=np.float64)

    @property
    def shape(self) -> tuple[int, int]:
        return self.pi_ref.shape  # type: ignore[return-value]

    def tensor(self, name: str) -> torch.Tensor:
        return torch.as_tensor(getattr(self, name), dtype=DTYPE)

    def need_rewards(self) -> torch.Tensor:
        if self.rewards is None:
            raise ValueError("this algorithm needs rewards R (P, K)")
        return self.tensor("rewards")


class TabularPolicy(nn.Module):
    """π_θ(k | p) = softmax(logits[p])_k with logits (P, K) initialised at log π_ref."""

    def __init__(self, pi_ref: np.ndarray) -> None:
        super().__init__()
        self.logits = nn.Parameter(torch.log(torch.as_tensor(pi_ref, dtype=DTYPE)).clone())  # (P, K)

    def log_probs(self) -> torch.Tensor:
        """Shape: (P, K)."""
        return torch.log_softmax(self.logits, dim=-1)

    def probs(self) -> np.ndarray:
        """Shape: (P, K)."""
        return self.log_probs().exp().detach().numpy()


@dataclass
class TabularResult:
    """probs: (P, K) the trained policy. losses: one value per optimiser step."""

    probs: np.ndarray
    losses: list[float] = field(default_factory=list)


def _optimiser(policy: nn.Module, lr: float, steps: int, extra: list[nn.Parameter] = ()) -> tuple:
    opt = torch.optim.Adam([*policy.parameters(), *extra], lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, 1.0 - s / steps))
    return opt, sched


def _sample(logp: torch.Tensor, n: int, gen: torch.Generator) -> torch.Tensor:
    """n responses per prompt from softmax rows, with replacement. Shape: (P, K) -> (P, n)."""
    return torch.multinomial(logp.exp(), n, replacement=True, generator=gen)


def _gather(table: torch.Tensor, responses: torch.Tensor) -> torch.Tensor:
    """table[p, responses[p, i]]. Shape: (P, K), (P, n) -> (P, n)."""
    return torch.gather(table, 1, responses)


@single_threaded
def run_ppo(
    problem: TabularProblem, beta: float, steps: int = 300, samples: int = 256, epochs: int = 4,
    lr: float = 0.05, clip_eps: float = 0.2, baseline: bool = True, seed: int = 0,
) -> TabularResult:
    """PPO with the KL in the reward: r = R − β·k1, A = GAE(r, V) = r − V for one-step episodes.

    V is a learned per-prompt baseline (P,) trained with ppo_value_loss, or 0 when ``baseline``
    is False (value clip 10, i.e. effectively off: V starts at 0, far from the returns). Each step
    samples ``samples`` responses per prompt and runs ``epochs`` passes of ppo_policy_loss on
    them. Aims at π* = theory.optimal_policy(π_ref, R, β).
    """
    R = problem.need_rewards()  # (P, K)
    ref = problem.tensor("pi_ref").log()  # (P, K)
    P, _ = problem.shape
    policy = TabularPolicy(problem.pi_ref)
    value = nn.Parameter(torch.zeros(P, dtype=DTYPE))  # (P,)
    opt, sched = _optimiser(policy, lr, steps, [value] if baseline else [])
    gen = torch.Generator().manual_seed(seed)
    mask = torch.ones(P * samples, 1, dtype=DTYPE)  # (N, 1) N = P·samples

    def per_sample(v: torch.Tensor) -> torch.Tensor:  # (P,) -> (N, 1), each prompt's value repeated
        return v.unsqueeze(-1).expand(P, samples).reshape(-1, 1)

    result = TabularResult(policy.probs())
    for _ in range(steps):
        with torch.no_grad():
            y = _sample(policy.log_probs(), samples, gen)  # (P, n)
            old = _gather(policy.log_probs(), y).reshape(-1, 1)  # (N, 1)
            ref_y = _gather(ref, y).reshape(-1, 1)  # (N, 1)
            reward = _gather(R, y).reshape(-1, 1) - beta * kl_estimate(old, ref_y, "k1")  # (N, 1)
            old_v = per_sample(value) if baseline else torch.zeros_like(reward)  # (N, 1)
            adv, returns = gae(reward, old_v, mask)  # (N, 1) each
        for _ in range(epochs):
            logp = _gather(policy.log_probs(), y).reshape(-1, 1)  # (N, 1)
            loss = ppo_policy_loss(logp, old, adv, mask, clip_eps).loss
            if baseline:
                loss = loss + ppo_value_loss(per_sample(value), old_v, returns, mask, clip=10.0).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
        result.losses.append(loss.item())
    result.probs = policy.probs()
    return result


@single_threaded
def run_grpo(
    problem: TabularProblem, beta: float, group_size: int = 8, groups: int = 32, steps: int = 300,
    lr: float = 0.05, clip_eps: float = 0.2, scale: str = "none", seed: int = 0,
) -> TabularResult:
    """GRPO with the k3 KL in the loss: A = grpo_advantages(R, G, scale), one pass of grpo_loss.

    Each step samples ``groups`` groups of ``group_size`` responses per prompt. With
    scale="none" (Dr. GRPO) the fixed point is theory.grpo_k3_optimum(π_ref, R, β, G).
    """
    R = problem.need_rewards()  # (P, K)
    ref = problem.tensor("pi_ref").log()  # (P, K)
    P, _ = problem.shape
    n = groups * group_size
    policy = TabularPolicy(problem.pi_ref)
    opt, sched = _optimiser(policy, lr, steps)
    gen = torch.Generator().manual_seed(seed)
    mask = torch.ones(P * n, 1, dtype=DTYPE)  # (N, 1)
    result = TabularResult(policy.probs())
    for _ in range(steps):
        with torch.no_grad():
            y = _sample(policy.log_probs(), n, gen)  # (P, n); groups are contiguous runs of G
            old = _gather(policy.log_probs(), y).reshape(-1, 1)  # (N, 1)
            adv = grpo_advantages(_gather(R, y).reshape(-1), group_size, scale)  # (N,)
        logp = _gather(policy.log_probs(), y).reshape(-1, 1)  # (N, 1)
        ref_y = _gather(ref, y).reshape(-1, 1)  # (N, 1)
        out = grpo_loss(logp, old, ref_y, adv, mask, clip_eps, beta=beta, aggregation="sequence")
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        sched.step()
        result.losses.append(out.loss.item())
    result.probs = policy.probs()
    return result


@single_threaded
def run_rloo(
    problem: TabularProblem, beta: float, k: int = 4, groups: int = 64, steps: int = 300,
    lr: float = 0.05, seed: int = 0,
) -> TabularResult:
    """RLOO with the KL in the reward: r = R − β·k1, A = rloo_advantages(r, k), REINFORCE.

    The REINFORCE step is ppo_policy_loss at ratio 1 (old_logp = logp detached, one pass), whose
    gradient is −A·∇log π. Aims at π*.
    """
    R = problem.need_rewards()  # (P, K)
    ref = problem.tensor("pi_ref").log()  # (P, K)
    P, _ = problem.shape
    n = groups * k
    policy = TabularPolicy(problem.pi_ref)
    opt, sched = _optimiser(policy, lr, steps)
    gen = torch.Generator().manual_seed(seed)
    mask = torch.ones(P * n, 1, dtype=DTYPE)  # (N, 1)
    result = TabularResult(policy.probs())
    for _ in range(steps):
        with torch.no_grad():
            y = _sample(policy.log_probs(), n, gen)  # (P, n)
        logp = _gather(policy.log_probs(), y).reshape(-1, 1)  # (N, 1)
        with torch.no_grad():
            reward = _gather(R, y).reshape(-1, 1) - beta * kl_estimate(logp, _gather(ref, y).reshape(-1, 1), "k1")
            adv = rloo_advantages(reward.reshape(-1), k).unsqueeze(-1)  # (N, 1)
        loss = ppo_policy_loss(logp, logp.detach(), adv, mask).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        result.losses.append(loss.item())
    result.probs = policy.probs()
    return result


@single_threaded
def run_preference_exact(
    problem: TabularProblem, beta: float, loss: str = "sigmoid", steps: int = 400, lr: float = 0.1,
    label_smoothing: float = 0.0,
) -> TabularResult:
    """Direct preference optimisation on the exact population loss (no sampling).

    Σ_p Σ_{i≠j} π_ref(i)π_ref(j)·P(i ≻ j)·ℓ(i chosen, j rejected), ℓ = PREFERENCE_LOSSES[loss].
    "sigmoid" (DPO) with Bradley–Terry preferences lands on π*; "ipo" on theory.ipo_optimum.
    """
    ref = problem.tensor("pi_ref").log()  # (P, K)
    pref = problem.tensor("preferences")  # (P, K, K)
    P, K = problem.shape
    mu = ref.exp()
    off_diag = ~torch.eye(K, dtype=torch.bool)
    weight = (mu[:, :, None] * mu[:, None, :] * pref)[:, off_diag]  # (P, K(K−1))
    i_idx, j_idx = off_diag.nonzero(as_tuple=True)  # (K(K−1),) each
    fn = PREFERENCE_LOSSES[loss]
    policy = TabularPolicy(problem.pi_ref)
    opt, sched = _optimiser(policy, lr, steps)
    result = TabularResult(policy.probs())
    for _ in range(steps):
        logp = policy.log_probs()  # (P, K)
        out = fn(logp[:, i_idx], logp[:, j_idx], ref[:, i_idx], ref[:, j_idx], beta, label_smoothing)
        total = (out.losses * weight).sum() / P  # losses (P, K(K−1))
        opt.zero_grad()
        total.backward()
        opt.step()
        sched.step()
        result.losses.append(total.item())
    result.probs = policy.probs()
    return result


@single_threaded
def sample_preferences(problem: TabularProblem, pairs: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Pairs y, y' ~ π_ref labelled by P(y ≻ y'), ties (y = y') dropped.

    Returns (chosen, rejected), each (P, pairs) response indices; the dropped ties are
    replaced by resampling so every prompt has exactly ``pairs`` pairs.
    """
    gen = torch.Generator().manual_seed(seed)
    pi_ref = problem.tensor("pi_ref")  # (P, K)
    pref = problem.tensor("preferences")  # (P, K, K)
    a = torch.multinomial(pi_ref, 4 * pairs, replacement=True, generator=gen)  # (P, 4n)
    b = torch.multinomial(pi_ref, 4 * pairs, replacement=True, generator=gen)  # (P, 4n)
    p_idx = torch.arange(pi_ref.size(0)).unsqueeze(-1)  # (P, 1)
    a_wins = torch.rand(a.shape, generator=gen, dtype=DTYPE) < pref[p_idx, a, b]  # (P, 4n)
    chosen, rejected = torch.where(a_wins, a, b), torch.where(a_wins, b, a)
    keep = (a != b).to(torch.int64)
    order = torch.argsort(keep, dim=1, descending=True, stable=True)[:, :pairs]  # first `pairs` non-ties
    if bool((keep.sum(1) < pairs).any()):
        raise ValueError("too many ties to draw the requested pairs; is π_ref nearly deterministic?")
    return torch.gather(chosen, 1, order), torch.gather(rejected, 1, order)


@single_threaded
def run_preference_sampled(
    problem: TabularProblem, beta: float, pairs: int = 4000, loss: str = "sigmoid", steps: int = 400,
    lr: float = 0.1, seed: int = 0,
) -> TabularResult:
    """DPO (or another PREFERENCE_LOSSES variant) on a fixed data set of sampled preferences.

    Full-batch Adam on ``pairs`` pairs per prompt from :func:`sample_preferences`. Lands on the
    optimum of the empirical loss, which approaches π* as ``pairs`` grows.
    """
    chosen, rejected = sample_preferences(problem, pairs, seed)  # (P, n) each
    ref = problem.tensor("pi_ref").log()  # (P, K)
    fn = PREFERENCE_LOSSES[loss]
    policy = TabularPolicy(problem.pi_ref)
    opt, sched = _optimiser(policy, lr, steps)
    result = TabularResult(policy.probs())
    ref_c, ref_r = _gather(ref, chosen), _gather(ref, rejected)  # (P, n) each
    for _ in range(steps):
        logp = policy.log_probs()  # (P, K)
        out = fn(_gather(logp, chosen), _gather(logp, rejected), ref_c, ref_r, beta)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        sched.step()
        result.losses.append(out.loss.item())
    result.probs = policy.probs()
    return result


@single_threaded
def run_kto(
    problem: TabularProblem, beta: float, desirable: np.ndarray, steps: int = 400, lr: float = 0.05,
    desirable_weight: float = 1.0, undesirable_weight: float = 1.0,
) -> TabularResult:
    """KTO on the exact population loss: y ~ π_ref, labelled by ``desirable`` (P, K) bool.

    Σ_p Σ_k π_ref(k)·kto_loss(...)_k / P with the reference point z0 = KL(π_θ || π_ref) of each
    prompt computed exactly (kto_loss detaches it and clamps it at 0).
    """
    ref = problem.tensor("pi_ref").log()  # (P, K)
    labels = torch.as_tensor(desirable, dtype=torch.bool)  # (P, K)
    mu = ref.exp()  # (P, K)
    policy = TabularPolicy(problem.pi_ref)
    opt, sched = _optimiser(policy, lr, steps)
    result = TabularResult(policy.probs())
    P, K = problem.shape
    for _ in range(steps):
        logp = policy.log_probs()  # (P, K)
        z0 = (logp.exp() * (logp - ref)).sum(-1, keepdim=True).expand(P, K)  # (P, K) KL per prompt
        out = kto_loss(logp.reshape(-1), ref.reshape(-1), labels.reshape(-1), z0.reshape(-1), beta,
                       desirable_weight, undesirable_weight)
        total = (out.losses.view(P, K) * mu).sum() / P
        opt.zero_grad()
        total.backward()
        opt.step()
        sched.step()
        result.losses.append(total.item())
    result.probs = policy.probs()
    return result


@single_threaded
def run_bon(problem: TabularProblem, n: int, draws: int = 20000, seed: int = 0) -> TabularResult:
    """Best-of-n: for each draw, sample n responses from π_ref and keep the first of highest R.

    Returns the empirical distribution of the kept response over ``draws`` draws per prompt;
    its exact counterpart is theory.bon_distribution(π_ref, R, n).
    """
    R = problem.need_rewards()  # (P, K)
    P, K = problem.shape
    gen = torch.Generator().manual_seed(seed)
    y = torch.multinomial(problem.tensor("pi_ref"), draws * n, replacement=True, generator=gen)  # (P, draws·n)
    y = y.view(P, draws, n)
    r = torch.gather(R.unsqueeze(1).expand(P, draws, K), 2, y)  # (P, draws, n)
    best = torch.gather(y, 2, r.argmax(-1, keepdim=True)).squeeze(-1)  # (P, draws); argmax takes the first max
    counts = torch.zeros(P, K, dtype=DTYPE).scatter_add_(1, best, torch.ones_like(best, dtype=DTYPE))
    return TabularResult((counts / draws).numpy())
