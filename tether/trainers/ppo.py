"""PPO with a KL penalty to the SFT policy: the RL stage of InstructGPT (Ouyang et al. 2022).

Each iteration (``--steps`` counts iterations):

1. rollout: sample one response per prompt from π_θ (plain temperature sampling, KV cache);
2. score:   the reward R(x, y) of every response (any reward from tether.rewards; a fixed
            ``empty_score`` for an empty response), minus a penalty for responses that never
            ended; log-probs of π_θ and π_ref and values V at every response token, once,
            without gradients;
3. shape:   per-token reward  r_t = −β·k(log π_θ − log π_ref)  plus R(x, y) on the last token
            (Ziegler et al. 2019, eq. 2; k is the chosen KL estimator, k1 by default);
4. GAE:     advantages and returns (γ = 1, λ = 0.95), advantages whitened over the batch;
5. update:  several epochs over shuffled mini-batches of the clipped surrogate plus the clipped
            value loss (plus γ_ptx · NLL on pretraining data for PPO-ptx); an epoch loop stops
            early once the approximate KL to the rollout policy passes ``target_kl``;
6. control: with ``kl_target`` set, β follows the adaptive controller of Ziegler et al. 2019.

Before the first update and every ``eval_every`` iterations the policy is sampled on held-out
prompts: reward, KL to the reference, length (and the gold reward inside the gold world) go to
``metrics.jsonl`` (step 0 is the starting policy), and every sample with its scores to
``samples.jsonl``, so a person can read what the numbers mean.

Every formula lives in tether.losses (gae, whiten, ppo_policy_loss, ppo_value_loss,
kl_estimate, adaptive_kl_coef); this file gathers their inputs.

Where this departs from the papers: the episode is the response (no discount, γ = 1 by
default) and the value after the last token is 0; the learning-rate schedule runs per iteration
(warm-up and decay counted in iterations); ``--batch-size`` × ``--grad-accum`` sequences make
one mini-batch; models stay in eval mode (no dropout), so the ratio is exactly 1 at the first
mini-batch of every iteration. With LoRA the reference is the policy with its adapters switched off, so no
second copy of the model is held. Under torchrun (DDP) each rank samples ``rollout_batch / world`` prompts and
shuffles its own rows into its share of every mini-batch (so the grouping of rows into mini-batches differs from
one process); advantage and reward whitening, the early-stop KL, the KL the controller sees and the logged
metrics are over all ranks (means of per-rank figures, exact for per-response means).
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from tqdm.auto import tqdm

from tether import distributed
from tether.config import check, check_fields, group, opt, to_dict
from tether.data import fingerprint, load_prompts, load_sft
from tether.data.collate import encode_sft, nothing_left, pad
from tether.errors import ConfigError
from tether.generation import make_backend
from tether.loop import (
    Checkpoints,
    DataOrder,
    MetricsLog,
    TrainConfig,
    TrainingDiverged,
    autocast,
    build_optimizer,
    checkpoint_extra,
    checkpoint_metrics,
    checkpoint_state,
    compiled,
    logged_until,
    lr_factor,
    nonfinite_weights,
    resolve_device,
    resume_from,
    with_metrics,
)
from tether.losses import (
    KL_ESTIMATORS,
    adaptive_kl_coef,
    gae,
    kl_estimate,
    masked_mean,
    ppo_policy_loss,
    ppo_value_loss,
    sft_nll,
    whiten,
)
from tether.losses.lm import token_logprobs
from tether.models import LoraConfig, apply_lora, count_parameters, load_model, load_tokenizer
from tether.models.hf import check_model_source
from tether.models.value import ActorCritic, load_critic
from tether.rewards import RewardFn, load_reward, reward_for_prompts, reward_model_folders
from tether.rollout import Rollout, policy_logprobs, rollout
from tether.trainers.artifact import check_output, data_info, prepare_output, write_artifact

log = logging.getLogger("tether.ppo")

VALUE_KINDS = ("critic", "head")
REWARD_NORMS = ("none", "batch")


def _ppo_defaults() -> TrainConfig:
    return TrainConfig(steps=100, batch_size=16, lr=1e-5, warmup_steps=0, schedule="constant", eval_every=10,
                       save_every=20)


@dataclass
class PPOConfig:
    model: str = opt("", "policy to start from: an SFT folder, a local path or a hub name")
    ref: str = opt("", "the frozen reference π_SFT (empty: the same as --model)")
    reward: str = opt("gold", "reward: 'gold', a reward-model or ensemble folder (see tether.rewards)")
    aggregation: str = opt("", "ensemble aggregation: mean | min | uwo (empty: the ensemble's own)")
    prompts: str = opt("", "training prompts (a file or dataset with a prompt field)")
    eval_prompts: str = opt("", "held-out prompts for evaluation (empty: no evaluation)")
    eval_size: int = opt(64, "held-out prompts (a seeded sample, the same every time) scored at each evaluation")
    out: str = opt("runs/ppo", "output folder")
    value: str = opt("critic", "critic (a separate value model) | head (a value head on the policy)")
    critic_model: str = opt("", "critic initialisation (empty: the first reward model of --reward, an ensemble's "
                                "first member; with no reward model, --model)")
    rollout_batch: int = opt(64, "prompts sampled per iteration")
    epochs: int = opt(4, "passes over each rollout batch")
    max_new_tokens: int = opt(48, "longest response")
    temperature: float = opt(1.0, "sampling temperature (log-probs are computed at the same temperature)")
    top_k: int = opt(0, "top-k sampling (0: off; it biases the KL estimate, off unless you insist)")
    top_p: float = opt(1.0, "nucleus sampling (1: off; it biases the KL estimate, off unless you insist)")
    stop_strings: str = opt("", "comma-separated strings that end a response (kept in it)")
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
    resume: bool = opt(False, "continue from the latest checkpoint in out")
    overwrite: bool = opt(False, "replace the run tether wrote in out, once the new one is complete")
    lora: LoraConfig = group(LoraConfig)
    train: TrainConfig = group(_ppo_defaults)

    def mini_batch(self) -> int:
        return self.train.batch_size * self.train.grad_accum

    def validate(self) -> None:
        if not self.model or not self.prompts:
            raise ConfigError("--model and --prompts are required")
        if self.value not in VALUE_KINDS:
            raise ConfigError(f"value must be one of {VALUE_KINDS}, got {self.value!r}")
        if self.kl_estimator not in KL_ESTIMATORS:
            raise ConfigError(f"kl_estimator must be one of {sorted(KL_ESTIMATORS)}, got {self.kl_estimator!r}")
        if self.reward_norm not in REWARD_NORMS:
            raise ConfigError(f"reward_norm must be one of {REWARD_NORMS}, got {self.reward_norm!r}")
        check_fields(self, "eval_size rollout_batch epochs max_new_tokens", ge=1, integer=True)
        check("max_len", self.max_len, ge=2, integer=True)
        check("top_k", self.top_k, ge=0, integer=True, note="0: off")
        check("temperature", self.temperature, gt=0)
        check("top_p", self.top_p, gt=0, le=1, note="1: off")
        check_fields(self, "empty_score", note="the reward of an empty response")
        check_fields(self, "no_eos_penalty beta kl_target reward_clip vf_coef target_kl ptx_coef", ge=0)
        check("kl_horizon", self.kl_horizon, gt=0)
        check_fields(self, "gamma lam", ge=0, le=1)
        check("clip_eps", self.clip_eps, gt=0, lt=1)
        check("value_clip", self.value_clip, gt=0)
        self.lora.validate()
        self.train.validate()  # before the cross-field rules, which assume sane numbers
        if self.rollout_batch % self.mini_batch():
            raise ConfigError(f"rollout_batch ({self.rollout_batch}) must be a multiple of batch_size x grad_accum "
                              f"({self.mini_batch()})")
        if self.ptx_coef and not self.ptx_data:
            raise ConfigError("ptx_coef needs --ptx-data")
        world = distributed.env().world_size
        if world > 1 and (self.rollout_batch % world or self.mini_batch() % world):
            raise ConfigError(f"under torchrun rollout_batch ({self.rollout_batch}) and batch_size x grad_accum "
                              f"({self.mini_batch()}) must be multiples of the world size ({world})")
        if world > 1 and self.train.strategy != "ddp":
            raise ConfigError("RL stages run under torchrun with --strategy ddp (fsdp2 is not supported for them yet)")


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


def entropy(logits: torch.Tensor, mask: torch.Tensor, temperature: float) -> float:
    """Masked mean of the per-token entropy of softmax(logits / T). logits (B, T, V), mask (B, T − 1)."""
    logp = torch.log_softmax(logits[:, :-1].float() / temperature, dim=-1)  # (B, T-1, V)
    return masked_mean(-(logp.exp() * logp).sum(-1), mask).item()


@torch.no_grad()
def score_rollout(ac: ActorCritic, ref_logp_fn, batch: Rollout, score: torch.Tensor, cfg: PPOConfig,
                  beta: float) -> tuple[Scored, dict[str, float]]:
    """Log-probs, values, the shaped reward and GAE for one batch (no gradients)."""
    mask = batch.mask.float()  # (B, T-1)
    logits, values = ac(batch.input_ids, batch.attention_mask)  # (B, T, V), (B, T)
    old_logp = token_logprobs(logits, batch.labels, cfg.temperature)  # (B, T-1), 0 off the response
    values = values[:, :-1] * mask  # (B, T-1): V of the state before each response token
    ref_logp = ref_logp_fn(batch)  # (B, T-1)
    per_token = {k: kl_estimate(old_logp, ref_logp, k) * mask for k in KL_ESTIMATORS}  # each (B, T-1)
    kl = per_token[cfg.kl_estimator]
    rewards = shaped_rewards(score, kl, mask, beta)
    advantages, returns = gae(rewards, values, mask, cfg.gamma, cfg.lam)
    total = distributed.all_reduce if distributed.env().active else None  # whiten over every rank's batch
    s = Scored(old_logp, values, whiten(advantages, mask, total=total), returns)
    metrics = {f"objective/kl_{k}": v.sum(-1).mean().item() for k, v in per_token.items()}  # per response
    metrics["objective/entropy"] = entropy(logits, mask, cfg.temperature)
    metrics["objective/non_score_reward"] = (rewards.sum(-1) - score).mean().item()
    return s, metrics


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """1 − Var(G − V) / Var(G) over response tokens: 1 is a perfect critic, 0 no better than a constant."""
    var = masked_mean((returns - masked_mean(returns, mask)).square(), mask)
    resid = returns - values
    var_resid = masked_mean((resid - masked_mean(resid, mask)).square(), mask)
    return (1 - var_resid / var.clamp(min=1e-8)).item()


# --- the update ---------------------------------------------------------------------------


def ppo_update(ac: ActorCritic, optimizer, batch: Rollout, s: Scored, cfg: PPOConfig, iteration: int,
               ptx_batches) -> dict[str, float]:
    """Epochs of clipped-surrogate + value updates over shuffled mini-batches of one rollout batch.

    Under torchrun ``ac`` is DDP-wrapped and each rank holds 1/world of the batch and of every
    mini-batch; token shares are of the whole mini-batch, and the stats (early stop) are reduced.
    """
    device = batch.input_ids.device
    world = distributed.env().world_size
    B, mb = len(batch.prompts), cfg.mini_batch() // world
    micro = math.gcd(cfg.train.batch_size, mb)  # this rank's micro-batches tile its share of a mini-batch
    n_micro = mb // micro
    sums: dict[str, float] = {}
    steps, stopped = 0, False
    g = torch.Generator().manual_seed(cfg.train.seed * 1_000_003 + iteration)
    for _ in range(cfg.epochs):
        perm = torch.randperm(B, generator=g)
        for start in range(0, B, mb):
            rows = perm[start : start + mb]
            n_tokens = distributed.all_reduce(batch.mask[rows].sum()).clamp(min=1)
            stats: dict[str, float] = {}
            for m0 in range(0, mb, micro):
                idx = rows[m0 : m0 + micro]
                part, mask = batch.rows(idx), batch.mask[idx].float()
                share = (mask.sum() / n_tokens).item()  # masked means over a micro-batch, weighted to the mini-batch's
                with autocast(device, cfg.train.precision):
                    logits, values = ac(part.input_ids, part.attention_mask)
                logp = token_logprobs(logits, part.labels, cfg.temperature)
                pol = ppo_policy_loss(logp, s.old_logp[idx], s.advantages[idx], mask, cfg.clip_eps)
                val = ppo_value_loss(values[:, :-1] * mask, s.values[idx], s.returns[idx], mask, cfg.value_clip)
                loss = (pol.loss + cfg.vf_coef * val.loss) * share
                if cfg.ptx_coef:
                    ptx = {k: v.to(device) for k, v in next(ptx_batches).items()}
                    policy = ac.module.policy if hasattr(ac, "no_sync") else ac.policy  # under DDP: the wrapped model's
                    with autocast(device, cfg.train.precision):
                        ptx_logits = policy(input_ids=ptx["input_ids"], attention_mask=ptx["attention_mask"]).logits
                    ptx_loss, _ = sft_nll(ptx_logits, ptx["labels"])
                    loss = loss + cfg.ptx_coef * ptx_loss / n_micro / world
                    stats["losses/ptx"] = stats.get("losses/ptx", 0.0) + ptx_loss.item() / n_micro / world
                if not torch.isfinite(loss) and world == 1:  # under torchrun the gradient norm stops every rank
                    raise TrainingDiverged(f"the PPO loss is {loss.item()}", from_start=steps == 0)
                with distributed.accumulating(ac, last=m0 + micro >= mb):
                    (loss * world if world > 1 else loss).backward()
                for k, v in {"losses/policy": pol.loss.item(), "losses/value": val.loss.item(),
                             "policy/clip_fraction": pol.clip_fraction.item(), "policy/approx_kl": pol.approx_kl.item(),
                             "value/clip_fraction": val.clip_fraction.item()}.items():
                    stats[k] = stats.get(k, 0.0) + v * share
            stats = distributed.reduce_metrics(stats)  # shares of the whole mini-batch: the sum is its figure
            grad_norm = distributed.clip_grad_norm(ac, cfg.train.max_grad_norm)
            if not torch.isfinite(grad_norm):
                raise TrainingDiverged(f"the gradient norm is {grad_norm.item()}", from_start=steps == 0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            steps += 1
            for k, v in {**stats, "policy/grad_norm": float(grad_norm)}.items():
                sums[k] = sums.get(k, 0.0) + v
            if cfg.target_kl and stats["policy/approx_kl"] > cfg.target_kl:
                stopped = True
                break
        if stopped:
            break
    out = {k: v / steps for k, v in sums.items()}
    out.update({"policy/updates": float(steps), "policy/early_stop": float(stopped)})
    return out


# --- the stage ----------------------------------------------------------------------------


def _gold_known(prompts: list[str]) -> bool:
    """Whether the gold world can score these prompts (every one is one of its questions)."""
    from tether.world import parse_question, question_of

    return all(parse_question(question_of(p))[0] != "other" for p in prompts)


def _ptx_rows(cfg: PPOConfig, tokenizer) -> list:
    """PPO-ptx examples, tokenised (and validated) before anything is written; [] when ptx is off."""
    if not cfg.ptx_coef:
        return []
    records = load_sft(cfg.ptx_data, tokenizer=tokenizer)
    rows, count = encode_sft(records, tokenizer, cfg.max_len)
    if not rows:
        raise nothing_left(cfg.ptx_data, "PPO-ptx examples", len(records), count, cfg.max_len, "truncate")
    return rows


class PtxStream:
    """An endless stream of padded PPO-ptx micro-batches whose ``position`` (micro-batches taken so far,
    the same on every rank) is saved in each checkpoint: an update that stops early on ``target_kl``
    takes fewer than an iteration's full share, so the position is not a function of the iteration."""

    def __init__(self, rows: list, pad_id: int, micro: int, seed: int, position: int = 0):
        self.rows, self.pad_id, self.position = rows, pad_id, position
        self.order = DataOrder(len(rows), micro, seed)

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        e = distributed.env()
        idx = self.order.indices(self.position * e.world_size + e.rank)  # ranks interleave
        self.position += 1
        return pad([self.rows[i] for i in idx], self.pad_id)


