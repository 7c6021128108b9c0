"""PPO with a KL penalty to the SFT policy: the RL stage of InstructGPT (Ouyang et al. 2022).

Each iteration of the RL loop (tether.loop.rl; ``--steps`` counts iterations):

1. rollout: sample one response per prompt from π_θ (plain temperature sampling, KV cache);
2. score:   the reward R(x, y) of every response (any reward from tether.rewards; a fixed
            ``empty_score`` for an empty response), minus a penalty for responses that never
            ended; log-probs of π_θ and π_ref and values V at every response token, once,
            without gradients; the per-token reward r_t = −β·k(log π_θ − log π_ref) plus R(x, y)
            on the last token (Ziegler et al. 2019, eq. 2; k the chosen KL estimator, k1 by
            default); GAE (γ = 1, λ = 0.95), advantages whitened over the batch;
3. update:  epochs over shuffled mini-batches of ``batch_size × grad_accum`` rows, one optimiser step
            each, of the clipped surrogate plus the clipped value loss (plus γ_ptx · NLL on
            pretraining data for PPO-ptx), each term a mean over the mini-batch's tokens
            (tether.loop.accumulate); an epoch loop stops early once the approximate KL to the
            rollout policy passes ``target_kl``;
4. control: with ``kl_target`` set, β follows the adaptive controller of Ziegler et al. 2019.

Every formula lives in tether.losses (gae, whiten, ppo_policy_loss, ppo_value_loss, sft_nll,
kl_estimate, adaptive_kl_coef); this file gathers their inputs.

Where this departs from the papers: the episode is the response (no discount, γ = 1 by default)
and the value after the last token is 0; the learning-rate schedule runs per iteration. With LoRA
the reference is the policy with its adapters switched off, so no second copy of the model is
held. Under torchrun (DDP or FSDP2) each rank samples ``rollout_batch / world`` prompts, and the
mini-batches are cut from one permutation of every rank's rows (:func:`ppo_update`), so an
update is one process's; advantage and reward whitening, the early-stop KL, the KL the controller
sees and the logged metrics are over all ranks.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from itertools import zip_longest
from pathlib import Path
from typing import NamedTuple

import torch

from tether import distributed
from tether.config import check, check_fields, group, opt, to_dict
from tether.errors import ConfigError
from tether.generation import make_backend
from tether.loop import DataOrder, TrainConfig, TrainingDiverged, accumulate, autocast, compiled, resolve_device
from tether.loop.rl import clear_samples, evaluate_policy, gold_known, gold_metric, reward_terms, term_metrics, train_rl
from tether.losses import (
    KL_ESTIMATORS,
    adaptive_kl_coef,
    explained_variance,
    gae,
    kl_estimate,
    labelled_tokens,
    masked_mean,
    ppo_policy_loss,
    ppo_value_loss,
    shaped_rewards,
    summed_nll,
    whiten,
)
from tether.models import count_parameters
from tether.models.value import ActorCritic, critic_source, load_critic
from tether.rewards import RewardFn
from tether.rollout import Rollout, SamplingConfig, rollout
from tether.scoring import labelled_logprobs, reference_for
from tether.trainers.artifact import check_output, prepare_output, write_artifact
from tether.trainers.ptx import PtxStream, ptx_rows, ptx_stream
from tether.trainers.rl import RLConfig, data_record, load_inputs, load_policy

log = logging.getLogger("tether.ppo")

VALUE_KINDS = ("critic", "head")
REWARD_NORMS = ("none", "batch")


@dataclass
class PPOConfig(RLConfig):
    out: str = opt("runs/ppo", "output folder")
    value: str = opt("critic", "critic (a separate value model) | head (a value head on the policy)")
    critic_model: str = opt("", "critic initialisation (empty: the first reward model of --reward, an ensemble's "
                                "first member; with no reward model, --model)")
    rollout_batch: int = opt(64, "prompts sampled per iteration")
    epochs: int = opt(4, "passes over each rollout batch")
    no_eos_penalty: float = opt(1.0, "subtracted from the reward of a response that never ended")
    empty_score: float = opt(-1.0, "the reward of an empty response, instead of asking the reward (a reward model "
                                   "never saw one and rates it arbitrarily; PPO finds that fast)")
    beta: float = opt(0.05, "β, the KL penalty coefficient (the start value with kl_target)")
    kl_estimator: str = opt("k1", "KL estimator in the per-token penalty: k1 | k2 | k3 (all three are logged)")
    kl_target: float = opt(0.0, "adaptive KL control: the target KL in nats per response (0: fixed β)")
    kl_horizon: float = opt(10000.0, "adaptive KL control: the horizon K_β = episodes / horizon")
    reward_norm: str = opt("none", "none | batch (whiten the rewards of each batch)")
    reward_clip: float = opt(0.0, "clip rewards to ±this after normalisation (0: off)")
    gamma: float = opt(1.0, "GAE discount γ")
    lam: float = opt(0.95, "GAE λ")
    clip_eps: float = opt(0.2, "PPO clip ε of the policy ratio")
    value_clip: float = opt(0.2, "clip of the value change in the value loss")
    vf_coef: float = opt(0.1, "weight of the value loss")
    target_kl: float = opt(0.0, "stop an update early once the approximate KL to the rollout policy passes this "
                                "(0: never)")
    ptx_data: str = opt("", "PPO-ptx: SFT or pretraining data for the γ·log π(x) term (empty: off)")
    ptx_coef: float = opt(0.0, "PPO-ptx: γ, the weight of the pretraining term (InstructGPT: 27.8)")
    max_len: int = opt(256, "longest ptx example in tokens")
    sampling: SamplingConfig = group(lambda: SamplingConfig(gen_batch_size=32))
    train: TrainConfig = group(lambda: TrainConfig(steps=100, batch_size=16, lr=1e-5, warmup_steps=0,
                                                   schedule="constant", eval_every=10, save_every=20))

    def validate(self) -> None:
        super().validate()
        if self.value not in VALUE_KINDS:
            raise ConfigError(f"value must be one of {VALUE_KINDS}, got {self.value!r}")
        if self.kl_estimator not in KL_ESTIMATORS:
            raise ConfigError(f"kl_estimator must be one of {sorted(KL_ESTIMATORS)}, got {self.kl_estimator!r}")
        if self.reward_norm not in REWARD_NORMS:
            raise ConfigError(f"reward_norm must be one of {REWARD_NORMS}, got {self.reward_norm!r}")
        check_fields(self, "rollout_batch epochs", ge=1, integer=True)
        check("max_len", self.max_len, ge=2, integer=True)
        check_fields(self, "empty_score", note="the reward of an empty response")
        check_fields(self, "no_eos_penalty beta kl_target reward_clip vf_coef target_kl ptx_coef", ge=0)
        check("kl_horizon", self.kl_horizon, gt=0)
        check_fields(self, "gamma lam", ge=0, le=1)
        check("clip_eps", self.clip_eps, gt=0, lt=1)
        check("value_clip", self.value_clip, gt=0)
        if self.rollout_batch % self.step_rows():
            raise ConfigError(f"rollout_batch ({self.rollout_batch}) must be a multiple of batch_size x grad_accum "
                              f"({self.step_rows()})")
        if self.ptx_coef and not self.ptx_data:
            raise ConfigError("ptx_coef needs --ptx-data")
        world = distributed.env().world_size
        if world > 1 and (self.rollout_batch % world or self.step_rows() % world):
            raise ConfigError(f"under torchrun rollout_batch ({self.rollout_batch}) and batch_size x grad_accum "
                              f"({self.step_rows()}) must be multiples of the world size ({world})")


# --- scoring a rollout --------------------------------------------------------------------


class Scored(NamedTuple):
    """What the update needs from one rollout batch, each (B, T − 1), 0 off the response:
    old_logp (π_θ at rollout time), values (V at rollout time), advantages (whitened GAE), returns."""

    old_logp: torch.Tensor
    values: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor


def sequence_scores(raw: torch.Tensor, empty: torch.Tensor, ended: torch.Tensor,
                    cfg: PPOConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(reward, score) of each response: the reward with ``empty_score`` for empty responses, and the
    score PPO trains on: reward − no_eos_penalty if the response never ended, then optionally
    whitened over the batch and clipped to ±reward_clip. Shape: (B,) each -> (B,), (B,).
    """
    raw = torch.where(empty, torch.full_like(raw, cfg.empty_score), raw)
    score = raw - cfg.no_eos_penalty * (~ended).float()
    if cfg.reward_norm == "batch":  # over every rank's batch
        every = distributed.gather(score)
        score = (score - every.mean()) / (every.std() + 1e-8)
    if cfg.reward_clip:
        score = score.clamp(-cfg.reward_clip, cfg.reward_clip)
    return raw, score


