"""Reward models: a causal-LM backbone with a scalar head read at the last real token of each row.

The artifact is an ordinary ``*ForSequenceClassification`` model with one label, so plain
transformers loads it:

    rm = AutoModelForSequenceClassification.from_pretrained(folder)
    r = rm(**tokenizer(prompt + response + eos, return_tensors="pt")).logits[:, 0]

(tether reads the head at the last position the attention mask keeps, :func:`raw_scores`; transformers
pools at the last token that is not ``pad_token_id``, which is the same position unless the padding
token is the EOS, as in most hub tokenizers: there transformers skips the final EOS and reads the token
before it, so a finished response and the same one cut short would score alike.)

tether's normalisation (gain and bias, so that SFT samples score mean 0 and standard deviation 1)
is stored in the model's config as ``reward_gain`` and ``reward_bias`` and applied by
:func:`normalised`; plain transformers returns the raw score.

Whether a folder's scalar head is trained is read from the folder itself: a head whose weights are
in the file is loaded as saved (with or without normalisation); one that is not there (a causal-LM
folder) is new. The RM stage also writes ``reward_head: "trained"`` into the config it saves.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
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


def raw_scores(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
               prompt_lengths: Sequence[int] | None = None) -> torch.Tensor:
    """The head's output at the last position of each row that the attention mask keeps (its final EOS
    when the response ended), whatever the padding token is. Shape: (B, T) -> (B,).

    ``prompt_lengths``: each row's prompt tokens, so that rows sharing a prompt (a pair's chosen and rejected,
    several samples of one prompt) run it once (:func:`tether.scoring.shared_prefix_hidden`), the head then
    read at the last positions alone; the same scores.

    transformers pools at the last token that is not ``pad_token_id``, so with pad = EOS it skips the
    EOS a finished response ends with. When a row's last real token is the padding id, the padding
    positions are filled with another id (one no row ends with) and the model's pad id is that one for
    this forward pass only: the same forward (through DDP, FSDP2 or torch.compile alike), read at the
    right position. What fills masked positions does not change the real ones.
    """
    config = _hf_config(model)
    pad = config.pad_token_id
    positions = torch.arange(attention_mask.size(1), device=attention_mask.device)
    last = (positions * attention_mask).argmax(-1)  # (B,) the last position each row keeps
    if prompt_lengths is not None:
        shared = _shared_prompt_scores(model, input_ids, attention_mask, prompt_lengths, last)
        if shared is not None:
            return shared
    ends = set(input_ids[torch.arange(len(last), device=last.device), last].tolist())
    if pad is None or pad not in ends:
        return model(input_ids=input_ids, attention_mask=attention_mask).logits[:, 0].float()
    other = next(t for t in range(len(ends) + 1) if t not in ends)
    try:
        config.pad_token_id = other
        return model(input_ids=input_ids.masked_fill(attention_mask == 0, other),
                     attention_mask=attention_mask).logits[:, 0].float()
    finally:
        config.pad_token_id = pad


def _shared_prompt_scores(model, input_ids, attention_mask, prompt_lengths, last) -> torch.Tensor | None:
    """:func:`raw_scores` with shared prompts run once; None where they are not (the plain pass then runs)."""
    from transformers import PreTrainedModel

    from tether.scoring import shared_prefix_hidden

    hf = next((m for m in model.modules() if isinstance(m, PreTrainedModel)), None)
    head = getattr(hf, "score", None)  # transformers' *ForSequenceClassification: logits = score(last hidden)
    if not isinstance(head, torch.nn.Module):
        return None
    hidden = shared_prefix_hidden(model, hf, input_ids, attention_mask, prompt_lengths)
    if hidden is None:
        return None
    return head(hidden[torch.arange(len(last), device=last.device), last])[:, 0].float()


def _hf_config(model):
    """The transformers config of ``model`` under DDP, torch.compile or peft wrappers."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or model._orig_mod
    return model.config


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
