"""Value functions for PPO: V(x, y_≤t) at every position of a sequence.

Two kinds, chosen by PPO's ``--value`` option:

- ``critic``: a separate transformer backbone (by default the reward model's, as InstructGPT
  initialised its value function from the RM) with a linear head;
- ``head``: a linear head on the policy's own last hidden state (one backbone, shared).

Either head starts at zero, so the first advantages are the rewards themselves rather than noise.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn


def _zero_head(hidden_size: int) -> nn.Linear:
    head = nn.Linear(hidden_size, 1)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    return head


class ValueModel(nn.Module):
    """A backbone's last hidden state through a linear head initialised to zero."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.head = _zero_head(backbone.config.hidden_size)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Shape: (B, T) -> (B, T) values in float32."""
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, T, H)
        return self.head(hidden).squeeze(-1).float()


def load_critic(name_or_path: str | Path, lora=None) -> ValueModel:
    """The backbone of any causal-LM or reward-model folder (or hub name) under a zero value head, with LoRA
    adapters on it when ``lora`` (a tether.models.LoraConfig) asks for them.

    Which folder PPO starts its critic from is decided in one place, :func:`critic_source`.
    """
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging

    from tether.models.hf import from_pretrained

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the LM or score head is left out on purpose
    try:
        backbone = from_pretrained(AutoModel.from_pretrained, name_or_path, "critic backbone", dtype=torch.float32)
    finally:
        hf_logging.set_verbosity(verbosity)
    if lora is not None:
        from tether.models.hf import apply_lora

        backbone = apply_lora(backbone, lora, task_type="FEATURE_EXTRACTION")
    return ValueModel(backbone)


class ActorCritic(nn.Module):
    """The policy and its value function, trained together under one optimiser and one checkpoint.

    With a ``critic`` the values come from it; without one, from a zero-initialised linear head
    on the policy's last hidden state.
    """

    def __init__(self, policy: nn.Module, critic: ValueModel | None = None):
        super().__init__()
        self.policy, self.critic = policy, critic
        self.value_head = None if critic is not None else _zero_head(policy.config.hidden_size)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor | None = None,
                temperature: float = 1.0, entropy: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Shape: (B, T) -> logits (B, T, V), values (B, T).

        With ``labels`` (B, T) the policy's log-probs of the labelled tokens at ``temperature`` (B, T − 1), 0
        elsewhere, come instead of the logits, never materialised (tether.scoring.labelled_logprobs; ``entropy``,
        a (B, T − 1) tensor, then receives each labelled position's entropy).
        """
        from tether.scoring import labelled_pass

        hidden = {} if self.critic is not None else {"output_hidden_states": True}
        if labels is None:
            out = self.policy(input_ids=input_ids, attention_mask=attention_mask, **hidden)
            policy = out.logits  # (B, T, V)
        else:
            logp, _, out = labelled_pass(self.policy, input_ids, attention_mask, labels, temperature, entropy=entropy,
                                         **hidden)
            policy = torch.nn.functional.pad(logp, (labels.shape[1] - 1 - logp.shape[1], 0))  # (B, T-1)
        if self.critic is not None:
            return policy, self.critic(input_ids, attention_mask)
        return policy, self.value_head(out.hidden_states[-1]).squeeze(-1).float()


def critic_source(cfg, reward=None) -> str | None:
    """The model folder (or hub name) PPO's critic starts from; None with ``--value head``.

    The rule, in order: ``--critic-model`` when given; else the first reward-model folder that
    ``--reward`` reads, as InstructGPT initialised its value function from the RM: an RM folder
    itself, an ensemble's first member (``member-0``: every member is an RM of the same backbone),
    or the first learned term of a weighted sum such as ``rm:DIR:1,format:0.2``; else (``gold``,
    verifiable terms, a ``reward`` object passed to run_ppo) the policy, ``--model``.
    The source is checked (not loaded) here, so a bad one stops the run before anything is written;
    so is one whose vocabulary is smaller than the policy's (it could not read the policy's tokens).
    ``cfg``: a tether.trainers.ppo.PPOConfig (value, critic_model, reward, model).
    """
    from tether.errors import ConfigError
    from tether.models.hf import check_model_source
    from tether.rewards import reward_model_folders

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
