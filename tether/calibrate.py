"""``tether calibrate-beta``: do not pick β by feel — measure KL and win-rate for each β.

For each β in a list, a short training (DPO or PPO on a language model, or the exact tabular
harness) produces a policy; tether measures its achieved KL(π ‖ π_ref) and its win-rate against the
reference under a judge, plots the frontier (win-rate and reward against KL), and recommends the
β with the best win-rate whose KL stays within the user's budget. On the tabular harness the
closed form π* = π_ref·exp(R/β)/Z gives the same frontier exactly, which is the check that the
measurement is right.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from tether.rollout import SamplingConfig
from tether import theory
from tether.config import check, check_fields, flag, group, opt
from tether.errors import ConfigError
from tether.io import write_json
from tether.loop import TrainConfig

log = logging.getLogger("tether.calibrate")
METHODS = ("dpo", "ppo", "tabular")


def _short_training() -> TrainConfig:
    return TrainConfig(steps=60, batch_size=16, lr=5e-4, warmup_steps=5, eval_every=0, save_every=0)


@dataclass
class CalibrateConfig:
    method: str = opt("dpo", "dpo | ppo (short trainings of a language model) | tabular (the exact harness)")
    betas: str = opt("0.03,0.1,0.3,1", "comma-separated β values to try")
    kl_budget: float = opt(2.0, "largest acceptable KL(π‖π_ref) in nats; the best win-rate within it is recommended")
    model: str = opt("", "dpo/ppo: the SFT folder, both the policy's start and the reference")
    data: str = opt("", "dpo: preference data for the trainings; ppo: training prompts")
    reward: str = opt("", "ppo: the reward trained against, gold or a reward-model folder (see tether.rewards; "
                          "empty: gold); tabular: R(y) of each response (empty: 1,0.5,-1)")
    rollout_batch: int = opt(64, "ppo: prompts sampled per iteration (--steps counts iterations)")
    prompts: str = opt("", "dpo/ppo: held-out prompts (a file with a prompt field) for KL and win-rate")
    judge: str = opt("gold", "dpo/ppo: the win-rate judge: gold or a reward-model folder (see tether.rewards)")
    eval_prompts: int = opt(64, "dpo/ppo: held-out prompts sampled for each measurement")
    max_new_tokens: int = opt(48, "dpo/ppo: longest sampled response")
    sft: str = opt("0.5,0.3,0.2", "tabular: π_SFT over the responses")
    out: str = opt("runs/calibrate", "output folder: frontier.json and frontier.png")
    train: TrainConfig = group(_short_training)

    def reward_spec(self) -> str:
        """``--reward`` as the method reads it (one option: the tabular R(y), or PPO's reward)."""
        return self.reward or ("1,0.5,-1" if self.method == "tabular" else "gold")

    def beta_list(self) -> list[float]:
        return [float(b) for b in self.betas.split(",") if b.strip()]

    def validate(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"method must be one of {METHODS}, got {self.method!r}")
        betas = _numbers("betas", self.betas)
        if not betas or not all(math.isfinite(b) and b > 0 for b in betas):
            raise ConfigError(f"--betas must be comma-separated numbers > 0, got {self.betas!r}")
        check("kl_budget", self.kl_budget, gt=0)
        check_fields(self, "rollout_batch eval_prompts max_new_tokens", ge=1, integer=True)
        if self.method == "tabular":
            sft, reward = _numbers("sft", self.sft), _numbers("reward", self.reward_spec())
            if len(sft) < 2 or not all(math.isfinite(p) and p > 0 for p in sft) or abs(sum(sft) - 1) > 1e-6:
                raise ConfigError(f"--sft must be two or more probabilities > 0 that sum to 1, got {self.sft!r}")
            if len(reward) != len(sft) or not all(math.isfinite(r) for r in reward):
                raise ConfigError(f"--reward must be {len(sft)} finite numbers (one per response of --sft), "
                                  f"got {self.reward_spec()!r}")
        else:
            self.train.validate()
        if self.method != "tabular" and not (self.model and self.data and self.prompts):
            raise ConfigError(f"--model, --data and --prompts are required with --method {self.method}")


def _numbers(name: str, text: str) -> list[float]:
    """The comma-separated numbers of option ``name``; a ConfigError naming it if one is not a number."""
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"{flag(name)} must be comma-separated numbers, got {text!r}") from None


