"""The output folder every stage writes (DESIGN.md, "Artifacts").

    out/
      config.json, model.safetensors, generation_config.json   the model, Hugging Face format
      tokenizer.json, tokenizer_config.json                     the tokenizer
      tether.json       stage, config, data fingerprints, final metrics, library versions
      config.yaml       the stage's config, loadable with --config
      metrics.jsonl     one line a step;  tb/  TensorBoard events
      checkpoints/      the latest checkpoint(s), for --resume
"""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import json
import platform
from pathlib import Path
from typing import Any

from tether import distributed
from tether.config import save_yaml, to_dict
from tether.io import write_json
from tether.models import save_model

_LIBRARIES = ("tether", "torch", "transformers", "tokenizers", "peft", "datasets", "safetensors", "numpy")


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in _LIBRARIES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def prepare_output(out: Path, *, resume: bool, overwrite: bool) -> None:
    """Refuse to mix two runs in one folder: an existing stage output needs --resume or --overwrite.

    Under torchrun every rank checks, then rank 0 alone clears and creates the folder.
    """
    if out.exists() and any(out.iterdir()) and not (resume or overwrite):
        raise FileExistsError(
            f"{out} already holds a run; pass --resume to continue it, --overwrite to replace it, "
            "or choose another --out"
        )
    distributed.barrier()
    if distributed.env().main:
        if overwrite and not resume and out.exists():
            import shutil

            shutil.rmtree(out)
        out.mkdir(parents=True, exist_ok=True)
    distributed.barrier()


def data_info(source: Any, records: list, fingerprint: str) -> dict:
    return {"source": str(source), "records": len(records), "fingerprint": fingerprint}


def write_artifact(out: Path, *, stage: str, cfg: Any, model, tokenizer, data: dict, metrics: dict) -> Path:
    """Save the model and tokenizer, then ``tether.json`` and ``config.yaml`` describing the run.

    Under torchrun rank 0 alone writes (every rank holds the whole trained model by then) and the
    others wait until it has.
    """
    if distributed.env().main:
        save_model(model, tokenizer, out)
        save_yaml(cfg, out / "config.yaml")
        write_json(out / "tether.json", {
            "stage": stage,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "config": to_dict(cfg),
            "data": data,
            "metrics": metrics,
            "versions": versions(),
            "world_size": distributed.env().world_size,
        })
    distributed.barrier()
    return out


def read_artifact(folder: str | Path) -> dict:
    """``tether.json`` of an earlier stage's folder ({} for a folder tether did not write)."""
    path = Path(folder) / "tether.json"
    return json.loads(path.read_text()) if path.exists() else {}
