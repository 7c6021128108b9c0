"""What PPO, GRPO and RLOO share before their loop starts: the options every RL stage has
(:class:`RLConfig`), its inputs (prompts, held-out prompts, the reward), the policy and its
reference, and the :class:`~tether.loop.rl.RLStage` plumbing they all need.

Batch sizes mean one thing in every stage: ``--batch-size`` rows go through the model at once
(a micro-batch) and an optimiser step accumulates ``--grad-accum`` of them. PPO's mini-batch and
GRPO/RLOO's optimiser step are therefore ``batch_size × grad_accum`` rows of the rollout batch.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, replace
from typing import NamedTuple

from tether import distributed
from tether.config import check, group, opt
from tether.data import chat_tokenizer, fingerprint, load_prompts
from tether.errors import ConfigError
from tether.loop import TrainConfig
from tether.models import LoraConfig, apply_lora, load_model, load_tokenizer
from tether.rewards import CombinedReward, RewardFn, load_reward, reward_for_prompts
from tether.rollout import SamplingConfig
from tether.trainers.artifact import data_info

log = logging.getLogger("tether.rl")


def rl_train_defaults() -> TrainConfig:
    return TrainConfig(steps=100, batch_size=16, lr=1e-5, warmup_steps=0, schedule="constant", eval_every=10,
                       save_every=50)


@dataclass
class RLConfig:
    """The options of every RL stage; PPOConfig, GRPOConfig and RLOOConfig add their algorithm's."""

    model: str = opt("", "policy to start from: an SFT folder, a local path or a hub name")
    ref: str = opt("", "the frozen reference π_ref of the KL (empty: the same as --model)")
    reward: str = opt("gold", "reward: gold | a reward-model or ensemble folder | exact_match | format | "
                              "overlong(max=L,cache=C), or a weighted sum such as exact_match:1.0,format:0.2")
    reward_aggregation: str = opt("", "aggregation of a reward-model ensemble: mean | min | uwo (empty: the "
                                      "ensemble's own)")
    prompts: str = opt("", "training prompts ({\"prompt\", \"answer\"?, ...}): JSONL / JSON / CSV / Parquet, or a "
                           "dataset")
    eval_prompts: str = opt("", "held-out prompts scored every eval_every iterations (empty: no evaluation)")
    eval_size: int = opt(64, "held-out prompts scored at each evaluation (a seeded sample when there are more)")
    eval_samples: int = opt(1, "samples per held-out prompt at each evaluation")
    chat_template: bool = opt(True, "render records with the model's chat template when it has one (HH-RLHF "
                                    "transcripts become its turns); --no-chat-template: strings as given")
    out: str = opt("runs/rl", "output folder")
    resume: bool = opt(False, "continue from the latest checkpoint in out")
    overwrite: bool = opt(False, "replace the run tether wrote in out, once the new one is complete")
    sampling: SamplingConfig = group(SamplingConfig)
    lora: LoraConfig = group(LoraConfig)
    train: TrainConfig = group(rl_train_defaults)

    def step_rows(self) -> int:
        """Rows of one optimiser step: batch_size × grad_accum."""
        return self.train.batch_size * self.train.grad_accum

    def validate(self) -> None:
        if not self.model or not self.prompts:
            raise ConfigError("--model and --prompts are required")
        check("eval_size", self.eval_size, ge=1, integer=True)
        check("eval_samples", self.eval_samples, ge=1, integer=True)
        self.sampling.validate()
        self.lora.validate()
        self.train.validate()  # before the cross-field rules of each stage, which assume sane numbers


class Inputs(NamedTuple):
    """An RL stage's inputs, loaded and checked before anything is written."""

    tokenizer: object
    records: list
    eval_records: list
    prompts: list[str]
    eval_prompts: list[str]
    reward_fn: RewardFn
    cfg: RLConfig  # with a reward given as a function, its name in place of the spec (tether.json records it)


def load_inputs(cfg: RLConfig, reward: RewardFn | None, device) -> Inputs:
    """Tokenizer, prompts, the held-out sample and the reward (``reward``: a function given in Python,
    else ``cfg.reward``; verifiable terms take their answers, tokenizer and L_max from here)."""
    device = str(device)
    tokenizer = load_tokenizer(cfg.model)
    records = load_prompts(cfg.prompts, tokenizer=chat_tokenizer(tokenizer, cfg))
    eval_records = load_prompts(cfg.eval_prompts, tokenizer=chat_tokenizer(tokenizer, cfg)) if cfg.eval_prompts else []
    eval_prompts = [r.prompt for r in eval_records]
    if len(eval_prompts) > cfg.eval_size:
        eval_prompts = random.Random(cfg.train.seed).sample(eval_prompts, cfg.eval_size)
    aggregation = cfg.reward_aggregation or None
    if reward is None:
        reward_fn = reward_for_prompts(cfg.reward, records + eval_records, tokenizer=tokenizer,
                                       max_new_tokens=cfg.sampling.max_new_tokens, device=device,
                                       aggregation=aggregation)
    else:
        cfg = replace(cfg, reward=f"<function {getattr(reward, '__name__', type(reward).__name__)}>")
        reward_fn = reward if isinstance(reward, CombinedReward) else load_reward(reward, aggregation=aggregation,
                                                                                    device=device)
    return Inputs(tokenizer, records, eval_records, [r.prompt for r in records], eval_prompts, reward_fn, cfg)


def load_policy(cfg: RLConfig, device):
    """The policy to train, LoRA applied, in eval mode (tether.loop.rl: no dropout in RL)."""
    if cfg.lora.r and cfg.lora.dropout:
        log.warning("--dropout %g is not applied: RL stages run the policy in eval mode, so that sampling, scoring "
                    "and the update see one policy (the ratio is 1 before the first update)", cfg.lora.dropout)
    return apply_lora(load_model(cfg.model, device=device), cfg.lora).eval()


def data_record(cfg: RLConfig, inputs: Inputs) -> dict:
    """What tether.json records of the data."""
    data = {"prompts": data_info(cfg.prompts, inputs.records, fingerprint(inputs.records))}
    if inputs.eval_records:
        data["eval_prompts"] = data_info(cfg.eval_prompts, inputs.eval_records, fingerprint(inputs.eval_records))
    return data