@dataclass
class Point:
    """One β's measurement."""

    beta: float
    kl: float
    win_rate: float
    reward: float
    kl_stderr: float = 0.0
    win_low: float = float("nan")
    win_high: float = float("nan")


def recommend(points: list[Point], kl_budget: float) -> Point | None:
    """The point with the highest win-rate among those within the KL budget (None if none is)."""
    within = [p for p in points if p.kl <= kl_budget]
    return max(within, key=lambda p: (p.win_rate, -p.kl)) if within else None


# --- the tabular harness ------------------------------------------------------------------


def tabular_win_rate(pi: np.ndarray, pi_ref: np.ndarray, rewards: np.ndarray) -> float:
    """P(R(y) > R(y')) + ½·P(R(y) = R(y')) for y ~ π, y' ~ π_ref: the exact win-rate under the reward judge."""
    beats = (rewards[:, None] > rewards[None, :]) + 0.5 * (rewards[:, None] == rewards[None, :])  # (K, K)
    return float(pi @ beats @ pi_ref)


def tabular_point(beta: float, pi: np.ndarray, pi_ref: np.ndarray, rewards: np.ndarray) -> Point:
    return Point(beta, float(theory.kl_divergence(pi, pi_ref)), tabular_win_rate(pi, pi_ref, rewards),
                 float(theory.expected_reward(pi, rewards)))


def tabular_frontier(cfg: CalibrateConfig) -> tuple[list[Point], list[Point]]:
    """(measured, closed form): DPO on exact Bradley–Terry preferences at each β, and π* at each β."""
    from tether.tabular import TabularProblem, run_preference_exact

    pi_ref = np.array([float(v) for v in cfg.sft.split(",")])
    rewards = np.array([float(v) for v in cfg.reward_spec().split(",")])
    problem = TabularProblem(pi_ref[None], rewards[None])
    measured, exact = [], []
    for beta in cfg.beta_list():
        pi = run_preference_exact(problem, beta, steps=600).probs[0]
        measured.append(tabular_point(beta, pi, pi_ref, rewards))
        exact.append(tabular_point(beta, theory.optimal_policy(pi_ref, rewards, beta), pi_ref, rewards))
    return measured, exact


# --- language models ----------------------------------------------------------------------


def train_at(cfg: CalibrateConfig, beta: float) -> Path:
    """One short training at ``beta`` from ``cfg.model`` (DPO on preferences, or PPO on prompts)."""
    out = str(Path(cfg.out) / f"beta-{beta:g}")
    if cfg.method == "ppo":
        from tether.trainers.ppo import PPOConfig, run_ppo

        return run_ppo(PPOConfig(model=cfg.model, prompts=cfg.data, reward=cfg.reward_spec(), beta=beta, out=out,
                                 rollout_batch=cfg.rollout_batch, overwrite=True,
                                 sampling=SamplingConfig(max_new_tokens=cfg.max_new_tokens, gen_batch_size=32),
                                 train=replace(cfg.train, eval_every=0, save_every=0)))
    from tether.trainers.dpo import DPOConfig, run_dpo

    return run_dpo(DPOConfig(model=cfg.model, data=cfg.data, beta=beta, out=out, overwrite=True, kl_prompts=0,
                             train=replace(cfg.train)))  # KL measured by the caller


