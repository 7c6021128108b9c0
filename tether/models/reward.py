"""Reward models: a causal-LM backbone with a scalar head read at the last non-pad token.

The artifact is an ordinary ``*ForSequenceClassification`` model with one label, so plain
transformers loads it:

    rm = AutoModelForSequenceClassification.from_pretrained(folder)
    r = rm(**tokenizer(prompt + response + eos, return_tensors="pt")).logits[:, 0]

tether's normalisation (gain and bias, so that SFT samples score mean 0 and standard deviation 1)
is stored in the model's config as ``reward_gain`` and ``reward_bias`` and applied by
:func:`normalised`; plain transformers returns the raw score.

Whether a folder's scalar head is trained is read from the folder itself: a head whose weights are
in the file is loaded as saved (with or without normalisation); one that is not there (a causal-LM
folder) is new. The RM stage also writes ``reward_head: "trained"`` into the config it saves.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification

from tether.errors import ModelError
from tether.models.hf import from_pretrained

TRAINED = "trained"  # the value of config.reward_head in a folder the RM stage wrote


def mark_trained(model) -> None:
    """Record in ``model.config`` that its scalar head is trained (saved with the model)."""
    model.config.reward_head = TRAINED


def load_reward_model(name_or_path: str | Path, tokenizer, *, device: str | torch.device = "cpu",
                      require_head: bool = False):
    """A one-label sequence classifier on the backbone at ``name_or_path``.

    From a causal-LM folder (e.g. an SFT stage) the scalar head is new and initialised with
    std 1/√(d + 1) (Stiennon et al. 2020); from a reward-model folder it is loaded as saved. The
    rule: the head is new exactly when its weights are missing from the folder's file (whatever
    ``reward_gain`` says: an RM trained without normalisation has none, and its head is trained).
    With ``require_head`` (serving a reward) a folder without a head is a ModelError instead.
    """
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # a causal-LM folder has no head yet: that is expected, not a warning
    try:
        model, info = from_pretrained(AutoModelForSequenceClassification.from_pretrained, name_or_path, "reward model",
                                      num_labels=1, dtype=torch.float32, output_loading_info=True)
    finally:
        hf_logging.set_verbosity(verbosity)
    model.config.pad_token_id = tokenizer.pad_token_id
    head = model.score if hasattr(model, "score") else model.get_output_embeddings()
    head_names = {f"{name}.weight" for name, module in model.named_modules() if module is head}
    new_head = any(key in head_names or key.endswith(tuple("." + n for n in head_names))
                   for key in info.get("missing_keys", ()))
    if new_head and require_head:
        raise ModelError(f"{name_or_path}: no reward head ({sorted(head_names)[0]}) in the weights: a language model, "
                         "not a reward model; expected a folder written by `tether rm`")
    if new_head and getattr(model.config, "reward_head", None) == TRAINED:
        raise ModelError(f"{name_or_path}: config.json says the reward head is trained, but the weights hold no "
                         f"{sorted(head_names)[0]}; expected a reward model as the RM stage saved it")
    if new_head:
        with torch.no_grad():
            head.weight.normal_(0.0, 1.0 / math.sqrt(model.config.hidden_size + 1))
            if getattr(head, "bias", None) is not None:
                head.bias.zero_()
    return model.to(device)


def raw_scores(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The head's output at the last non-pad token of each row. Shape: (B, T) -> (B,)."""
    return model(input_ids=input_ids, attention_mask=attention_mask).logits[:, 0].float()


def normalised(model, raw: torch.Tensor) -> torch.Tensor:
    """gain · raw + bias, with the model's stored normalisation (identity if it has none)."""
    return raw * getattr(model.config, "reward_gain", 1.0) + getattr(model.config, "reward_bias", 0.0)


def set_normalisation(model, raw_sft_scores: torch.Tensor) -> tuple[float, float]:
    """Store gain and bias so that ``raw_sft_scores`` map to mean 0, standard deviation 1.

    The lm-human-preferences practice (Ziegler et al. 2019): rewards of SFT samples on the
    training prompts are standardised, so β means the same thing across reward models.
    """
    mean, std = raw_sft_scores.mean().item(), raw_sft_scores.std().item()
    gain = 1.0 / max(std, 1e-8)
    model.config.reward_gain, model.config.reward_bias = gain, -mean * gain
    return model.config.reward_gain, model.config.reward_bias
