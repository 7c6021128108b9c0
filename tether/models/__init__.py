"""Models: load and save Hugging Face causal LMs and tokenizers, LoRA, and the tiny default."""

from tether.models.hf import (
    LoraConfig,
    apply_lora,
    count_parameters,
    load_model,
    load_tokenizer,
    save_model,
)
from tether.models.tiny import TinyConfig, build_tiny, train_tokenizer

__all__ = [
    "LoraConfig",
    "TinyConfig",
    "apply_lora",
    "build_tiny",
    "count_parameters",
    "load_model",
    "load_tokenizer",
    "save_model",
    "train_tokenizer",
]