def lm_frontier(cfg: CalibrateConfig) -> list[Point]:
    """A short training per β from ``cfg.model``, then KL and win-rate on held-out prompts."""
    import random

    from tether.data import load_prompts
    from tether.instruments.kl import sampled_kl
    from tether.instruments.winrate import win_rate
    from tether.models import load_model, load_tokenizer
    from tether.rewards import load_reward
    from tether.rollout import generate

    prompts = [r.prompt for r in load_prompts(cfg.prompts)]
    prompts = random.Random(cfg.train.seed).sample(prompts, min(cfg.eval_prompts, len(prompts)))
    tokenizer, reference = load_tokenizer(cfg.model), load_model(cfg.model)
    judge = load_reward(cfg.judge)
    base = generate(reference, tokenizer, prompts, max_new_tokens=cfg.max_new_tokens, seed=cfg.train.seed + 1)
    base_scores = judge(prompts, base)
    points = []
    for beta in cfg.beta_list():
        policy = load_model(train_at(cfg, beta))
        est = sampled_kl(policy, reference, tokenizer, prompts, max_new_tokens=cfg.max_new_tokens, seed=cfg.train.seed)
        scores = judge(prompts, est.responses)
        rate, (lo, hi) = win_rate(scores.tolist(), base_scores.tolist())
        points.append(Point(beta, est.kl, rate, scores.mean().item(), est.stderr, lo, hi))
        log.info("β=%g: KL %.3f ± %.3f, win-rate %.3f [%.3f, %.3f]", beta, est.kl, est.stderr, rate, lo, hi)
    return points


# --- report -------------------------------------------------------------------------------


def plot(points: list[Point], path: Path, closed_form: list[Point] | None = None) -> Path:
    """Win-rate and reward against KL, one marker per β (and the closed form as a line)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, field, label in ((axes[0], "win_rate", "win-rate against the reference"), (axes[1], "reward", "mean reward")):
        if closed_form:
            ax.plot([p.kl for p in closed_form], [getattr(p, field) for p in closed_form], "-", color="grey",
                    label="closed form π*")
        ax.plot([p.kl for p in points], [getattr(p, field) for p in points], "o", color="C0", label="measured")
        for p in points:
            ax.annotate(f"β={p.beta:g}", (p.kl, getattr(p, field)), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_xlabel("KL(π ‖ π_ref), nats")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("β calibration: what each β buys, and at what distance from the reference")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def run_calibrate(cfg: CalibrateConfig) -> dict:
    """Measure every β, write ``frontier.json`` and ``frontier.png``, and return the summary."""
    from tether.io import check_folder

    cfg.validate()
    out = Path(cfg.out)
    check_folder(out)  # a file in the way is named before anything runs
    closed = None
    if cfg.method == "tabular":
        points, closed = tabular_frontier(cfg)
    else:
        points = lm_frontier(cfg)  # each β's run is its own tether folder under out (created as it starts)
    out.mkdir(parents=True, exist_ok=True)
    best = recommend(points, cfg.kl_budget)
    summary = {"config": asdict(cfg), "points": [asdict(p) for p in points],
               "closed_form": [asdict(p) for p in closed] if closed else None,
               "recommended_beta": best.beta if best else None, "kl_budget": cfg.kl_budget}
    write_json(out / "frontier.json", summary)
    plot(points, out / "frontier.png", closed)
    return summary


def format_summary(summary: dict) -> str:
    rows = [f"  {'β':>8}{'KL':>10}{'win-rate':>10}{'reward':>10}" + ("{:>14}".format("π* KL") if summary["closed_form"] else "")]
    for i, p in enumerate(summary["points"]):
        line = f"  {p['beta']:>8g}{p['kl']:>10.4f}{p['win_rate']:>10.3f}{p['reward']:>10.3f}"
        if summary["closed_form"]:
            line += f"{summary['closed_form'][i]['kl']:>14.4f}"
        rows.append(line)
    best = summary["recommended_beta"]
    rows.append(f"  recommended β = {best:g} (the best win-rate with KL ≤ {summary['kl_budget']:g} nats)" if best is not None
                else f"  no β kept KL within {summary['kl_budget']:g} nats: try larger β")
    return "\n".join(rows)


