"""The output folder every stage writes (DESIGN.md, "Artifacts").

    out/
      config.json, model.safetensors, generation_config.json   the model, Hugging Face format
      tokenizer.json, tokenizer_config.json                     the tokenizer
      tether.json       stage, config, data fingerprints, final metrics, library versions
      config.yaml       the stage's config, loadable with --config
      metrics.jsonl     one line a step;  tb/  TensorBoard events
      checkpoints/      the latest checkpoint(s), for --resume
      .tether-run       the marker of a folder tether created: only such a folder may --overwrite replace

The lifecycle: :func:`check_output` refuses a bad ``--out`` before anything loads;
:func:`prepare_output` creates the folder once inputs and models have loaded (``--overwrite``: a
sibling ``out.tether-new``); :func:`write_artifact` writes the model, ``tether.json`` last, and
:func:`finish_output` swaps a sibling in for the old run.
"""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import json
import os
import platform
from pathlib import Path
from typing import Any

from tether import distributed
from tether.config import save_yaml, to_dict
from tether.errors import OutputError
from tether.io import check_folder, replace_dir, swap_dirs, write_json
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


MARKER = ".tether-run"  # written into every run folder tether creates: what --overwrite may replace
_STAGING = ".tether-new"  # the sibling of the output folder that --overwrite writes the new run into
_staged: dict[Path, Path] = {}  # staging folder -> the output folder it replaces (this process)


def is_tether_run(folder: Path) -> bool:
    """True for a folder tether created: it holds the run marker or, for a run of an older tether, ``tether.json``."""
    return (folder / MARKER).is_file() or (folder / "tether.json").is_file()


def check_output(out: Path, *, resume: bool, overwrite: bool) -> None:
    """Refuse, before anything is loaded or written, an ``--out`` tether must not use (an :class:`OutputError`).

    ``out`` may be absent or an empty folder; a folder tether created needs ``--resume`` (continue
    it) or ``--overwrite`` (replace it); anything else is never touched.
    """
    check_folder(out)
    if not out.is_dir() or not any(out.iterdir()):
        return
    if resume:
        if not (is_tether_run(out) or (out / "checkpoints").is_dir()):
            raise OutputError(f"--out {out} holds files tether did not write: there is no run to resume there")
    elif not is_tether_run(out):
        raise OutputError(f"--out {out} holds files tether did not write; --overwrite replaces only a folder tether "
                          f"created (one with {MARKER} or tether.json): choose another --out")
    elif not overwrite:
        raise OutputError(f"--out {out} already holds a run; pass --resume to continue it, --overwrite to replace it, "
                          "or choose another --out")
    else:
        staging = out.with_name(out.name + _STAGING)
        if staging.exists() and not (staging.is_dir() and (staging / MARKER).is_file()):
            raise OutputError(f"{staging} is in the way of --overwrite (tether writes the new run there and swaps it "
                              f"in at the end) and tether did not write it: move it, or choose another --out")


def prepare_output(out: Path, *, resume: bool, overwrite: bool) -> Path:
    """Create the folder a stage writes into, once its inputs and models have loaded; returns that folder.

    A new run (``out`` absent or empty) and ``--resume`` write into ``out`` itself. ``--overwrite``
    of an earlier run writes the new one beside it, into ``out.tether-new``; :func:`finish_output`
    swaps it in at the end, so a run that fails or is killed leaves the old one as it was. Every run
    folder gets the marker that lets a later ``--overwrite`` recognise it. Under torchrun every rank
    checks, then rank 0 alone writes, and every rank returns the same folder.
    """
    check_output(out, resume=resume, overwrite=overwrite)
    replacing = overwrite and not resume and out.is_dir() and any(out.iterdir())
    work = out.with_name(out.name + _STAGING) if replacing else out
    distributed.barrier()
    if distributed.env().main:
        if replacing and work.exists():  # the leftover of an --overwrite that did not finish
            remove_run(work)
        work.mkdir(parents=True, exist_ok=True)
        if not (work / MARKER).exists():
            _mark(work)
    distributed.barrier()
    if replacing:
        _staged[work.absolute()] = out
    return work


def finish_output(work: Path) -> Path:
    """The end of a stage: a staging folder replaces the old run in one swap; returns the output folder.

    For a run written in place this is the identity. Under torchrun rank 0 swaps and the others wait.
    """
    out = _staged.pop(work.absolute(), None)
    if out is None:
        return work
    if distributed.env().main:
        swap_dirs(work, out)  # out now holds the new run, work the old one
        remove_run(work)
    distributed.barrier()
    return out


def remove_run(folder: Path) -> None:
    """Delete a run folder tether wrote, its marker last (so that a half-deleted one is still recognised);
    of a link to one, only the link."""
    import shutil

    if folder.is_symlink():
        folder.unlink()
        return
    if not (folder / MARKER).exists():  # a run of an older tether, known by its tether.json
        _mark(folder)
    for entry in folder.iterdir():
        if entry.name == MARKER:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
    (folder / MARKER).unlink(missing_ok=True)
    folder.rmdir()


def _mark(folder: Path) -> None:
    write_json(folder / MARKER, {"created": _now(), "tether": versions().get("tether", "")})


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def data_info(source: Any, records: list, fingerprint: str) -> dict:
    return {"source": str(source), "records": len(records), "fingerprint": fingerprint}


def write_artifact(out: Path, *, stage: str, cfg: Any, model, tokenizer, data: dict, metrics: dict,
                   finish: bool = True) -> Path:
    """Save the model and tokenizer, then ``config.yaml`` and, last, ``tether.json`` describing the run;
    returns the output folder (after :func:`finish_output`, unless ``finish`` is False).

    Atomic in effect: the files are written into ``out/.final.tmp`` and moved into place one rename
    each, with any older ``tether.json`` removed first, so that a run killed during the write has no
    ``tether.json`` and ``--resume`` redoes the write from the last checkpoint. Under torchrun rank 0
    alone writes (every rank holds the whole trained model by then) and the others wait until it has.
    """
    if distributed.env().main:
        import shutil

        (out / "tether.json").unlink(missing_ok=True)  # present again only once the run is complete
        tmp = out / ".final.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        save_model(model, tokenizer, tmp)
        save_yaml(cfg, tmp / "config.yaml")
        for entry in sorted(tmp.iterdir()):
            if entry.is_dir():
                replace_dir(entry, out / entry.name)
            else:
                os.replace(entry, out / entry.name)
        tmp.rmdir()
        write_json(out / "tether.json", {
            "stage": stage,
            "created": _now(),
            "config": to_dict(cfg),
            "data": data,
            "metrics": metrics,
            "versions": versions(),
            "world_size": distributed.env().world_size,
        })
    distributed.barrier()
    return finish_output(out) if finish else out


def read_artifact(folder: str | Path) -> dict:
    """``tether.json`` of an earlier stage's folder ({} for a folder tether did not write)."""
    path = Path(folder) / "tether.json"
    return json.loads(path.read_text()) if path.exists() else {}
