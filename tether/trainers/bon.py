"""Best-of-N: sample N responses from the policy, keep the one the reward likes best. No training.

For each prompt, ``pool`` ≥ N responses are sampled from π_ref (the model given, temperature 1
by default) and scored by the reward (tether.rewards.load_reward). The chosen response is the
highest-reward one among the first N (ties: the first); it goes to ``responses.jsonl``.

The pool also measures what best-of-N costs and buys, exactly, on the empirical distribution
π̂_ref of the pool (identical responses merged, each weighing count / pool):

    π_BoN = tether.theory.bon_distribution(π̂_ref, R, N)    (Beirami et al. 2024, Lemma 1; ties handled)
    measured KL = KL(π_BoN ‖ π̂_ref)                          (tether.theory.kl_divergence)
    expected reward = Σ_y π_BoN(y) R(y)

averaged over prompts, beside the analytic KL log N − (N − 1)/N (tether.theory.bon_kl; Stiennon
et al. 2020), which holds with equality only for tie-free rewards over a continuum of responses
and bounds the KL of a finite set from above (Beirami et al. 2024). Ties — a verifiable reward
takes two values — and repeated responses make the measured KL smaller. The same figures for
every power of two up to N form the curve in ``tether.json``: the expected reward cannot fall
as N grows (N + 1 draws stochastically dominate N).
"""

from __future__ import annotations

import datetime as _dt
import logging
import random
from dataclasses import dataclass, replace
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from tether.config import SEED_MAX, check, check_fields, opt, save_yaml, to_dict
from tether.data import fingerprint, load_prompts
from tether.errors import ConfigError
from tether.io import write_json, write_jsonl
from tether.loop import resolve_device
from tether.models import load_model, load_tokenizer
from tether.rewards import RewardFn, load_reward, reward_for_prompts
from tether.rollout import sample
from tether.theory import bon_distribution, bon_kl, expected_reward, kl_divergence
from tether.trainers.artifact import check_output, data_info, finish_output, prepare_output, versions

log = logging.getLogger("tether.bon")


@dataclass
class BoNConfig:
    model: str = opt("", "the policy to sample from (π_ref): an SFT folder, a local path or a hub name")
    prompts: str = opt("", "prompt file ({\"prompt\", \"answer\"?, ...})")
    reward: str = opt("gold", "reward spec: gold | RM folder | exact_match | format | overlong(...), or a weighted sum")
    out: str = opt("runs/bon", "output folder (responses.jsonl, tether.json)")
    n: int = opt(4, "N: samples the best is chosen from")
    pool: int = opt(32, "samples per prompt for the measured KL and expected reward (at least N)")
    limit: int = opt(0, "use a seeded sample of this many prompts (0: all)")
    max_new_tokens: int = opt(48, "longest response in tokens")
    temperature: float = opt(1.0, "sampling temperature of π_ref (the KL is to this distribution)")
    gen_batch_size: int = opt(64, "sequences generated at once")
    seed: int = opt(0, "seed for the prompt sample and the sampling")
    device: str = opt("auto", "auto | cpu | cuda | cuda:N")
    overwrite: bool = opt(False, "replace the run tether wrote in out, once the new one is complete")

    def validate(self) -> None:
        if not self.model or not self.prompts:
            raise ConfigError("--model and --prompts are required")
        check_fields(self, "n max_new_tokens gen_batch_size", ge=1, integer=True)
        check("limit", self.limit, ge=0, integer=True, note="0: all")
        check("temperature", self.temperature, gt=0)
        check("seed", self.seed, ge=0, le=SEED_MAX, integer=True)
        if self.pool < self.n:
            raise ConfigError(f"--pool must be at least n ({self.n}), got {self.pool}")


class PoolStats(NamedTuple):
    """Best-of-n on one prompt's pool, exact on its empirical distribution: KL(π_BoN ‖ π̂_ref) and E_BoN[R]."""

    kl: float
    expected_reward: float


def pool_stats(responses: list[tuple[int, ...]], rewards: list[float], n: int) -> PoolStats:
    """Merge identical responses into π̂_ref(y) = count/M, then best-of-n over it (module docstring).

    Shape: M responses (token-id tuples) with M rewards -> two scalars.
    """
    outcomes: dict[tuple[int, ...], list] = {}
    for y, r in zip(responses, rewards):
        if y in outcomes and outcomes[y][1] != r:
            raise ValueError("the reward gave one response two different values; best-of-n needs R(x, y) fixed")
        outcomes.setdefault(y, [0, r])[0] += 1
    counts = np.array([c for c, _ in outcomes.values()], dtype=np.float64)
    values = np.array([r for _, r in outcomes.values()], dtype=np.float64)
    p_ref = counts / counts.sum()  # (K,)
    p_bon = bon_distribution(p_ref, values, n)  # (K,)
    return PoolStats(float(kl_divergence(p_bon, p_ref)), float(expected_reward(p_bon, values)))


