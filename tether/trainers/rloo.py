"""RLOO: REINFORCE with a leave-one-out baseline (Ahmadian et al. 2024), in the RL loop (tether.loop.rl).

It is the critic-free stage of trainers/grpo.py with three choices of its own:

- the KL to the reference enters the reward, not the loss: r' = r − β Σ_t kl_t per response, kl_t
  the chosen estimator of log π_old − log π_ref (k1 by default);
- the advantage of sample i of a prompt is r'_i minus the mean of the other k − 1 samples' r'
  (losses.rloo_advantages);
- the loss is losses.grpo_loss with no KL term and "constant" aggregation by default, whose gradient
  at ρ = 1 is the leave-one-out REINFORCE estimator (1/B) Σ_i Â_i ∇log π(y_i|x) divided by
  max_new_tokens. The paper takes one REINFORCE step per batch; with ``inner_iters`` > 1 the PPO clip
  keeps later steps near π_old (as TRL's RLOO does).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from tether.config import opt
from tether.errors import ConfigError
from tether.losses import KL_ESTIMATORS, kl_estimate, rloo_advantages
from tether.rewards import RewardFn
from tether.trainers.grpo import CriticFree, CriticFreeConfig, run_critic_free


@dataclass
class RLOOConfig(CriticFreeConfig):
    out: str = opt("runs/rloo", "output folder")
    beta: float = opt(0.05, "β of the per-token KL penalty summed into the sequence reward (0: no KL)")
    kl_estimator: str = opt("k1", "per-token KL estimator in the reward: k1 | k2 | k3")
    aggregation: str = opt("constant", "loss aggregation: constant (REINFORCE: sum over tokens) | sequence | token")

    def validate(self) -> None:
        super().validate()
        if self.kl_estimator not in KL_ESTIMATORS:
            raise ConfigError(f"kl_estimator must be one of {sorted(KL_ESTIMATORS)}, got {self.kl_estimator!r}")


class RLOO(CriticFree):
    name = "rloo"
    cfg: RLOOConfig

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.kl_in_loss = False  # the KL is in the reward

    def signal(self, rewards: torch.Tensor, old_logp, ref_logp, mask) -> torch.Tensor:
        """r' = r − β Σ_t kl_t, (B,)."""
        if ref_logp is None:
            return rewards
        return rewards - self.cfg.beta * (kl_estimate(old_logp, ref_logp, self.cfg.kl_estimator) * mask).sum(-1)

    def advantages(self, signal: torch.Tensor) -> torch.Tensor:
        return rloo_advantages(signal, self.cfg.group_size)

    def loss_args(self) -> dict:
        return {"clip_eps": self.cfg.clip_eps, "clip_eps_high": None, "beta": 0.0, "aggregation": self.cfg.aggregation}


def run_rloo(cfg: RLOOConfig, reward_fn: RewardFn | None = None) -> Path:
    """RLOO from ``cfg.model`` on ``cfg.prompts`` against ``cfg.reward`` or ``reward_fn``; returns the output folder."""
    return run_critic_free(cfg, RLOO, reward_fn)