def _ptx_batches(cfg: PPOConfig, rows: list, pad_id: int, start_iteration: int,
                 position: int | None = None) -> PtxStream | None:
    """The resumable PPO-ptx stream (None when ptx is off), at ``position`` (a checkpoint's) if given, else at
    the start of iteration ``start_iteration`` as an update that never stops early would have left it."""
    if not rows:
        return None
    per_rank = cfg.mini_batch() // distributed.env().world_size
    micro = math.gcd(cfg.train.batch_size, per_rank)  # as in ppo_update
    per_iteration = cfg.epochs * (cfg.rollout_batch // cfg.mini_batch()) * (per_rank // micro)
    return PtxStream(rows, pad_id, micro, cfg.train.seed + 1,
                     start_iteration * per_iteration if position is None else position)


def critic_source(cfg: PPOConfig, reward: RewardFn | None = None) -> str | None:
    """The model folder (or hub name) PPO's critic starts from; None with ``--value head``.

    The rule, in order: ``--critic-model`` when given; else the first reward-model folder that
    ``--reward`` reads, as InstructGPT initialised its value function from the RM: an RM folder
    itself, an ensemble's first member (``member-0``: every member is an RM of the same backbone),
    or the first learned term of a weighted sum such as ``rm:DIR:1,format:0.2``; else (``gold``,
    verifiable terms, a ``reward`` object passed to :func:`run_ppo`) the policy, ``--model``.
    The source is checked (not loaded) here, so a bad one stops the run before anything is written;
    so is one whose vocabulary is smaller than the policy's (it could not read the policy's tokens).
    """
    if cfg.value != "critic":
        return None
    if cfg.critic_model:
        source = cfg.critic_model
    else:
        folders = [] if reward is not None else reward_model_folders(cfg.reward)
        source = str(folders[0]) if folders else cfg.model
    check_model_source(source)

    def vocab(folder: str) -> int | None:
        try:
            return int(json.loads((Path(folder) / "config.json").read_text())["vocab_size"])
        except (OSError, ValueError, KeyError, TypeError):
            return None  # a hub name, or a config without one: transformers decides

    critic_vocab, policy_vocab = vocab(source), vocab(cfg.model)
    if critic_vocab is not None and policy_vocab is not None and critic_vocab < policy_vocab:
        raise ConfigError(f"the critic would start from {source}, whose vocabulary ({critic_vocab} tokens) is smaller "
                          f"than the policy's ({policy_vocab}); expected a model on the policy's tokenizer: pass "
                          "--critic-model, or --value head")
    return source


def run_ppo(cfg: PPOConfig, reward: RewardFn | None = None) -> Path:
    """Train ``cfg.model`` with PPO against ``cfg.reward`` (or the ``reward`` object, a callable
    ``(prompts, responses) -> (N,)``, when given); returns the output folder."""
    cfg.validate()
    torch.manual_seed(cfg.train.seed)
    device = resolve_device(cfg.train.device)
    tokenizer = load_tokenizer(cfg.model)
    prompt_records = load_prompts(cfg.prompts, tokenizer=tokenizer)
    eval_records = load_prompts(cfg.eval_prompts, tokenizer=tokenizer) if cfg.eval_prompts else []
    prompts, eval_prompts = [r.prompt for r in prompt_records], [r.prompt for r in eval_records]
    eval_prompts = random.Random(cfg.train.seed).sample(eval_prompts, min(cfg.eval_size, len(eval_prompts)))
    if reward is not None:
        reward_fn = load_reward(reward, aggregation=cfg.aggregation or None, device=str(device))
    else:  # verifiable terms take their answers, tokenizer and L_max from here
        reward_fn = reward_for_prompts(cfg.reward, prompt_records + eval_records, tokenizer=tokenizer,
                                       max_new_tokens=cfg.max_new_tokens, device=str(device),
                                       aggregation=cfg.aggregation or None)
    gold, eval_gold = _gold_known(prompts), bool(eval_prompts) and _gold_known(eval_prompts)
    ptx_rows = _ptx_rows(cfg, tokenizer)
    critic_init = critic_source(cfg, reward)

    check_output(Path(cfg.out), resume=cfg.resume, overwrite=cfg.overwrite)
    policy = apply_lora(load_model(cfg.model), cfg.lora)
    critic = None
    if critic_init is not None:
        critic = load_critic(critic_init)
        critic.backbone = apply_lora(critic.backbone, cfg.lora, task_type="FEATURE_EXTRACTION")
    ac = ActorCritic(policy, critic).to(device).eval()  # eval: no dropout, so the ratio is 1 before the update
    trained = distributed.Trainable(ac, cfg.train.strategy, device).module  # under torchrun: DDP around ac
    ref_name = cfg.ref or cfg.model
    lora_ref = cfg.lora.r > 0 and ref_name == cfg.model
    reference = None if lora_ref else compiled(load_model(ref_name, device=device).eval().requires_grad_(False),
                                               cfg.train)
    out = prepare_output(Path(cfg.out), resume=cfg.resume, overwrite=cfg.overwrite)  # inputs and models have loaded
    sampler = make_backend("tether", policy, tokenizer, compile=cfg.train.compile)
    scoring = compiled(ac, cfg.train)  # the passes that score and train (sampling: the sampler's own decoding)
    training = scoring if trained is ac else compiled(trained, cfg.train)

    def ref_logp_fn(batch: Rollout) -> torch.Tensor:
        if lora_ref:
            with policy.disable_adapter():
                return policy_logprobs(policy, batch, cfg.temperature)
        return policy_logprobs(reference, batch, cfg.temperature)

    optimizer = build_optimizer(trained, cfg.train)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg.train))
    beta, start, ptx_position = cfg.beta, 0, None
    ckpts = Checkpoints(out / "checkpoints", cfg.train, to_dict(cfg))  # each written once its weights have worked
    start, ckpt = resume_from(ckpts.folder, trained, optimizer, scheduler, cfg.train, ckpts.config) if cfg.resume \
        else (0, None)
    if ckpt is not None:
        beta = checkpoint_extra(ckpt)["beta"]
        ptx_position = checkpoint_extra(ckpt).get("ptx_position")  # absent in checkpoints of older versions
    log.info("PPO of %s against reward %s (value: %s, β=%g%s): %d trainable parameters, %d prompts",
             cfg.model, cfg.reward, cfg.value, beta, f", KL target {cfg.kl_target}" if cfg.kl_target else "",
             count_parameters(ac, True), len(prompts))
    order = DataOrder(len(prompts), cfg.rollout_batch, cfg.train.seed)
    ptx_batches = _ptx_batches(cfg, ptx_rows, tokenizer.pad_token_id, start, ptx_position)
    stops = [s for s in cfg.stop_strings.split(",") if s]
    metrics_log = MetricsLog(out, resume_step=start)
    samples_path = out / "samples.jsonl"  # every evaluation's samples; keep only what the checkpoint had seen
    if samples_path.exists() and distributed.env().main:
        samples_path.write_text("".join(l + "\n" for l in logged_until(samples_path, start)))
    if eval_prompts and start == 0:  # the starting point of every curve: the policy before any update
        metrics_log.log(0, evaluate(policy, ref_logp_fn, tokenizer, eval_prompts, reward_fn, cfg, step=0,
                                    gold=eval_gold, device=device, samples_path=samples_path))
    bar = tqdm(total=cfg.train.steps, initial=start, desc="ppo", dynamic_ncols=True)
    saved = checkpoint_state(ckpt) if ckpt is not None else {}  # resumed from the final checkpoint: its metrics
    metrics, evaluated = checkpoint_metrics(saved, "train"), checkpoint_metrics(saved, "eval")
    t_start = time.perf_counter()
    try:
        for it in range(start, cfg.train.steps):
            # 1. rollout
            t0 = time.perf_counter()
            batch_prompts = [prompts[i] for i in order.indices(it)]
            lo, hi = distributed.shard_bounds(len(batch_prompts))  # this rank's prompts
            batch = rollout(policy, tokenizer, batch_prompts[lo:hi], max_new_tokens=cfg.max_new_tokens,
                            temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p, stop_strings=stops,
                            seed=cfg.train.seed * 1_000_003 + it,
                            index_offset=lo if distributed.env().active else None, backend=sampler).to(device)
            # 2. score
            t1 = time.perf_counter()
            raw = torch.as_tensor(reward_fn(batch.prompts, batch.responses), dtype=torch.float32).to(device)  # (B,)
            empty = torch.tensor([not r.strip() for r in batch.responses], device=device)  # (B,)
            raw, score = sequence_scores(raw, empty, batch.ended, cfg)
            with autocast(device, cfg.train.precision):
                scored, metrics = score_rollout(scoring, ref_logp_fn, batch, score, cfg, beta)
            finite = all(bool(torch.isfinite(t).all()) for t in (scored.old_logp, scored.values))
            if not distributed.all_reduce(torch.tensor(float(finite)), "min").item():  # every rank stops together
                raise ckpts.diverged("the policy's log-probabilities or values of its own samples are not finite", it + 1)
            ckpts.confirm(trained, optimizer, scheduler)  # these weights just sampled and scored soundly
            # 3. update
            t2 = time.perf_counter()
            try:
                metrics.update(ppo_update(training, optimizer, batch, scored, cfg, it, ptx_batches))
            except TrainingDiverged as err:  # before any step: the weights this iteration's checkpoint holds failed
                raise ckpts.diverged(str(err), it + 1, failed=it if err.from_start else None) from None
            if (bad := nonfinite_weights(ac)) is not None:
                raise ckpts.diverged(f"the weights after the update are not finite ({bad})", it + 1)
            scheduler.step()
            t3 = time.perf_counter()
            mask = batch.mask.float()
            raw_all = distributed.gather(raw)  # every rank's rewards
            metrics.update({
                "objective/reward": raw_all.mean().item(), "objective/reward_std": raw_all.std().item(),
                "objective/score": score.mean().item(), "objective/beta": beta,
                "value/explained_variance": explained_variance(scored.values, scored.returns, mask),
                "rollout/length": mask.sum(-1).mean().item(), "rollout/ended": batch.ended.float().mean().item(),
                "rollout/empty": empty.float().mean().item(),
                "train/lr": scheduler.get_last_lr()[0],
                "time/generate": t1 - t0, "time/score": t2 - t1, "time/update": t3 - t2,
                "perf/samples_per_s": len(batch_prompts) / (t3 - t0),
            })
            if gold:
                from tether.world import gold_rewards

                metrics["objective/gold"] = sum(gold_rewards(batch.prompts, batch.responses)) / len(batch.prompts)
            if distributed.env().active:  # the mean over ranks (equal shares) of each rank's figure
                world = distributed.env().world_size
                metrics = {k: v / world for k, v in distributed.reduce_metrics(metrics).items()}
            # 4. KL control (Ziegler et al. 2019), on the batch's measured KL
            if cfg.kl_target:
                beta = adaptive_kl_coef(beta, metrics["objective/kl_k1"], cfg.kl_target, cfg.kl_horizon,
                                        len(batch_prompts))
            done = it + 1
            evaluated = {}
            due = (cfg.train.eval_every and done % cfg.train.eval_every == 0) or done == cfg.train.steps
            if eval_prompts and due:
                evaluated = evaluate(policy, ref_logp_fn, tokenizer, eval_prompts, reward_fn, cfg, step=done,
                                     gold=eval_gold, device=device, samples_path=samples_path)
            metrics_log.log(done, {**metrics, **evaluated})
            if (cfg.train.save_every and done % cfg.train.save_every == 0) or done == cfg.train.steps:
                extra = with_metrics({"beta": beta}, metrics, evaluated)
                if ptx_batches is not None:
                    extra["ptx_position"] = ptx_batches.position
                if done == cfg.train.steps:  # the final weights, checked finite, before write_artifact has them
                    ckpts.write(done, trained, optimizer, scheduler, extra)
                else:  # written once the next iteration has sampled and scored with these weights
                    ckpts.due(done, extra)
            bar.update(1)
            bar.set_postfix(reward=f"{metrics['objective/reward']:.3f}", kl=f"{metrics['objective/kl_k1']:.2f}",
                            beta=f"{beta:.3g}")
    finally:
        bar.close()
        metrics_log.close()
    final = {**metrics, **evaluated, "time/seconds": time.perf_counter() - t_start}
    data = {"prompts": data_info(cfg.prompts, prompt_records, fingerprint(prompt_records))}
    if eval_records:
        data["eval_prompts"] = data_info(cfg.eval_prompts, eval_records, fingerprint(eval_records))
    return write_artifact(out, stage="ppo", cfg=cfg, model=policy, tokenizer=tokenizer, data=data, metrics=final)


