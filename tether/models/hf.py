"""Load and save Hugging Face causal language models and their tokenizers; LoRA through peft.

Any model `AutoModelForCausalLM` knows works: a local folder (an earlier tether stage, or any
saved model) or a hub name. What tether writes, plain transformers reads back:

    AutoModelForCausalLM.from_pretrained(folder); AutoTokenizer.from_pretrained(folder)
"""

from __future__ import annotations

import copy
import json
import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from tether.config import check
from tether.errors import ConfigError, ModelError

log = logging.getLogger("tether.models")

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
_HUB_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?")
_FILE_SUFFIXES = (".safetensors", ".bin", ".json", ".gguf", ".pt", ".pth", ".yaml", ".jsonl")


def is_hub_name(name: str) -> bool:
    """Whether ``name`` reads as a hub id ("name" or "org/name") rather than a local path.

    A path that starts with ``/``, ``.`` or ``~``, has more than one ``/``, ends like a file name,
    or whose first part is a local folder (``runs/sfft`` when ``runs/`` exists) is local.
    """
    name = str(name)
    if not _HUB_NAME.fullmatch(name) or name.lower().endswith(_FILE_SUFFIXES) or ".." in name:
        return False
    return "/" not in name or not Path(name.split("/", 1)[0]).is_dir()


def _check_safetensors(path: Path, folder: str) -> None:
    """Read the header of a safetensors file and check it against the file's size (no weights are read)."""

    def bad(detail: str) -> ModelError:
        return ModelError(f"{folder}: {path.name} is truncated or not a safetensors file ({detail}); expected the "
                          "weights as written by save_pretrained")

    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise bad(f"{size} bytes")
        n = int.from_bytes(head, "little")
        if n > size - 8:
            raise bad(f"header: {n} bytes announced, the file has {size}")
        raw = f.read(n)
    try:
        header = json.loads(raw)
        ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
    except (ValueError, TypeError, KeyError, IndexError, AttributeError) as e:
        raise bad(f"header: not a valid JSON tensor table: {type(e).__name__}") from None
    expected = 8 + n + max(ends, default=0)
    if expected != size:
        raise bad(f"header: {expected} bytes expected, the file has {size}")


def check_model_source(name_or_path: str | Path, *, weights: bool = True) -> str:
    """Check a model source before any loading and return the name to give transformers; fast, no network.

    A local folder must hold ``config.json`` and, with ``weights``, its weights: ``model.safetensors``
    (whose header is read and checked against the file's size), a sharded index with every shard, or
    ``pytorch_model.bin``. A source that does not exist is a hub name only when :func:`is_hub_name`
    says so; anything else raises :class:`ModelError` naming the path and what was expected.
    """
    name = str(name_or_path)
    path = Path(name).expanduser()
    if not path.exists():
        if is_hub_name(name):
            return name
        raise ModelError(f"{name}: no such folder; expected a model folder (config.json + model.safetensors) or "
                         "a hub name (org/name)")
    if not path.is_dir():
        raise ModelError(f"{name}: is a file; expected a model folder (config.json + model.safetensors)")
    if not (path / "config.json").is_file():
        members = None
        if (path / "tether.json").is_file():
            try:
                members = json.loads((path / "tether.json").read_text(encoding="utf-8")).get("members")
            except (ValueError, AttributeError):
                members = None
        if members:
            raise ModelError(f"{name}: an ensemble of reward models ({', '.join(map(str, members))}); expected a "
                             f"single model folder such as {Path(name) / str(members[0])}")
        raise ModelError(f"{name}: no config.json; expected a Hugging Face model folder (config.json + "
                         "model.safetensors, as written by save_pretrained or a tether stage)")
    if weights:
        found = [f for f in WEIGHT_FILES if (path / f).is_file()]
        if not found:
            raise ModelError(f"{name}: no model.safetensors or pytorch_model.bin; expected the model's weights in "
                             "the folder")
        if found[0] == "model.safetensors":
            _check_safetensors(path / "model.safetensors", name)
        elif found[0].endswith(".index.json"):
            try:
                index = json.loads((path / found[0]).read_text(encoding="utf-8"))
                shards = sorted(set(index["weight_map"].values()))
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                raise ModelError(f"{name}: {found[0]} is not a valid shard index ({type(e).__name__}); expected "
                                 'JSON with a "weight_map"') from None
            for shard in shards:
                if not (path / shard).is_file():
                    raise ModelError(f"{name}: shard {shard} named in {found[0]} is missing")
                if shard.endswith(".safetensors"):
                    _check_safetensors(path / shard, name)
    return str(path)