@torch.no_grad()
def score_rollout(ac: ActorCritic, reference, batch: Rollout, score: torch.Tensor, cfg: PPOConfig,
                  beta: float) -> tuple[Scored, dict[str, float]]:
    """Log-probs, values, the shaped reward and GAE for one batch (no gradients)."""
    mask = batch.mask.float()  # (B, T-1)
    entropies = torch.zeros(mask.shape, device=mask.device)  # (B, T-1)
    old_logp, values = ac(batch.input_ids, batch.attention_mask, batch.labels, cfg.sampling.temperature,
                          entropies)  # (B, T-1), 0 off the response; (B, T)
    values = values[:, :-1] * mask  # (B, T-1): V of the state before each response token
    ref_logp = reference.response_logprobs(batch, cfg.sampling.temperature, precision=cfg.train.precision)
    per_token = {k: kl_estimate(old_logp, ref_logp, k) * mask for k in KL_ESTIMATORS}  # each (B, T-1)
    rewards = shaped_rewards(score, per_token[cfg.kl_estimator], mask, beta)
    advantages, returns = gae(rewards, values, mask, cfg.gamma, cfg.lam)
    total = distributed.all_reduce if distributed.env().active else None  # whiten over every rank's batch
    s = Scored(old_logp, values, whiten(advantages, mask, total=total), returns)
    metrics = {f"kl/{k}": v.sum(-1).mean().item() for k, v in per_token.items()}  # per response
    metrics["objective/entropy"] = masked_mean(entropies, mask).item()
    metrics["objective/non_score_reward"] = (rewards.sum(-1) - score).mean().item()
    return s, metrics