@torch.no_grad()
def evaluate(policy, ref_logp_fn, tokenizer, prompts: list[str], reward_fn, cfg: PPOConfig, *, gold: bool,
             device, step: int, samples_path: Path) -> dict[str, float]:
    """Reward, KL(π‖π_ref) (k1 summed per response) and length on held-out prompts; gold reward when
    known. Every sample is appended to ``samples_path`` (one JSON line each), to be read by a person.

    Under torchrun each rank samples a block of the prompts and the samples are gathered (rank 0 writes them).
    """
    e = distributed.env()
    mine, offset = prompts, None
    if e.active:  # equal blocks, so every rank runs the same forwards; copies past the end are dropped below
        per = -(-len(prompts) // e.world_size)
        offset = e.rank * per
        mine = [prompts[min(i, len(prompts) - 1)] for i in range(offset, offset + per)]
    batch = rollout(policy, tokenizer, mine, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                    seed=cfg.train.seed, index_offset=offset).to(device)
    kl = (policy_logprobs(policy, batch, cfg.temperature) - ref_logp_fn(batch)).sum(-1)  # (B,) k1 per response
    reward = torch.as_tensor(reward_fn(batch.prompts, batch.responses), dtype=torch.float32)
    rows = [{"step": step, "prompt": p, "response": r, "reward": x, "kl": k, "length": n}
            for p, r, x, k, n in zip(batch.prompts, batch.responses, reward.tolist(), kl.tolist(),
                                     batch.mask.sum(-1).tolist())]
    rows = distributed.gather_objects(rows)[: len(prompts)]
    out = {"eval/reward": sum(r["reward"] for r in rows) / len(rows), "eval/kl": sum(r["kl"] for r in rows) / len(rows),
           "eval/length": sum(r.pop("length") for r in rows) / len(rows)}
    if gold:
        from tether.world import gold_rewards

        golds = gold_rewards([r["prompt"] for r in rows], [r["response"] for r in rows])
        out["eval/gold"] = sum(golds) / len(prompts)
        for row, g in zip(rows, golds):
            row["gold"] = g
    if e.main:
        with open(samples_path, "a", encoding="utf-8") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
    return out