def from_pretrained(load: Callable[..., Any], name_or_path: str | Path, what: str, **kwargs) -> Any:
    """``load(source, **kwargs)`` after :func:`check_model_source`; a local folder's failure is a one-line ModelError.

    ``what`` names the thing loaded in messages; a ``"tokenizer"`` needs no weights in the folder.
    """
    source = check_model_source(name_or_path, weights=what != "tokenizer")
    if not os.path.isdir(source):  # a hub name: as transformers has it
        return load(source, **kwargs)
    try:
        return load(source, **kwargs)
    except ModelError:
        raise
    except Exception as e:  # a local folder: whatever transformers or safetensors raise is about the folder
        detail = " ".join(str(e).split())
        detail = detail if len(detail) <= 240 else detail[:239] + "…"
        raise ModelError(f"{name_or_path}: cannot load the {what} ({type(e).__name__}: {detail}); expected the "
                         f"{what}'s files as save_pretrained writes them") from e


def end_of_turn(tokenizer) -> str | None:
    """The special token the chat template closes an assistant turn with (ChatML's <|im_end|>), or None."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": "x"}, {"role": "assistant", "content": "\x00"}],
                                             tokenize=False)
    except Exception:  # a template that needs more than these two turns (a system prompt, tools): none known
        return None
    after = text.split("\x00", 1)[-1]
    specials = set(tokenizer.all_special_tokens) | set(tokenizer.get_added_vocab())
    return next((t for t in sorted(specials, key=len, reverse=True) if t and after.startswith(t)), None)


def load_tokenizer(name_or_path: str | Path):
    """Load a tokenizer; its EOS is the chat template's end of turn, and it has a pad token.

    When the chat template closes a turn with a special token other than the EOS (a base model's
    tokenizer with a chat template), that token becomes the EOS: sampling stops at the end of the
    turn, and responses end with it. A tokenizer with no pad token pads with the EOS. Padding is
    on the right for training; generation code sets ``padding_side="left"`` itself.
    """
    tokenizer = from_pretrained(AutoTokenizer.from_pretrained, name_or_path, "tokenizer")
    turn_end = end_of_turn(tokenizer)
    if turn_end is not None and turn_end != tokenizer.eos_token:
        log.info("%s: EOS is %r, the chat template's end of turn (was %r)", name_or_path, turn_end, tokenizer.eos_token)
        tokenizer.eos_token = turn_end
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ModelError(f"{name_or_path}: the tokenizer has neither a pad token nor an EOS token")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def load_model(name_or_path: str | Path, *, dtype: torch.dtype | None = None, device: str | torch.device = "cpu"):
    """Load a causal LM from a folder or hub name, in ``dtype`` (float32 by default) on ``device``.

    The source is checked first (:func:`check_model_source`): a bad folder is a one-line ModelError.
    """
    model = from_pretrained(AutoModelForCausalLM.from_pretrained, name_or_path, "model", dtype=dtype or torch.float32)
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

    def validate(self) -> None:
        check("r", self.r, ge=0, integer=True, note="0: no LoRA")
        check("alpha", self.alpha, gt=0)
        check("dropout", self.dropout, ge=0, lt=1)
        if self.r and not self.target_modules.strip(" ,"):
            raise ConfigError("--target-modules is empty: name the modules to adapt, or all-linear")


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