# --- the update ---------------------------------------------------------------------------


def ppo_update(ac, run, batch: Rollout, s: Scored, cfg: PPOConfig, iteration: int, ptx: PtxStream | None
               ) -> dict[str, float]:
    """Epochs of clipped-surrogate + value updates over shuffled mini-batches of one rollout batch.

    Each epoch is one permutation of the whole rollout batch (all ranks' rows), drawn from (seed,
    iteration) and the same on every rank, cut into mini-batches of ``batch_size × grad_accum`` rows,
    one optimiser step each. A rank trains the rows of each mini-batch it sampled (global rows
    [rank·B, (rank + 1)·B)), in micro-batches of ``batch_size`` (each run as passes of like-length rows,
    ``pass_cost``: tether.loop.accumulate.length_passes), and its share of the mini-batch's
    ``grad_accum`` PPO-ptx micro-batches; the loss is Σ (policy + vf_coef·value) over the mini-batch's
    response tokens / their number on every rank, plus ptx_coef · Σ NLL over its ptx labelled tokens /
    their number (tether.loop.accumulate), so an update is one process's at any world size.
    """
    e = distributed.env()
    B = len(batch.prompts)  # this rank's rows: global rows [first, first + B)
    first, mb, micro, cost = e.rank * B, cfg.step_rows(), cfg.train.batch_size, cfg.train.pass_cost
    policy = ac.module.policy if hasattr(ac, "no_sync") else ac.policy  # under DDP: the wrapped model's
    device = batch.input_ids.device
    none = torch.zeros(0, dtype=torch.long)

    def count(part) -> dict[str, float]:
        idx, ptx_batch = part
        n = {"tokens": float(batch.mask[idx].sum())}
        if ptx is not None:  # the same terms on every rank, whatever it holds
            n["ptx"] = float(labelled_tokens(ptx_batch["labels"])) if ptx_batch is not None else 0.0
        return n

    def loss_fn(part):
        idx, ptx_batch = part
        rows = idx if len(idx) else torch.zeros(1, dtype=torch.long)  # a ptx-only part: row 0 at weight 0 (below)
        sub = batch.rows(rows).trimmed()  # w columns: the batch's others are padding in these rows
        mask, w = sub.mask.float(), sub.mask.shape[1]
        logp, values = ac(sub.input_ids, sub.attention_mask, sub.labels, cfg.sampling.temperature)  # (b, w), (b, w+1)
        pol = ppo_policy_loss(logp, s.old_logp[rows, :w], s.advantages[rows, :w], mask, cfg.clip_eps)
        val = ppo_value_loss(values[:, :-1] * mask, s.values[rows, :w], s.returns[rows, :w], mask, cfg.value_clip)
        # with no PPO rows the pass still reaches every parameter, as DDP needs, and adds nothing
        terms = {"tokens": (pol.total + cfg.vf_coef * val.total) * float(len(idx) > 0)}
        metrics = {"loss/policy": pol.loss.item(), "loss/value": val.loss.item(),
                   "policy/clip_fraction": pol.clip_fraction.item(), "policy/approx_kl": pol.approx_kl.item(),
                   "value/clip_fraction": val.clip_fraction.item()}
        if ptx_batch is not None:
            nll = summed_nll(*labelled_logprobs(policy, ptx_batch["input_ids"], ptx_batch["attention_mask"],
                                                ptx_batch["labels"], summed=True))
            terms["ptx"] = cfg.ptx_coef * nll.total  # its mean over the mini-batch: loss/ptx (below)
        return terms, metrics

    sums: dict[str, float] = {}
    steps, stopped = 0, False
    g = torch.Generator().manual_seed(cfg.train.seed * 1_000_003 + iteration)
    for _ in range(cfg.epochs):
        perm = torch.randperm(B * e.world_size, generator=g)  # every rank draws the same
        for start in range(0, len(perm), mb):
            rows = perm[start : start + mb]
            mine = rows[(rows >= first) & (rows < first + B)] - first  # this rank's, in the permutation's order
            ppo_parts = [p for m in range(0, len(mine), micro) for p in batch.passes(mine[m : m + micro], cost)]
            ptx_parts = [{k: v.to(device) for k, v in b.items()} for b in ptx.take(cfg.train.grad_accum)] if ptx else []
            parts = list(zip_longest(ppo_parts, ptx_parts, fillvalue=None))
            parts = [(none if idx is None else idx, p) for idx, p in parts]
            out = accumulate(ac, parts, count, loss_fn, filler=(none, None),
                             context=lambda: autocast(device, cfg.train.precision))
            if out.nonfinite is not None:
                raise TrainingDiverged(f"the PPO {out.nonfinite[4:]}", from_start=steps == 0)
            grad_norm = run.optimizer_step(confirm=False, first=steps == 0)
            steps += 1
            ptx_nll = {"loss/ptx": out.terms["ptx"] / cfg.ptx_coef} if "ptx" in out.terms else {}
            for k, v in {**out.metrics, **ptx_nll, "train/grad_norm": grad_norm}.items():
                sums[k] = sums.get(k, 0.0) + v
            if cfg.target_kl and out.metrics["policy/approx_kl"] > cfg.target_kl:
                stopped = True
                break
        if stopped:
            break
    out = {k: v / steps for k, v in sums.items() if k != "loss"}
    out.update({"policy/updates": float(steps), "policy/early_stop": float(stopped)})
    return out


