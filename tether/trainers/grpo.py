"""Critic-free RL from a reward function: GRPO and RLOO, G samples per prompt, no value model.

One iteration (``--steps`` counts iterations):

1. take ``prompts_per_step`` prompts (the data order is a pure function of seed and iteration)
   and repeat each G = ``group_size`` times, contiguously;
2. sample a response to each (tether.rollout.rollout, seeded by seed and iteration) and score
   it with the reward (tether.rewards.load_reward: "gold", an RM folder, a callable, verifiable
   terms such as "exact_match:1.0,format:0.2");
3. log π_old (the sampling policy) and, when β > 0, log π_ref of every response token (with
   ``inner_iters`` = 1 and no KL in the reward, log π_old is the update's own first forward pass,
   detached: the ratio is 1 and a separate pass would compute the same numbers);
4. advantages, one per sequence:
     GRPO  Â = (r − mean_group r) / s,  s = group std | batch std | 1   (losses.grpo_advantages)
     RLOO  r' = r − β Σ_t kl_t (k1 by default: log π_old − log π_ref),
           Â = r' − mean of the other G − 1 rewards' of the prompt  (losses.rloo_advantages);
5. ``inner_iters`` optimiser steps on the batch, each accumulated over micro-batches of
   ``batch_size`` rows, on losses.grpo_loss: the clipped surrogate with ratio π/π_old
   (ε, and DAPO's ε_high if set), plus for GRPO β·k3(π, π_ref) per token inside the loss,
   aggregated per sequence (GRPO), per token over the batch (DAPO) or by B·max_new_tokens
   (Dr. GRPO). The micro-batch losses are weighted so that their sum is the full batch's loss
   exactly, whatever ``batch_size`` is.

Where this departs from the named algorithms:

- Dynamic sampling (DAPO) drops the groups whose rewards are all equal and trains on the rest
  (no update when none is left); DAPO instead samples more prompts until the batch is full.
  tether keeps the data position a function of the iteration, so that resume stays exact.
- RLOO (Ahmadian et al. 2024) takes one REINFORCE step per batch. tether's RLOO loss is
  grpo_loss with no KL term in the loss and "constant" aggregation by default, whose gradient at
  ρ = 1 is the leave-one-out REINFORCE estimator (1/B) Σ_i Â_i ∇log π(y_i|x) divided by
  max_new_tokens; with ``inner_iters`` > 1 the PPO clip keeps later steps near π_old (as TRL's
  RLOO does).
- The learning rate follows the schedule per iteration: constant over one batch's inner steps.
- Under torchrun (DDP) each rank samples, scores and trains on its block of whole prompts (a
  group never straddles ranks); advantages are computed on the rewards gathered from all ranks
  (so "batch" scaling is global), micro-batch weights use the global row or token count, and
  metrics are gathered. A prompt's samples are seeded by its global position, so the run matches
  one process when ``gen_batch_size`` divides every rank's rows.
- The KL penalty is always to the reference given (the starting policy by default); with
  LoRA and no separate reference, π_ref is the policy with its adapters disabled. β = 0 loads
  no reference at all (and logs no KL).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import NamedTuple

import torch

from tether import distributed
from tether.config import check, check_fields, group, opt, to_dict
from tether.data import fingerprint, load_prompts
from tether.errors import ConfigError
from tether.generation import BACKENDS, make_backend
from tether.loop import (
    Checkpoints,
    DataOrder,
    MetricsLog,
    TrainConfig,
    TrainingDiverged,
    autocast,
    build_optimizer,
    checkpoint_metrics,
    checkpoint_state,
    compiled,
    lr_factor,
    nonfinite_weights,
    resolve_device,
    resume_from,
    with_metrics,
)
from tether.losses import AGGREGATIONS, KL_ESTIMATORS, grpo_advantages, grpo_loss, kl_estimate, rloo_advantages
from tether.models import LoraConfig, apply_lora, count_parameters, load_model, load_tokenizer
from tether.rewards import CombinedReward, RewardFn, load_reward, reward_for_prompts
from tether.rollout import Rollout, policy_logprobs, rollout
from tether.trainers.artifact import check_output, data_info, prepare_output, write_artifact

log = logging.getLogger("tether.grpo")

SCALES = ("group", "batch", "none")


def _rl_defaults() -> TrainConfig:
    return TrainConfig(steps=100, batch_size=16, lr=1e-5, warmup_steps=0, schedule="constant", eval_every=10,
                       save_every=50)


@dataclass
class SamplingConfig:
    """What one iteration samples."""

    group_size: int = opt(8, "G: samples per prompt (GRPO's group, RLOO's k)")
    prompts_per_step: int = opt(8, "prompts per iteration; the rollout batch is prompts_per_step x group_size")
    max_new_tokens: int = opt(48, "longest response in tokens (also L_max of the overlong reward)")
    temperature: float = opt(1.0, "sampling temperature; log-probs are taken at the same temperature")
    gen_batch_size: int = opt(64, "prompts generated at once")
    eval_samples: int = opt(4, "samples per held-out prompt in each evaluation")
    backend: str = opt("tether", "generation backend: tether (the policy's own batched sampler) | vllm "
                                 "(pip install 'tether[vllm]', a GPU; weights synced after each update and on resume)")


@dataclass
class GRPOConfig:
    model: str = opt("", "policy to start from: an SFT folder, a local path or a hub name")
    ref: str = opt("", "reference model for the KL (empty: the same as --model)")
    prompts: str = opt("", "prompt file ({\"prompt\", \"answer\"?, ...}), JSONL / JSON / CSV / Parquet")
    eval_prompts: str = opt("", "held-out prompts scored every eval_every iterations (empty: no evaluation)")
    reward: str = opt("gold", "reward spec: gold | RM folder | exact_match | format | overlong(max=L,cache=C), "
                              "or a weighted sum such as exact_match:1.0,format:0.2")
    out: str = opt("runs/grpo", "output folder")
    scale: str = opt("group", "advantage scale: group (GRPO) | batch | none (Dr. GRPO)")
    aggregation: str = opt("sequence", "loss aggregation: sequence (GRPO) | token (DAPO) | constant (Dr. GRPO)")
    clip_eps: float = opt(0.2, "ε of the clipped ratio")
    clip_eps_high: float | None = opt(None, "upper clip ε_high (DAPO: 0.28; unset: ε)")
    beta: float = opt(0.04, "β of the k3 KL to the reference inside the loss (DeepSeekMath: 0.04; 0: no reference)")
    inner_iters: int = opt(1, "μ: optimiser steps on each rollout batch (importance ratios after the first)")
    dynamic_sampling: bool = opt(False, "drop groups whose rewards are all equal (DAPO)")
    resume: bool = opt(False, "continue from the latest checkpoint in out")
    overwrite: bool = opt(False, "replace the run tether wrote in out, once the new one is complete")
    sampling: SamplingConfig = group(SamplingConfig)
    lora: LoraConfig = group(LoraConfig)
    train: TrainConfig = group(_rl_defaults)

    def validate(self) -> None:
        _validate_common(self)
        if self.scale not in SCALES:
            raise ConfigError(f"scale must be one of {SCALES}, got {self.scale!r}")


@dataclass
class RLOOConfig:
    model: str = opt("", "policy to start from: an SFT folder, a local path or a hub name")
    ref: str = opt("", "reference model for the KL (empty: the same as --model)")
    prompts: str = opt("", "prompt file ({\"prompt\", \"answer\"?, ...}), JSONL / JSON / CSV / Parquet")
    eval_prompts: str = opt("", "held-out prompts scored every eval_every iterations (empty: no evaluation)")
    reward: str = opt("gold", "reward spec: gold | RM folder | exact_match | format | overlong(max=L,cache=C), "
                              "or a weighted sum such as exact_match:1.0,format:0.2")
    out: str = opt("runs/rloo", "output folder")
    beta: float = opt(0.05, "β of the per-token KL penalty summed into the sequence reward (0: no reference)")
    kl_estimator: str = opt("k1", "per-token KL estimator in the reward: k1 | k2 | k3")
    aggregation: str = opt("constant", "loss aggregation: constant (REINFORCE: sum over tokens) | sequence | token")
    clip_eps: float = opt(0.2, "ε of the clipped ratio (matters only with inner_iters > 1)")
    inner_iters: int = opt(1, "optimiser steps on each rollout batch (1: plain RLOO)")
    dynamic_sampling: bool = opt(False, "drop groups whose rewards are all equal")
    resume: bool = opt(False, "continue from the latest checkpoint in out")
    overwrite: bool = opt(False, "replace the run tether wrote in out, once the new one is complete")
    sampling: SamplingConfig = group(SamplingConfig)
    lora: LoraConfig = group(LoraConfig)
    train: TrainConfig = group(_rl_defaults)

    def validate(self) -> None:
        _validate_common(self)
        if self.kl_estimator not in KL_ESTIMATORS:
            raise ConfigError(f"kl_estimator must be one of {sorted(KL_ESTIMATORS)}, got {self.kl_estimator!r}")


def _validate_common(cfg: GRPOConfig | RLOOConfig) -> None:
    s = cfg.sampling
    if not cfg.model or not cfg.prompts:
        raise ConfigError("--model and --prompts are required")
    check("group_size", s.group_size, ge=2, integer=True, note="the baseline comes from the group")
    check_fields(s, "prompts_per_step max_new_tokens gen_batch_size eval_samples", ge=1, integer=True)
    check("temperature", s.temperature, gt=0)
    if s.backend not in BACKENDS:
        raise ConfigError(f"backend must be one of {BACKENDS}, got {s.backend!r}")
    if cfg.aggregation not in AGGREGATIONS:
        raise ConfigError(f"aggregation must be one of {sorted(AGGREGATIONS)}, got {cfg.aggregation!r}")
    check("clip_eps", cfg.clip_eps, gt=0, lt=1)
    if getattr(cfg, "clip_eps_high", None) is not None:
        check("clip_eps_high", cfg.clip_eps_high, gt=0, note="unset: --clip-eps")
    check("beta", cfg.beta, ge=0, note="0: no reference")
    check("inner_iters", cfg.inner_iters, ge=1, integer=True)
    cfg.lora.validate()
    world = distributed.env().world_size
    if world > 1 and s.prompts_per_step % world:
        raise ConfigError(f"prompts_per_step ({s.prompts_per_step}) must be a multiple of the world size ({world}): "
                          "each rank takes whole groups")
    if world > 1 and cfg.train.strategy != "ddp":
        raise ConfigError("RL stages run under torchrun with --strategy ddp (fsdp2 is not supported for them yet)")
    if cfg.train.grad_accum != 1:
        raise ConfigError(f"--grad-accum does not apply to RL stages (got {cfg.train.grad_accum}; it must stay 1): "
                          "each rollout batch is split into micro-batches of --batch-size rows and accumulated into "
                          "one step; set --batch-size instead")
    cfg.train.validate()


# --- one iteration, a function per stage (bench/rl_iteration.py times each) ---------------


class Scored(NamedTuple):
    """A scored rollout batch of B rows.

    rewards: (B,) the reward function's. components: name -> (B,) each term of a combined reward.
    old_logp, ref_logp: (B, T − 1) log π_old and log π_ref of response tokens (ref_logp is None
    when β = 0; old_logp is None when the update's first pass gives it, see :func:`needs_old_logp`).
    kl: (B,) Σ_t log π_old − log π_ref, the k1 sequence KL (None without a reference or without
    old_logp; the update then reports it from its first pass).
    advantages: (B,). keep: (K,) rows trained on (all, unless dynamic sampling dropped groups).
    """

    rewards: torch.Tensor
    components: dict[str, torch.Tensor]
    old_logp: torch.Tensor
    ref_logp: torch.Tensor | None
    kl: torch.Tensor | None
    advantages: torch.Tensor
    keep: torch.Tensor


def generate_batch(model, tokenizer, prompts: list[str], step: int, cfg: GRPOConfig | RLOOConfig,
                   first: int = 0, backend=None) -> Rollout:
    """G samples of each prompt, rows [g·G, (g+1)·G) sharing prompt g; seeded by (seed, step) and
    the global position of each chunk (``first``: the global number of ``prompts[0]`` in the step)."""
    s = cfg.sampling
    repeated = [p for p in prompts for _ in range(s.group_size)]
    batch = rollout(model, tokenizer, repeated, max_new_tokens=s.max_new_tokens, temperature=s.temperature,
                    batch_size=s.gen_batch_size, seed=cfg.train.seed * 1_000_003 + step,
                    index_offset=first * s.group_size, backend=backend)
    return batch.to(next(model.parameters()).device)


@torch.no_grad()
def batch_logprobs(model, batch: Rollout, cfg: GRPOConfig | RLOOConfig) -> torch.Tensor:
    """log π of every response token, in the micro-batches the update uses. Shape: (B, T − 1)."""
    device = next(model.parameters()).device
    out = []
    for rows in micro_batches(torch.arange(len(batch.prompts)), cfg.train.batch_size):
        with autocast(device, cfg.train.precision):
            out.append(policy_logprobs(model, batch.rows(rows).to(device), cfg.sampling.temperature).float())
    return torch.cat(out)


def micro_batches(rows: torch.Tensor, size: int) -> list[torch.Tensor]:
    return [rows[i : i + size] for i in range(0, len(rows), size)]


def scores(reward_fn, prompts: list[str], responses: list[str]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The reward (N,) and, for a combined reward, each term's (N,) (empty otherwise)."""
    if isinstance(reward_fn, CombinedReward):
        return reward_fn.with_components(prompts, responses)
    return torch.as_tensor(reward_fn(prompts, responses), dtype=torch.float32), {}


def needs_old_logp(cfg: GRPOConfig | RLOOConfig, has_reference: bool) -> bool:
    """Whether log π_old needs a pass of its own before the update.

    It does when there are several optimiser steps per batch (the ratio π/π_old moves after the
    first), when RLOO puts the KL into the reward (the advantages need it before any loss) and
    with dynamic sampling (the logged KL covers the dropped rows too).
    Otherwise the update's first forward pass is on the very weights that sampled: its log-probs,
    detached, are log π_old (TRL's GRPO skips the pass likewise).
    """
    return cfg.inner_iters > 1 or cfg.dynamic_sampling or (isinstance(cfg, RLOOConfig) and has_reference)


def score_batch(model, reference, reward_fn, batch: Rollout, cfg: GRPOConfig | RLOOConfig) -> Scored:
    """Rewards, log π_old, log π_ref, the sequence KL and the advantages of a rollout batch."""
    G = cfg.sampling.group_size
    rewards, components = scores(reward_fn, batch.prompts, batch.responses)
    rewards = rewards.to(batch.mask.device)  # (B,)
    old_logp = None
    if needs_old_logp(cfg, reference is not None):
        old_logp = batch_logprobs(model, batch, cfg)  # (B, T-1)
    ref_logp = reference(batch) if reference is not None else None  # (B, T-1)
    kl = None
    if ref_logp is not None and old_logp is not None:
        kl = ((old_logp - ref_logp) * batch.mask).sum(-1)  # (B,)
    if isinstance(cfg, RLOOConfig):
        penalty = 0.0
        if ref_logp is not None:
            penalty = (kl_estimate(old_logp, ref_logp, cfg.kl_estimator) * batch.mask).sum(-1)  # (B,)
        signal, advantage = rewards - cfg.beta * penalty, lambda r: rloo_advantages(r, G)
    else:
        signal, advantage = rewards, lambda r: grpo_advantages(r, G, cfg.scale)
    # under torchrun: on every rank's rewards (groups are whole on each rank; "batch" scaling needs them all)
    lo = distributed.env().rank * len(signal)
    advantages = advantage(distributed.gather(signal))[lo : lo + len(signal)]  # (B,)
    keep = torch.arange(len(rewards), device=rewards.device)
    if cfg.dynamic_sampling:
        grouped = rewards.view(-1, G)  # (B/G, G)
        varied = (grouped != grouped[:, :1]).any(-1)  # (B/G,)
        keep = varied.repeat_interleave(G).nonzero().squeeze(-1)
    return Scored(rewards, components, old_logp, ref_logp, kl, advantages, keep)


def _loss_args(cfg: GRPOConfig | RLOOConfig) -> dict:
    if isinstance(cfg, RLOOConfig):  # the KL is in the reward, not the loss
        return {"clip_eps": cfg.clip_eps, "clip_eps_high": None, "beta": 0.0, "aggregation": cfg.aggregation}
    return {"clip_eps": cfg.clip_eps, "clip_eps_high": cfg.clip_eps_high, "beta": cfg.beta,
            "aggregation": cfg.aggregation}


def update(model, optimizer, batch: Rollout, scored: Scored, cfg: GRPOConfig | RLOOConfig) -> dict[str, float]:
    """``inner_iters`` optimiser steps on the kept rows; returns the mean loss, clip fraction, k3 and grad norm.

    A micro-batch's loss is weighted by its share of the batch's normaliser: rows for the
    "sequence" and "constant" aggregations, response tokens for "token", so the accumulated
    gradient is that of the loss over all kept rows at once.

    Under torchrun ``model`` is the DDP-wrapped policy: row and token counts are global, each
    weight is multiplied by the world size (DDP averages gradients), and a rank with fewer
    micro-batches than another (dynamic sampling) runs zero-weight ones so that all stay in step.
    """
    world = distributed.env().world_size
    n_rows = int(distributed.all_reduce(torch.tensor(len(scored.keep))).item())
    if n_rows == 0:
        return {}
    device = next(model.parameters()).device
    args = _loss_args(cfg)
    n_tokens = distributed.all_reduce(batch.mask[scored.keep].sum())
    sums = {"loss": 0.0, "clip_fraction": 0.0, "kl_k3": 0.0}
    first_pass_kl = torch.zeros(len(batch.prompts), device=batch.mask.device)  # (B,) when scored.kl is None
    grad_norm = torch.zeros(())
    chunks = micro_batches(scored.keep, cfg.train.batch_size)
    n_chunks = int(distributed.all_reduce(torch.tensor(len(chunks)), "max").item())
    chunks += [torch.zeros(1, dtype=torch.long, device=scored.keep.device)] * (n_chunks - len(chunks))  # weight 0
    for inner in range(cfg.inner_iters):
        for i, rows in enumerate(chunks):
            sub = batch.rows(rows.cpu()).to(device)
            weight = len(rows) / n_rows if cfg.aggregation != "token" else sub.mask.sum() / n_tokens
            weight = weight if i * cfg.train.batch_size < len(scored.keep) else 0.0 * weight
            with autocast(device, cfg.train.precision):
                logp = policy_logprobs(model, sub, cfg.sampling.temperature).float()  # (b, T-1)
            old = scored.old_logp[rows] if scored.old_logp is not None else logp.detach()  # see needs_old_logp
            ref = scored.ref_logp[rows] if scored.ref_logp is not None else old  # unused when β = 0
            if scored.kl is None and scored.ref_logp is not None:
                first_pass_kl[rows] = ((old - ref) * sub.mask).sum(-1)
            out = grpo_loss(logp, old, ref, scored.advantages[rows], sub.mask,
                            max_tokens=cfg.sampling.max_new_tokens, **args)
            if not torch.isfinite(out.loss) and world == 1:  # under torchrun the gradient norm stops every rank
                raise TrainingDiverged(f"the loss is {out.loss.item()}", from_start=inner == 0)
            with distributed.accumulating(model, last=i == len(chunks) - 1):
                (out.loss * (weight * world)).backward()
            for k, v in zip(("loss", "clip_fraction", "kl_k3"), out):
                sums[k] += float(v.detach()) * float(weight) / cfg.inner_iters
        grad_norm = distributed.clip_grad_norm(model, cfg.train.max_grad_norm)
        if not torch.isfinite(grad_norm):
            raise TrainingDiverged(f"the gradient norm is {grad_norm.item()}", from_start=inner == 0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    sums = distributed.reduce_metrics(sums)
    metrics = {"losses/policy": sums["loss"], "policy/clip_fraction": sums["clip_fraction"],
               "train/grad_norm": float(grad_norm)}
    if scored.ref_logp is not None and isinstance(cfg, GRPOConfig):
        metrics["policy/kl_k3"] = sums["kl_k3"]
    if scored.kl is None and scored.ref_logp is not None:  # rollout_metrics' KL, from the first pass
        metrics.update(kl_metrics(scored.rewards, first_pass_kl, cfg))
    return metrics


def rollout_metrics(batch: Rollout, scored: Scored, cfg: GRPOConfig | RLOOConfig) -> dict[str, float]:
    """Means over the whole batch (under torchrun, each row's figures gathered from every rank)."""
    g = distributed.gather
    r, kl = g(scored.rewards), g(scored.kl) if scored.kl is not None else None
    kept = distributed.all_reduce(torch.tensor(len(scored.keep))).item()
    out = {"reward/mean": r.mean().item(), "reward/std": r.std().item() if len(r) > 1 else 0.0,
           "rollout/length_tokens": g(batch.mask.sum(-1).float()).mean().item(),
           "rollout/ended": g(batch.ended.float()).mean().item(),
           "rollout/rows_kept": kept / len(r)}
    out.update({f"reward/{name.split('(')[0]}": g(v).mean().item() for name, v in scored.components.items()})
    if kl is not None:
        out.update(kl_metrics(scored.rewards, scored.kl, cfg))
    return out


def kl_metrics(rewards: torch.Tensor, kl: torch.Tensor, cfg: GRPOConfig | RLOOConfig) -> dict[str, float]:
    """The sequence KL (B,) and reward − β·KL, averaged over every rank's rows."""
    r, kl = distributed.gather(rewards), distributed.gather(kl)
    return {"objective/kl": kl.mean().item(), "objective/reward_minus_kl": (r - cfg.beta * kl).mean().item()}


@torch.no_grad()
def evaluate(model, tokenizer, prompts: list[str], reward_fn, cfg: GRPOConfig | RLOOConfig) -> dict[str, float]:
    """Mean reward (and each term of a combined one) of ``eval_samples`` samples per held-out prompt, a fixed seed.

    Under torchrun each rank samples a block of the rows (seeded by global position) and the
    figures are gathered.
    """
    s = cfg.sampling
    repeated = [p for p in prompts for _ in range(s.eval_samples)]
    n, (lo, _) = len(repeated), distributed.shard_bounds(len(repeated))
    per = -(-n // distributed.env().world_size)
    mine = [repeated[min(i, n - 1)] for i in range(lo, lo + per)]  # equal blocks; copies past the end are dropped
    batch = rollout(model, tokenizer, mine, max_new_tokens=s.max_new_tokens, temperature=s.temperature,
                    batch_size=s.gen_batch_size, seed=cfg.train.seed + 999_983, index_offset=lo)
    rewards, components = scores(reward_fn, batch.prompts, batch.responses)
    g = lambda x: distributed.gather(x.float())[:n]  # noqa: E731
    out = {"eval/reward": g(rewards).mean().item(), "eval/length_tokens": g(batch.mask.sum(-1)).mean().item()}
    out.update({f"eval/{name.split('(')[0]}": g(v).mean().item() for name, v in components.items()})
    return out


def make_reference(cfg: GRPOConfig | RLOOConfig, policy, device):
    """A function batch -> log π_ref (B, T − 1), or None when β = 0 (no reference is loaded)."""
    if cfg.beta == 0:
        return None
    if cfg.lora.r > 0 and (cfg.ref or cfg.model) == cfg.model:
        def adapters_off(batch: Rollout) -> torch.Tensor:
            with policy.disable_adapter():
                return batch_logprobs(policy, batch, cfg)
        return adapters_off
    ref = compiled(load_model(cfg.ref or cfg.model, device=device).eval().requires_grad_(False), cfg.train)
    return lambda batch: batch_logprobs(ref, batch, cfg)


# --- the stage ----------------------------------------------------------------------------


def run_grpo(cfg: GRPOConfig, reward_fn: RewardFn | None = None) -> Path:
    """GRPO from ``cfg.model`` on ``cfg.prompts`` against ``cfg.reward`` (or the function
    ``reward_fn(prompts, responses)``, for library use); returns the output folder."""
    return _run(cfg, "grpo", reward_fn)


def run_rloo(cfg: RLOOConfig, reward_fn: RewardFn | None = None) -> Path:
    """RLOO from ``cfg.model`` on ``cfg.prompts`` against ``cfg.reward`` or ``reward_fn``; returns the output folder."""
    return _run(cfg, "rloo", reward_fn)


def _run(cfg: GRPOConfig | RLOOConfig, stage: str, reward_fn: RewardFn | None) -> Path:
    cfg.validate()
    torch.manual_seed(cfg.train.seed)
    device = resolve_device(cfg.train.device)
    tokenizer = load_tokenizer(cfg.model)
    records = load_prompts(cfg.prompts, tokenizer=tokenizer)
    eval_records = load_prompts(cfg.eval_prompts, tokenizer=tokenizer) if cfg.eval_prompts else []
    if reward_fn is None:
        reward_fn = reward_for_prompts(cfg.reward, records + eval_records, tokenizer=tokenizer,
                                       max_new_tokens=cfg.sampling.max_new_tokens, device=str(device))
    else:  # recorded by name in tether.json
        cfg = replace(cfg, reward=f"<function {getattr(reward_fn, '__name__', type(reward_fn).__name__)}>")
        reward_fn = reward_fn if isinstance(reward_fn, CombinedReward) else load_reward(reward_fn)
    check_output(Path(cfg.out), resume=cfg.resume, overwrite=cfg.overwrite)

    model = apply_lora(load_model(cfg.model, device=device), cfg.lora).train()
    reference = make_reference(cfg, model, device)
    backend = make_backend(cfg.sampling.backend, model, tokenizer, model_path=cfg.model, compile=cfg.train.compile)
    out = prepare_output(Path(cfg.out), resume=cfg.resume, overwrite=cfg.overwrite)  # inputs and models have loaded
    trained = distributed.Trainable(model, cfg.train.strategy, device).module  # under torchrun: DDP around model
    scoring = compiled(model, cfg.train)  # the passes that score and train (sampling: the backend's own decoding)
    training = scoring if trained is model else compiled(trained, cfg.train)
    optimizer = build_optimizer(trained, cfg.train)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg.train))  # once per iteration
    ckpts = Checkpoints(out / "checkpoints", cfg.train, to_dict(cfg))  # each written once its weights have worked
    start, ckpt = resume_from(ckpts.folder, trained, optimizer, scheduler, cfg.train, ckpts.config) if cfg.resume \
        else (0, None)
    if ckpt is not None:
        backend.sync(model)  # an engine with its own copy (vLLM) was loaded from cfg.model: give it the checkpoint's
    log.info("%s of %s (%d trainable parameters) on %d prompts, reward %s, reference %s", stage.upper(), cfg.model,
             count_parameters(model, True), len(records), cfg.reward,
             "none (beta = 0)" if reference is None else cfg.ref or cfg.model)
    order = DataOrder(len(records), cfg.sampling.prompts_per_step, cfg.train.seed)
    eval_prompts = [r.prompt for r in eval_records]
    metrics_log = MetricsLog(out, resume_step=start)
    metrics = checkpoint_metrics(checkpoint_state(ckpt), "train") if ckpt is not None else {}  # see loop.train
    t0 = time.perf_counter()
    try:
        if start == 0 and eval_prompts:
            metrics_log.log(0, evaluate(model, tokenizer, eval_prompts, reward_fn, cfg))
        for step in range(start, cfg.train.steps):
            tick = time.perf_counter()
            step_prompts = [records[i].prompt for i in order.indices(step)]
            lo, hi = distributed.shard_bounds(len(step_prompts))  # this rank's whole prompts (and so groups)
            batch = generate_batch(model, tokenizer, step_prompts[lo:hi], step, cfg, first=lo, backend=backend)
            t_gen = time.perf_counter()
            ckpts.confirm(trained, optimizer, scheduler)  # these weights (finite) just sampled without fault
            scored = score_batch(scoring, reference, reward_fn, batch, cfg)
            finite = scored.old_logp is None or bool(torch.isfinite(scored.old_logp).all())
            if not distributed.all_reduce(torch.tensor(float(finite)), "min").item():  # every rank stops together
                raise ckpts.diverged("the policy's log-probabilities of its own samples are not finite", step + 1,
                                     failed=step)
            t_score = time.perf_counter()
            try:
                updated = update(training, optimizer, batch, scored, cfg)
            except TrainingDiverged as err:  # before any step: the weights this iteration's checkpoint holds failed
                raise ckpts.diverged(str(err), step + 1, failed=step if err.from_start else None) from None
            if (bad := nonfinite_weights(model)) is not None:
                raise ckpts.diverged(f"the weights after the update are not finite ({bad})", step + 1)
            metrics = {**rollout_metrics(batch, scored, cfg), **updated, "train/lr": scheduler.get_last_lr()[0]}
            scheduler.step()
            backend.sync(model)  # the next rollout samples the updated policy
            t_end = time.perf_counter()
            metrics.update({"time/generate_s": t_gen - tick, "time/score_s": t_score - t_gen,
                            "time/update_s": t_end - t_score,
                            "charts/samples_per_s": len(step_prompts) * cfg.sampling.group_size / (t_end - tick)})
            done = step + 1
            every = cfg.train.eval_every
            if eval_prompts and ((every and done % every == 0) or done == cfg.train.steps):
                metrics.update(evaluate(model, tokenizer, eval_prompts, reward_fn, cfg))
            metrics_log.log(done, metrics)
            log.info("iteration %d/%d: reward %.3f%s", done, cfg.train.steps, metrics["reward/mean"],
                     f", eval reward {metrics['eval/reward']:.3f}" if "eval/reward" in metrics else "")
            if done == cfg.train.steps:  # the final weights, checked finite, before write_artifact has them
                ckpts.write(done, trained, optimizer, scheduler, with_metrics({}, metrics, {}))
            elif cfg.train.save_every and done % cfg.train.save_every == 0:
                ckpts.due(done, with_metrics({}, metrics, {}))
    finally:
        metrics_log.close()
    metrics["time/seconds"] = time.perf_counter() - t0
    data = {"train": data_info(cfg.prompts, records, fingerprint(records))}
    if eval_records:
        data["eval"] = data_info(cfg.eval_prompts, eval_records, fingerprint(eval_records))
    return write_artifact(out, stage=stage, cfg=cfg, model=model, tokenizer=tokenizer, data=data, metrics=metrics)
