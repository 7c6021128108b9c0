"""Critic-free RL from a reward function, G samples per prompt and no value model: GRPO here, and the
machinery RLOO (trainers/rloo.py) shares with it. Both run in the RL loop (tether.loop.rl).

One iteration (``--steps`` counts iterations):

1. rollout: ``prompts_per_step`` prompts (the data order is a pure function of seed and iteration),
   each repeated G = ``group_size`` times, contiguously, and sampled (seeded by seed and iteration);
2. score:   the reward of each response (tether.rewards: "gold", an RM folder, a callable, verifiable
   terms such as "exact_match:1.0,format:0.2"); log π_old and, when there is a reference, log π_ref of
   every response token (with one pass over the batch and no KL in the reward, log π_old is the
   update's own first forward pass, detached: :meth:`CriticFree.needs_old_logp`); one advantage per
   sequence:
     GRPO  Â = (r − mean_group r) / s,  s = group std | batch std | 1   (losses.grpo_advantages)
     RLOO  Â = r' − mean of the other G − 1 rewards r' of the prompt, r' = r − β Σ_t kl_t
           (losses.rloo_advantages; trainers/rloo.py);
3. update:  ``inner_iters`` passes over the batch in mini-batches of ``batch_size × grad_accum``
   consecutive rows (the whole batch when it is smaller), one optimiser step each, on losses.grpo_loss
   (the clipped surrogate with ratio π/π_old, ε and DAPO's ε_high, plus for GRPO β·k3(π, π_ref) per
   token inside the loss), aggregated per sequence (GRPO), per token (DAPO) or by max_new_tokens
   (Dr. GRPO); each mini-batch's loss is
   the aggregation's sum over its rows divided by their count across micro-batches and ranks
   (tether.loop.accumulate).

Where this departs from the named algorithms:

- Dynamic sampling (DAPO) drops the groups whose rewards are all equal and trains on the rest of each
  mini-batch (a mini-batch with none left takes no step); DAPO instead samples more prompts until the
  batch is full. tether keeps the data position a function of the iteration, so that resume stays exact.
- The learning rate follows the schedule per iteration: constant over one batch's optimiser steps.
- Under torchrun (DDP or FSDP2) each rank samples, scores and trains on its block of whole prompts (a group
  never straddles ranks); advantages are computed on the rewards gathered from all ranks (so "batch"
  scaling is global), loss counts are global, and metrics are gathered. A prompt's samples are seeded
  by its global position, so the run matches one process when ``gen_batch_size`` divides every rank's rows.
- The KL is always to the reference given (the starting policy by default); with LoRA and no separate
  reference, π_ref is the policy with its adapters switched off. With β = 0 a reference is loaded only
  to measure the held-out KL (none without held-out prompts).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch

from tether import distributed
from tether.config import check, group, opt, to_dict
from tether.errors import ConfigError
from tether.generation import make_backend
from tether.loop import DataOrder, TrainConfig, TrainingDiverged, accumulate, autocast, compiled, resolve_device
from tether.loop.rl import (
    clear_samples,
    evaluate_policy,
    gold_known,
    gold_metric,
    no_signal,
    reward_terms,
    term_metrics,
    train_rl,
)
from tether.losses import AGGREGATIONS, aggregation_count, grpo_advantages, grpo_loss
from tether.models import count_parameters
from tether.rewards import RewardFn
from tether.rollout import Rollout, rollout
from tether.scoring import reference_for, response_logprobs
from tether.trainers.artifact import check_output, prepare_output, write_artifact
from tether.trainers.rl import RLConfig, data_record, load_inputs, load_policy

log = logging.getLogger("tether.grpo")

SCALES = ("group", "batch", "none")


@dataclass
class CriticFreeConfig(RLConfig):
    """The options GRPO and RLOO share."""

    group_size: int = opt(8, "G: samples per prompt (GRPO's group, RLOO's k)")
    prompts_per_step: int = opt(8, "prompts per iteration; the rollout batch is prompts_per_step x group_size")
    clip_eps: float = opt(0.2, "ε of the clipped ratio")
    inner_iters: int = opt(1, "μ: passes over each rollout batch (importance ratios after the first step)")
    dynamic_sampling: bool = opt(False, "drop groups whose rewards are all equal (DAPO)")
    no_signal_stop: int = opt(20, "stop after this many iterations in a row in which every group's rewards are equal "
                                  "(no learning signal: every advantage 0), with a warning from the third; 0: never")
    beta: float = opt(0.04, "β of the KL to the reference (0: no KL)")
    aggregation: str = opt("sequence", "loss aggregation: sequence (GRPO) | token (DAPO) | constant (Dr. GRPO)")
    eval_samples: int = opt(4, "samples per held-out prompt at each evaluation")
    eval_size: int = opt(512, "held-out prompts scored at each evaluation (a seeded sample when there are more)")
    train: TrainConfig = group(lambda: TrainConfig(steps=100, batch_size=16, grad_accum=4, lr=1e-5, warmup_steps=0,
                                                   schedule="constant", eval_every=10, save_every=50))

    def rollout_rows(self) -> int:
        return self.prompts_per_step * self.group_size

    def optimizer_rows(self) -> int:
        """Rows of one optimiser step: batch_size × grad_accum, or the whole rollout batch when that is smaller
        (a step never spans two rollouts)."""
        return min(self.step_rows(), self.rollout_rows())

    def validate(self) -> None:
        super().validate()
        check("group_size", self.group_size, ge=2, integer=True, note="the baseline comes from the group")
        check("prompts_per_step", self.prompts_per_step, ge=1, integer=True)
        check("clip_eps", self.clip_eps, gt=0, lt=1)
        check("beta", self.beta, ge=0, note="0: no KL")
        check("inner_iters", self.inner_iters, ge=1, integer=True)
        check("no_signal_stop", self.no_signal_stop, ge=0, integer=True, note="0: never")
        if self.aggregation not in AGGREGATIONS:
            raise ConfigError(f"aggregation must be one of {sorted(AGGREGATIONS)}, got {self.aggregation!r}")
        if self.rollout_rows() % self.optimizer_rows():
            raise ConfigError(f"the rollout batch, prompts_per_step x group_size ({self.rollout_rows()}), must be a "
                              f"multiple of an optimiser step's rows, batch_size x grad_accum ({self.step_rows()}); "
                              f"e.g. --batch-size {self.train.batch_size} --grad-accum "
                              f"{-(-self.rollout_rows() // self.train.batch_size)} for one step on the whole batch")
        world = distributed.env().world_size
        if world > 1 and self.prompts_per_step % world:
            raise ConfigError(f"prompts_per_step ({self.prompts_per_step}) must be a multiple of the world size "
                              f"({world}): each rank takes whole groups")


@dataclass
class GRPOConfig(CriticFreeConfig):
    out: str = opt("runs/grpo", "output folder")
    scale: str = opt("group", "advantage scale: group (GRPO) | batch | none (Dr. GRPO)")
    aggregation: str = opt("sequence", "loss aggregation: sequence (GRPO) | token (DAPO) | constant (Dr. GRPO)")
    clip_eps_high: float | None = opt(None, "upper clip ε_high (DAPO: 0.28; unset: ε)")
    beta: float = opt(0.04, "β of the k3 KL to the reference inside the loss (DeepSeekMath: 0.04; 0: no KL term)")

    def validate(self) -> None:
        super().validate()
        if self.scale not in SCALES:
            raise ConfigError(f"scale must be one of {SCALES}, got {self.scale!r}")
        if self.clip_eps_high is not None:
            check("clip_eps_high", self.clip_eps_high, gt=0, note="unset: --clip-eps")


class Scored(NamedTuple):
    """A scored rollout batch of B rows.

    rewards: (B,) the reward function's. terms: name -> (B,) each term of a combined reward.
    old_logp, ref_logp: (B, T − 1) log π_old and log π_ref of response tokens (ref_logp None without
    a KL; old_logp None when the update's first pass gives it). kl: (B,) Σ_t log π_old − log π_ref,
    the k1 sequence KL (None without one of them: the update then reports it from its first pass).
    advantages: (B,). keep: (B,) bool, the rows trained on (all, unless dynamic sampling dropped groups).
    """

    rewards: torch.Tensor
    terms: dict[str, torch.Tensor]
    old_logp: torch.Tensor | None
    ref_logp: torch.Tensor | None
    kl: torch.Tensor | None
    advantages: torch.Tensor
    keep: torch.Tensor


class CriticFree:
    """GRPO as an RL stage of tether.loop.rl; RLOO (trainers/rloo.py) overrides the three algorithm hooks:
    :meth:`signal`, :meth:`advantages` and :meth:`loss_args`."""

    name = "grpo"

    def __init__(self, cfg: CriticFreeConfig, inputs, model, trained, reference, backend, out: Path, device):
        self.cfg, self.inputs, self.model, self.reference, self.backend = cfg, inputs, model, reference, backend
        self.tokenizer, self.reward_fn, self.out, self.device = inputs.tokenizer, inputs.reward_fn, out, device
        self.scoring = compiled(model, cfg.train)  # the passes that score and train (sampling: the backend's own)
        self.training = self.scoring if trained is model else compiled(trained, cfg.train)
        self.order = DataOrder(len(inputs.prompts), cfg.prompts_per_step, cfg.train.seed)
        self.kl_in_loss = reference is not None and cfg.beta > 0  # RLOO puts its KL into the reward instead
        self.gold, self.eval_gold = gold_known(inputs.prompts), gold_known(inputs.eval_prompts)
        self.samples_path = out / "samples.jsonl"
        self.flat = 0  # iterations in a row without a learning signal (watch_signal)

    # --- the algorithm (GRPO) ---

    def signal(self, rewards: torch.Tensor, old_logp, ref_logp, mask) -> torch.Tensor:
        """What the advantages are computed from, (B,): GRPO's reward itself."""
        return rewards

    def advantages(self, signal: torch.Tensor) -> torch.Tensor:
        return grpo_advantages(signal, self.cfg.group_size, self.cfg.scale)

    def loss_args(self) -> dict:
        return {"clip_eps": self.cfg.clip_eps, "clip_eps_high": self.cfg.clip_eps_high,
                "beta": self.cfg.beta if self.kl_in_loss else 0.0, "aggregation": self.cfg.aggregation}

    def needs_old_logp(self) -> bool:
        """Whether log π_old needs a pass of its own before the update: with several optimiser steps per
        batch (the ratio moves after the first), when the KL enters the reward (RLOO: the advantages need
        it before any loss) and with dynamic sampling (the logged KL covers the dropped rows too).
        Otherwise the update's first forward pass is on the very weights that sampled: its log-probs,
        detached, are log π_old (TRL's GRPO skips the pass likewise)."""
        c = self.cfg
        return (c.inner_iters > 1 or c.rollout_rows() > c.optimizer_rows() or c.dynamic_sampling
                or (self.reference is not None and not self.kl_in_loss and c.beta > 0))

    # --- rollout -> score -> update ---

    def rollout(self, it: int) -> Rollout:
        prompts = [self.inputs.prompts[i] for i in self.order.indices(it)]
        lo, hi = distributed.shard_bounds(len(prompts))  # this rank's whole prompts (and so groups)
        s, G = self.cfg.sampling, self.cfg.group_size
        repeated = [p for p in prompts[lo:hi] for _ in range(G)]
        return rollout(self.model, self.tokenizer, repeated, max_new_tokens=s.max_new_tokens, temperature=s.temperature,
                       top_k=s.top_k, top_p=s.top_p, stop_strings=s.stops(), batch_size=s.gen_batch_size,
                       seed=self.cfg.train.seed * 1_000_003 + it, index_offset=lo * G,
                       backend=self.backend).to(self.device)

    @torch.no_grad()
    def score(self, batch: Rollout):
        cfg, G, mask = self.cfg, self.cfg.group_size, batch.mask
        rewards, terms = reward_terms(self.reward_fn, batch.prompts, batch.responses)
        rewards = rewards.to(self.device)  # (B,)
        args = dict(batch_size=cfg.train.batch_size, precision=cfg.train.precision)
        old_logp = response_logprobs(self.scoring, batch, cfg.sampling.temperature, **args) \
            if self.needs_old_logp() else None  # (B, T-1)
        ref_logp = self.reference.response_logprobs(batch, cfg.sampling.temperature, **args) \
            if self.reference is not None and cfg.beta > 0 else None  # (B, T-1)
        kl = ((old_logp - ref_logp) * mask).sum(-1) if ref_logp is not None and old_logp is not None else None
        signal = self.signal(rewards, old_logp, ref_logp, mask)
        lo = distributed.env().rank * len(signal)  # on every rank's rewards: "batch" scaling needs them all
        advantages = self.advantages(distributed.gather(signal))[lo : lo + len(signal)]  # (B,)
        grouped = rewards.view(-1, G)  # (B/G, G)
        varied = (grouped != grouped[:, :1]).any(-1).repeat_interleave(G)  # (B,) rows of groups with a signal
        keep = varied if cfg.dynamic_sampling else torch.ones_like(varied)
        scored = Scored(rewards, terms, old_logp, ref_logp, kl, advantages, keep)
        g = distributed.gather
        every = g(rewards)
        metrics = {"reward/mean": every.mean().item(), "reward/std": every.std().item() if len(every) > 1 else 0.0,
                   "rollout/length": g(mask.sum(-1).float()).mean().item(),
                   "rollout/ended": g(batch.ended.float()).mean().item(),
                   "rollout/rows_kept": g(keep.float()).mean().item()}
        metrics.update({**term_metrics(terms), **(gold_metric(batch) if self.gold else {})})
        if kl is not None:
            metrics.update(self.kl_metrics(rewards, kl))
        self.watch_signal(varied, metrics)
        return scored, metrics, old_logp is None or bool(torch.isfinite(old_logp).all())

    def watch_signal(self, varied: torch.Tensor, metrics: dict[str, float]) -> None:
        """No learning signal when every group's rewards are equal: every advantage is 0 (tether.loop.rl.no_signal)."""
        self.flat = 0 if distributed.all_reduce(varied.sum()).item() else self.flat + 1
        no_signal(self.name, self.flat, self.cfg.no_signal_stop, metrics, f"every group's {self.cfg.group_size} "
                  "rewards were equal", self.cfg.sampling.max_new_tokens)

    def kl_metrics(self, rewards: torch.Tensor, kl: torch.Tensor) -> dict[str, float]:
        """The sequence KL (k1, B,) and reward − β·KL, averaged over every rank's rows."""
        r, kl = distributed.gather(rewards), distributed.gather(kl)
        return {"kl/k1": kl.mean().item(), "objective/reward_minus_kl": (r - self.cfg.beta * kl).mean().item()}

    def update(self, batch: Rollout, s: Scored, run) -> dict[str, float]:
        """``inner_iters`` passes over the batch, one optimiser step per mini-batch of ``optimizer_rows()``
        consecutive global rows (only the kept ones train; a mini-batch with none kept takes no step)."""
        cfg, e = self.cfg, distributed.env()
        B, step, micro = len(batch.prompts), cfg.optimizer_rows(), cfg.train.batch_size
        first_row = e.rank * B  # this rank's rows are global rows [first_row, first_row + B)
        first_pass_kl = torch.zeros(B, device=self.device)  # (B,) when s.kl is None
        kept = s.keep.nonzero().squeeze(-1)
        filler = kept[:1] if len(kept) else torch.zeros(1, dtype=torch.long, device=self.device)

        def count(rows):
            return {"units": aggregation_count(batch.mask[rows], cfg.aggregation)}

        def loss_fn(rows):
            sub = batch.rows(rows.cpu()).trimmed().to(self.device)  # the batch's other columns: padding here
            w = sub.mask.shape[1]
            logp = response_logprobs(self.training, sub, cfg.sampling.temperature)  # (b, w), with grad
            old = s.old_logp[rows, :w] if s.old_logp is not None else logp.detach()  # see needs_old_logp
            ref = s.ref_logp[rows, :w] if s.ref_logp is not None else old  # unused when β = 0
            if s.kl is None and s.ref_logp is not None:
                first_pass_kl[rows] = ((old - ref) * sub.mask).sum(-1)
            out = grpo_loss(logp, old, ref, s.advantages[rows], sub.mask, max_tokens=cfg.sampling.max_new_tokens,
                            **self.loss_args())
            return {"units": out.total}, {"loss/policy": out.loss.item(), "policy/clip_fraction":
                                          out.clip_fraction.item(), "policy/kl_k3": out.kl.item()}

        sums, steps = {}, 0
        total_rows = B * e.world_size
        for inner in range(cfg.inner_iters):
            for start in range(0, total_rows, step):  # the same mini-batches on every rank
                lo, hi = max(start - first_row, 0), min(start + step - first_row, B)
                mine = kept[(kept >= lo) & (kept < hi)] if hi > lo else kept[:0]
                if not distributed.all_reduce(torch.tensor(len(mine))).item():
                    continue  # nothing kept in this mini-batch on any rank
                parts = [p for i in range(0, len(mine), micro)
                         for p in batch.passes(mine[i : i + micro], cfg.train.pass_cost)]
                out = accumulate(self.training, parts, count, loss_fn, filler=filler,
                                 context=lambda: autocast(self.device, cfg.train.precision))
                if out.nonfinite is not None:
                    raise TrainingDiverged(out.nonfinite, from_start=steps == 0)
                grad_norm = run.optimizer_step(confirm=False, first=steps == 0)
                steps += 1
                for k, v in {**out.metrics, "train/grad_norm": grad_norm}.items():
                    sums[k] = sums.get(k, 0.0) + v
        metrics = {k: v / steps for k, v in sums.items() if k != "loss"} if steps else {}
        metrics["policy/updates"] = float(steps)
        if not self.kl_in_loss:
            metrics.pop("policy/kl_k3", None)
        if s.kl is None and s.ref_logp is not None and steps:  # the rollout's KL, from the first pass
            metrics.update(self.kl_metrics(s.rewards, first_pass_kl))
        return metrics

    def after_update(self, metrics: dict[str, float]) -> None:
        self.backend.sync(self.model)  # the next rollout samples the updated policy

    def evaluate(self, step: int) -> dict[str, float]:
        if not self.inputs.eval_prompts:
            return {}
        return evaluate_policy(self.model, self.tokenizer, self.inputs.eval_prompts, self.reward_fn, self.reference,
                               self.cfg.sampling, samples=self.cfg.eval_samples, seed=self.cfg.train.seed + 999_983,
                               step=step, gold=self.eval_gold, samples_path=self.samples_path,
                               precision=self.cfg.train.precision)

    def state(self) -> dict:
        return {}

    def load_state(self, extra: dict, start: int) -> None:
        if start:
            self.backend.sync(self.model)  # an engine with its own copy (vLLM) was loaded from cfg.model
        self.samples_path = clear_samples(self.out, start)


def run_critic_free(cfg: CriticFreeConfig, stage: type[CriticFree], reward_fn: RewardFn | None) -> Path:
    """Load, train and write GRPO or RLOO (``stage``); returns the output folder."""
    cfg.validate()
    torch.manual_seed(cfg.train.seed)
    device = resolve_device(cfg.train.device)
    inputs = load_inputs(cfg, reward_fn, device)
    check_output(Path(cfg.out), resume=cfg.resume, overwrite=cfg.overwrite)

    model = load_policy(cfg, device)
    needs_reference = cfg.beta > 0 or bool(inputs.eval_prompts)  # β = 0: only for the held-out KL
    reference = reference_for(model, cfg.model, cfg.ref, cfg.lora.r, device, cfg.train) if needs_reference else None
    backend = make_backend(cfg.sampling.backend, model, inputs.tokenizer, model_path=cfg.model,
                           compile=cfg.train.compile)
    out = prepare_output(Path(cfg.out), resume=cfg.resume, overwrite=cfg.overwrite)  # inputs and models have loaded
    net = distributed.Trainable(model, cfg.train.strategy, device)  # under torchrun: DDP around model, or shards
    log.info("%s of %s (%d trainable parameters) on %d prompts, reward %s, reference %s", stage.name.upper(),
             cfg.model, count_parameters(model, True), len(inputs.prompts), inputs.cfg.reward,
             "none" if reference is None else cfg.ref or cfg.model)
    final = train_rl(stage(cfg, inputs, model, net.module, reference, backend, out, device), net, cfg.train, out,
                     resume=cfg.resume, run_config=to_dict(inputs.cfg), n_samples=cfg.rollout_rows())
    return write_artifact(out, stage=stage.name, cfg=inputs.cfg, model=model, tokenizer=inputs.tokenizer,
                          data=data_record(cfg, inputs), metrics=final)


def run_grpo(cfg: GRPOConfig, reward_fn: RewardFn | None = None) -> Path:
    """GRPO from ``cfg.model`` on ``cfg.prompts`` against ``cfg.reward`` (or the function
    ``reward_fn(prompts, responses)``, for library use); returns the output folder."""
    return run_critic_free(cfg, CriticFree, reward_fn)
