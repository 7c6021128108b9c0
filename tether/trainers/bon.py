"""Best-of-N: sample N responses from the policy, keep the one the reward likes best. No training.

For each prompt, ``pool`` ≥ N responses are sampled from π_ref (the model given, sampled as its
``sampling`` group says: temperature 1, no top-k/top-p, by default) and scored by the reward
(tether.rewards.load_reward). The chosen response is the highest-reward one among the first N
(ties: the first); it goes to ``responses.jsonl``. π_ref is whatever distribution those settings
sample, so top-k/top-p change π_ref but do not bias the measured KL (it is computed on the pool).

The pool also measures what best-of-N costs and buys, exactly, on the empirical distribution
π̂_ref of the pool (identical responses merged, each weighing count / pool, and each given one
reward: the mean over its copies where a stochastic reward scored them differently; merge_pool):

    π_BoN = tether.theory.bon_distribution(π̂_ref, R, N)    (Beirami et al. 2024, Lemma 1; ties handled)
    measured KL = KL(π_BoN ‖ π̂_ref)                          (tether.theory.kl_divergence)
    expected reward = Σ_y π_BoN(y) R(y)

averaged over prompts, beside the analytic KL log N − (N − 1)/N (tether.theory.bon_kl; Stiennon
et al. 2020), which holds with equality only for tie-free rewards over a continuum of responses
and bounds the KL of a finite set from above (Beirami et al. 2024). Ties — a verifiable reward
takes two values — and repeated responses make the measured KL smaller. The same figures for
every power of two up to N form the curve in ``tether.json``: the expected reward cannot fall
as N grows (N + 1 draws stochastically dominate N).

Under torchrun (``torchrun --nproc_per_node K -m tether bon ...``) the P·pool rows (prompt i's
sample j at i·pool + j) are split over ranks in blocks of whole generation batches
(``--gen-batch-size``; tether.instruments.shard); each rank samples and scores its block, every
chunk seeded from (seed, its global position) as in one process, and the samples and rewards are
gathered in order. Rank 0 alone writes responses.jsonl, config.yaml and tether.json: the same
responses and figures as one process.
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

from tether import distributed
from tether.config import SEED_MAX, check, group, opt, save_yaml, to_dict
from tether.data import chat_tokenizer, fingerprint, load_prompts
from tether.errors import ConfigError
from tether.generation import make_backend, sample_as
from tether.instruments.shard import AtPosition, as_floats, map_blocks
from tether.io import write_json, write_jsonl
from tether.loop import resolve_device
from tether.models import load_model, load_tokenizer
from tether.rewards import RewardFn, load_reward, reward_for_prompts
from tether.rollout import SamplingConfig
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
    seed: int = opt(0, "seed for the prompt sample and the sampling")
    chat_template: bool = opt(True, "render records with the model's chat template when it has one (HH-RLHF "
                                    "transcripts become its turns); --no-chat-template: strings as given")
    device: str = opt("auto", "auto | cpu | cuda | cuda:N")
    overwrite: bool = opt(False, "replace the run tether wrote in out, once the new one is complete")
    sampling: SamplingConfig = group(SamplingConfig, "how π_ref is sampled (the KL is to this distribution)")

    def validate(self) -> None:
        if not self.model or not self.prompts:
            raise ConfigError("--model and --prompts are required")
        check("n", self.n, ge=1, integer=True)
        self.sampling.validate()
        check("limit", self.limit, ge=0, integer=True, note="0: all")
        check("seed", self.seed, ge=0, le=SEED_MAX, integer=True)
        if self.pool < self.n:
            raise ConfigError(f"--pool must be at least n ({self.n}), got {self.pool}")


class PoolStats(NamedTuple):
    """Best-of-n on one prompt's pool, exact on its empirical distribution: KL(π_BoN ‖ π̂_ref) and E_BoN[R]
    (and E_BoN[gold] when a second reward, not the one selected on, is given; NaN otherwise)."""

    kl: float
    expected_reward: float
    expected_gold: float = float("nan")


def merge_pool(responses, *rewards) -> tuple[np.ndarray, list[np.ndarray]]:
    """π̂_ref over the pool's distinct responses, and each reward as one value per distinct response.

    ``responses``: M hashable responses (token-id tuples), identical ones merged with weight
    count / M. A response's reward must be one value: best-of-n selects on R(x, y), a function of
    the response. Where the copies of one response got different values (a stochastic reward, or
    a learned one whose score moved with batching), that value is the mean over its copies,
    the estimate of E[R(x, y)]; for a deterministic reward it is simply its value.

    Shape: M responses, each reward (M,) -> p_ref (K,), [reward (K,), ...] for K distinct responses.
    """
    draws: dict = {}  # response -> the positions of its copies, in first-seen order
    for j, y in enumerate(responses):
        draws.setdefault(y, []).append(j)
    counts = np.array([len(js) for js in draws.values()], dtype=np.float64)  # (K,)

    def one_value(r: np.ndarray, js: list[int]) -> float:
        v = r[js]
        return float(v[0]) if (v == v[0]).all() else float(v.mean())  # equal copies keep their exact value (ties)

    merged = [np.array([one_value(np.asarray(r, dtype=np.float64), js) for js in draws.values()]) for r in rewards]
    return counts / counts.sum(), merged


def pool_stats(responses: list[tuple[int, ...]], rewards, n: int, gold=None) -> PoolStats:
    """Best-of-n over one prompt's pool (module docstring), exact on π̂_ref (:func:`merge_pool`).

    ``rewards`` is what best-of-n selects on; ``gold`` (optional) a second reward whose expectation
    under the same π_BoN is reported. Shape: M responses with M rewards -> scalars. This is the one
    pool computation: `tether bon` and tether.instruments.overopt.pool_curve both call it.
    """
    p_ref, (values, *others) = merge_pool(responses, rewards, *([gold] if gold is not None else []))
    p_bon = bon_distribution(p_ref, values, n)  # (K,)
    expected_gold = float(expected_reward(p_bon, others[0])) if others else float("nan")
    return PoolStats(float(kl_divergence(p_bon, p_ref)), float(expected_reward(p_bon, values)), expected_gold)


def curve_sizes(n: int) -> list[int]:
    """1, 2, 4, ... up to n, and n itself."""
    sizes = [2**k for k in range(n.bit_length()) if 2**k < n]
    return sizes + [n]


def run_bon(cfg: BoNConfig, reward_fn: RewardFn | None = None) -> Path:
    """Best-of-N of ``cfg.model`` on ``cfg.prompts`` against ``cfg.reward`` (or ``reward_fn``); returns the folder."""
    cfg.validate()
    device = resolve_device(cfg.device)
    tokenizer = load_tokenizer(cfg.model)
    records = load_prompts(cfg.prompts, tokenizer=chat_tokenizer(tokenizer, cfg))
    if cfg.limit and cfg.limit < len(records):
        records = random.Random(cfg.seed).sample(records, cfg.limit)
    if reward_fn is None:
        reward_fn = reward_for_prompts(cfg.reward, records, tokenizer=tokenizer,
                                       max_new_tokens=cfg.sampling.max_new_tokens, device=str(device))
    else:  # recorded by name in tether.json
        cfg = replace(cfg, reward=f"<function {getattr(reward_fn, '__name__', type(reward_fn).__name__)}>")
        reward_fn = load_reward(reward_fn)
    check_output(Path(cfg.out), resume=False, overwrite=cfg.overwrite)
    model = load_model(cfg.model, device=device).eval()
    out = prepare_output(Path(cfg.out), resume=False, overwrite=cfg.overwrite)  # inputs and model have loaded

    M, n = cfg.pool, cfg.n
    prompts = [r.prompt for r in records]
    backend = make_backend(cfg.sampling.backend, model, tokenizer, model_path=cfg.model)

    def draw(part: list[str], lo: int) -> list[tuple]:  # this rank's rows, from global row lo on
        drawn = sample_as(AtPosition(backend, lo), tokenizer, part, cfg.sampling, seed=cfg.seed)
        texts = tokenizer.batch_decode([resp for _, resp in drawn], skip_special_tokens=True)
        scores = as_floats(torch.as_tensor(reward_fn(part, texts), dtype=torch.float32))
        return list(zip(drawn, texts, scores))

    drawn = map_blocks(draw, [p for p in prompts for _ in range(M)], cfg.sampling.gen_batch_size)
    pairs, texts = [d[0] for d in drawn], [d[1] for d in drawn]
    rewards = torch.tensor([d[2] for d in drawn], dtype=torch.float32).view(len(prompts), M)  # (P, M)
    if not distributed.env().main:  # every rank has joined the gather; rank 0 computes and writes the results
        distributed.barrier()
        return finish_output(out)

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
    distributed.barrier()
    return finish_output(out)