# --- the stage ----------------------------------------------------------------------------


class PPO:
    """PPO as an RL stage of tether.loop.rl: rollout -> score -> update, then adaptive β."""

    name = "ppo"

    def __init__(self, cfg: PPOConfig, inputs, ac: ActorCritic, trained, reference, out: Path, device, ptx_rows):
        self.cfg, self.inputs, self.ac, self.reference, self.device = cfg, inputs, ac, reference, device
        self.policy, self.tokenizer, self.reward_fn = ac.policy, inputs.tokenizer, inputs.reward_fn
        self.sampler = make_backend(cfg.sampling.backend, self.policy, self.tokenizer, model_path=cfg.model,
                                    compile=cfg.train.compile)
        self.scoring = compiled(ac, cfg.train)  # the passes that score and train (sampling: the sampler's decoding)
        self.training = self.scoring if trained is ac else compiled(trained, cfg.train)
        self.order = DataOrder(len(inputs.prompts), cfg.rollout_batch, cfg.train.seed)
        self.out, self.ptx_rows, self.beta, self.ptx, self.iteration = out, ptx_rows, cfg.beta, None, 0
        self.gold, self.eval_gold = gold_known(inputs.prompts), gold_known(inputs.eval_prompts)
        self.samples_path = out / "samples.jsonl"

    def load_state(self, extra: dict, start: int) -> None:
        self.beta = extra.get("beta", self.cfg.beta)
        self.ptx = ptx_stream(self.cfg, self.ptx_rows, self.tokenizer.pad_token_id, start, extra.get("ptx_position"))
        self.samples_path = clear_samples(self.out, start)  # keep only what the checkpoint had seen
        if start:
            self.sampler.sync(self.policy)  # an engine with its own copy (vLLM) was loaded from cfg.model

    def state(self) -> dict:
        return {"beta": self.beta, **({"ptx_position": self.ptx.position} if self.ptx is not None else {})}

    def rollout(self, it: int) -> Rollout:
        self.iteration = it
        prompts = [self.inputs.prompts[i] for i in self.order.indices(it)]
        lo, hi = distributed.shard_bounds(len(prompts))  # this rank's prompts
        s = self.cfg.sampling
        return rollout(self.policy, self.tokenizer, prompts[lo:hi], max_new_tokens=s.max_new_tokens,
                       temperature=s.temperature, top_k=s.top_k, top_p=s.top_p, stop_strings=s.stops(),
                       batch_size=s.gen_batch_size, seed=self.cfg.train.seed * 1_000_003 + it,
                       index_offset=lo, backend=self.sampler).to(self.device)

    def score(self, batch: Rollout):
        raw, terms = reward_terms(self.reward_fn, batch.prompts, batch.responses)  # (B,), each term's (B,)
        empty = torch.tensor([not r.strip() for r in batch.responses], device=self.device)  # (B,)
        raw, score = sequence_scores(raw.to(self.device), empty, batch.ended, self.cfg)
        with autocast(self.device, self.cfg.train.precision):
            scored, metrics = score_rollout(self.scoring, self.reference, batch, score, self.cfg, self.beta)
        mask, every = batch.mask.float(), distributed.gather(raw)  # every rank's rewards
        metrics.update({
            "reward/mean": every.mean().item(), "reward/std": every.std().item(), "reward/score": score.mean().item(),
            "kl/beta": self.beta, "objective/reward_minus_kl": every.mean().item() - self.beta * metrics["kl/k1"],
            "value/explained_variance": explained_variance(scored.values, scored.returns, mask),
            "rollout/length": mask.sum(-1).mean().item(), "rollout/ended": batch.ended.float().mean().item(),
            "rollout/empty": empty.float().mean().item()})
        metrics.update({**term_metrics(terms), **(gold_metric(batch) if self.gold else {})})
        finite = all(bool(torch.isfinite(t).all()) for t in (scored.old_logp, scored.values))
        return scored, metrics, finite

    def update(self, batch: Rollout, scored: Scored, run) -> dict[str, float]:
        return ppo_update(self.training, run, batch, scored, self.cfg, self.iteration, self.ptx)

    def after_update(self, metrics: dict[str, float]) -> None:
        self.sampler.sync(self.policy)  # the next rollout samples the updated policy
        if distributed.env().active:  # the mean over ranks (equal shares) of each rank's figure
            world = distributed.env().world_size
            metrics.update({k: v / world for k, v in distributed.reduce_metrics(metrics).items()})
        if self.cfg.kl_target:  # Ziegler et al. 2019, on the batch's measured KL
            self.beta = adaptive_kl_coef(self.beta, metrics["kl/k1"], self.cfg.kl_target, self.cfg.kl_horizon,
                                         self.cfg.rollout_batch)

    def evaluate(self, step: int) -> dict[str, float]:
        if not self.inputs.eval_prompts:
            return {}
        return evaluate_policy(self.policy, self.tokenizer, self.inputs.eval_prompts, self.reward_fn, self.reference,
                               self.cfg.sampling, samples=self.cfg.eval_samples, seed=self.cfg.train.seed, step=step,
                               gold=self.eval_gold, samples_path=self.samples_path, precision=self.cfg.train.precision)