def curve_sizes(n: int) -> list[int]:
    """1, 2, 4, ... up to n, and n itself."""
    sizes = [2**k for k in range(n.bit_length()) if 2**k < n]
    return sizes + [n]


def run_bon(cfg: BoNConfig, reward_fn: RewardFn | None = None) -> Path:
    """Best-of-N of ``cfg.model`` on ``cfg.prompts`` against ``cfg.reward`` (or ``reward_fn``); returns the folder."""
    cfg.validate()
    device = resolve_device(cfg.device)
    tokenizer = load_tokenizer(cfg.model)
    records = load_prompts(cfg.prompts, tokenizer=tokenizer)
    if cfg.limit and cfg.limit < len(records):
        records = random.Random(cfg.seed).sample(records, cfg.limit)
    if reward_fn is None:
        reward_fn = reward_for_prompts(cfg.reward, records, tokenizer=tokenizer, max_new_tokens=cfg.max_new_tokens,
                                       device=str(device))
    else:  # recorded by name in tether.json
        cfg = replace(cfg, reward=f"<function {getattr(reward_fn, '__name__', type(reward_fn).__name__)}>")
        reward_fn = load_reward(reward_fn)
    check_output(Path(cfg.out), resume=False, overwrite=cfg.overwrite)
    model = load_model(cfg.model, device=device).eval()
    out = prepare_output(Path(cfg.out), resume=False, overwrite=cfg.overwrite)  # inputs and model have loaded

    M, n = cfg.pool, cfg.n
    prompts = [r.prompt for r in records]
    pairs = sample(model, tokenizer, [p for p in prompts for _ in range(M)], max_new_tokens=cfg.max_new_tokens,
                   temperature=cfg.temperature, batch_size=cfg.gen_batch_size, seed=cfg.seed)
    texts = tokenizer.batch_decode([resp for _, resp in pairs], skip_special_tokens=True)
    rewards = torch.as_tensor(reward_fn([p for p in prompts for _ in range(M)], texts), dtype=torch.float32)
    rewards = rewards.view(len(prompts), M)  # (P, M)

    rows, chosen_rewards = [], []
    stats = {k: [] for k in curve_sizes(n)}
    for i, rec in enumerate(records):
        best = int(rewards[i, :n].argmax())  # ties: the first
        chosen_rewards.append(rewards[i, best].item())
        rows.append({**rec.extra, "prompt": rec.prompt, "response": texts[i * M + best],
                     "reward": rewards[i, best].item(), "n": n})
        ids = [tuple(resp) for _, resp in pairs[i * M : (i + 1) * M]]
        for k in stats:
            stats[k].append(pool_stats(ids, rewards[i].tolist(), k))
    curve = [{"n": k, "expected_reward": float(np.mean([s.expected_reward for s in v])),
              "kl_measured": float(np.mean([s.kl for s in v])), "kl_bound": bon_kl(k)} for k, v in stats.items()]
    metrics = {"bon/reward": float(np.mean(chosen_rewards)), "bon/expected_reward": curve[-1]["expected_reward"],
               "bon/kl_measured": curve[-1]["kl_measured"], "bon/kl_bound": bon_kl(n),
               "base/reward": rewards.mean().item(), "base/reward_first_sample": rewards[:, 0].mean().item(),
               "bon/distinct_share": float(np.mean([len(set(tuple(r) for _, r in pairs[i * M:(i + 1) * M])) / M
                                                    for i in range(len(prompts))]))}
    log.info("best-of-%d on %d prompts: reward %.4f (one sample: %.4f); KL measured %.4f, bound %.4f", n,
             len(prompts), metrics["bon/reward"], metrics["base/reward_first_sample"], metrics["bon/kl_measured"],
             metrics["bon/kl_bound"])
    write_jsonl(out / "responses.jsonl", rows)
    save_yaml(cfg, out / "config.yaml")
    write_json(out / "tether.json", {
        "stage": "bon", "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "config": to_dict(cfg), "data": {"prompts": data_info(cfg.prompts, records, fingerprint(records))},
        "metrics": metrics, "curve": curve, "versions": versions()})
    return finish_output(out)
