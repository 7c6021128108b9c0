"""Value functions for PPO: V(x, y_≤t) at every position of a sequence.

Two kinds, chosen by PPO's ``--value`` option:

- ``critic``: a separate transformer backbone (by default the reward model's, as InstructGPT
  initialised its value function from the RM) with a linear head;
- ``head``: a linear head on the policy's own last hidden state (one backbone, shared).

Either head starts at zero, so the first advantages are the rewards themselves rather than noise.
"""

from __future__ import annotations

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


def load_critic(name_or_path: str | Path) -> ValueModel:
    """The backbone of any causal-LM or reward-model folder (or hub name) under a zero value head.

    Which folder PPO starts its critic from is decided in one place, tether.trainers.ppo.critic_source.
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

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Shape: (B, T) -> logits (B, T, V), values (B, T)."""
        if self.critic is not None:
            logits = self.policy(input_ids=input_ids, attention_mask=attention_mask).logits
            return logits, self.critic(input_ids, attention_mask)
        out = self.policy(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
        return out.logits, self.value_head(out.hidden_states[-1]).squeeze(-1).float()