def run_ppo(cfg: PPOConfig, reward: RewardFn | None = None) -> Path:
    """Train ``cfg.model`` with PPO against ``cfg.reward`` (or the ``reward`` object, a callable
    ``(prompts, responses) -> (N,)``, when given); returns the output folder."""
    cfg.validate()
    torch.manual_seed(cfg.train.seed)
    device = resolve_device(cfg.train.device)
    inputs = load_inputs(cfg, reward, device)
    ptx = ptx_rows(cfg, inputs.tokenizer)
    critic_init = critic_source(cfg, reward)

    check_output(Path(cfg.out), resume=cfg.resume, overwrite=cfg.overwrite)
    policy = load_policy(cfg, "cpu")
    critic = load_critic(critic_init, cfg.lora) if critic_init is not None else None
    ac = ActorCritic(policy, critic).to(device).eval()  # eval: no dropout, so the ratio is 1 before the update
    net = distributed.Trainable(ac, cfg.train.strategy, device)  # under torchrun: DDP around ac, or shards
    reference = reference_for(policy, cfg.model, cfg.ref, cfg.lora.r, device, cfg.train)
    out = prepare_output(Path(cfg.out), resume=cfg.resume, overwrite=cfg.overwrite)  # inputs and models have loaded
    stage = PPO(cfg, inputs, ac, net.module, reference, out, device, ptx)
    log.info("PPO of %s against reward %s (value: %s, β=%g%s): %d trainable parameters, %d prompts", cfg.model,
             inputs.cfg.reward, cfg.value, cfg.beta, f", KL target {cfg.kl_target}" if cfg.kl_target else "",
             count_parameters(ac, True), len(inputs.prompts))
    final = train_rl(stage, net, cfg.train, out, resume=cfg.resume, run_config=to_dict(inputs.cfg),
                     n_samples=cfg.rollout_batch)
    return write_artifact(out, stage="ppo", cfg=inputs.cfg, model=policy, tokenizer=inputs.tokenizer,
                          data=data_record(cfg, inputs), metrics=final)
