"""Load and save Hugging Face causal language models and their tokenizers; LoRA through peft.

Any model `AutoModelForCausalLM` knows works: a local folder (an earlier tether stage, or any
saved model) or a hub name. What tether writes, plain transformers reads back:

    AutoModelForCausalLM.from_pretrained(folder); AutoTokenizer.from_pretrained(folder)
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel


def load_tokenizer(name_or_path: str | Path):
    """Load a tokenizer and give it a pad token (the EOS token when it has none).

    Padding is on the right for training; generation code sets ``padding_side="left"`` itself.
    """
    tokenizer = AutoTokenizer.from_pretrained(str(name_or_path))
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"{name_or_path}: the tokenizer has neither a pad token nor an EOS token")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def load_model(name_or_path: str | Path, *, dtype: torch.dtype | None = None, device: str | torch.device = "cpu"):
    """Load a causal LM from a folder or hub name, in ``dtype`` (float32 by default) on ``device``."""
    model = AutoModelForCausalLM.from_pretrained(str(name_or_path), dtype=dtype or torch.float32)
    return model.to(device)


@dataclass
class LoraConfig:
    """Low-rank adapters (Hu et al. 2021) through peft. ``r = 0`` trains every weight instead."""

    r: int = field(default=0, metadata={"help": "LoRA rank; 0 trains all weights"})
    alpha: float = field(default=16.0, metadata={"help": "LoRA scaling numerator (scale = alpha / r)"})
    dropout: float = field(default=0.0, metadata={"help": "dropout on the LoRA branch"})
    target_modules: str = field(
        default="all-linear", metadata={"help": "comma-separated module names, or all-linear"}
    )


def apply_lora(model: PreTrainedModel, cfg: LoraConfig, task_type: str = "CAUSAL_LM"):
    """Wrap ``model`` with LoRA adapters when ``cfg.r > 0``; return it unchanged otherwise.

    ``task_type`` is peft's: CAUSAL_LM for a language model, FEATURE_EXTRACTION for a bare backbone.
    """
    if cfg.r <= 0:
        return model
    import peft

    targets = cfg.target_modules if cfg.target_modules == "all-linear" else cfg.target_modules.split(",")
    peft_cfg = peft.LoraConfig(
        r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=targets, task_type=task_type
    )
    return peft.get_peft_model(model, peft_cfg)


def save_model(model, tokenizer, folder: str | Path) -> Path:
    """Save model (safetensors) and tokenizer in Hugging Face format.

    A LoRA model is saved merged, so that later stages and other tools need no peft; the
    adapter alone is kept in ``folder/adapter``.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if hasattr(model, "merge_and_unload"):  # a peft model
        model.save_pretrained(folder / "adapter")
        model = copy.deepcopy(model).merge_and_unload()
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


def count_parameters(model, trainable_only: bool = False) -> int:
    """Number of parameters, counting tied weights once."""
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) in seen or (trainable_only and not p.requires_grad):
            continue
        seen.add(id(p))
        total += p.numel()
    return total
