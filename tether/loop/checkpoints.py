"""Checkpoints that resume exactly, and that are written only once their weights have worked.

A checkpoint holds the model, optimiser, scheduler, every RNG state and the data position (the
step: the data order is a pure function of seed and step). It is written into a temporary
folder and renamed into place, so a process killed at any moment leaves the last complete
checkpoint intact; a resumed run ends with the same weights as an uninterrupted one (bitwise
on CPU). Nothing here is pickled: tensors go to safetensors, everything else to JSON.

Every checkpoint stores the stage's whole config; ``--resume`` with other options is refused,
listing them, unless ``--allow-resume-changes`` and each change is safe (a lower lr, more steps,
eval/save cadence: :func:`resume_changes`). A damaged checkpoint is a one-line
:class:`~tether.errors.CheckpointError` naming the file and the way on.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, load_model, save_file, save_model

from tether import distributed
from tether.errors import CheckpointError, ConfigError
from tether.io import write_json
from tether.loop.guards import TrainingDiverged, nonfinite_weights
from tether.loop.pieces import TrainConfig, lr_factor



def _rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda{i}"] = s
    name, keys, pos, has_gauss, cached = np.random.get_state()
    version, state, gauss = random.getstate()
    meta = {"numpy": [name, keys.tolist(), pos, has_gauss, cached], "python": [version, list(state), gauss]}
    return tensors, meta


def _set_rng_state(tensors: dict[str, torch.Tensor], meta: dict) -> None:
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("cuda"))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    name, keys, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    version, state, gauss = meta["python"]
    random.setstate((version, tuple(state), gauss))


def save_checkpoint(folder: Path, step: int, model, optimizer, scheduler, keep: int = 1,
                    extra: dict | None = None, *, config: dict | None = None,
                    rng: tuple[dict, dict] | None = None, loss_guard: dict | None = None) -> Path:
    """Write checkpoint ``step`` atomically into ``folder/step-NNNNNN`` and prune old ones.

    Weights that are not all finite are never written: that raises :class:`TrainingDiverged`
    (naming the last checkpoint there) instead. ``extra`` is any further JSON state a stage needs
    to resume exactly (e.g. PPO's β); ``config`` the stage's whole config as a dict (what
    :func:`resume_from` compares a resumed run's options with); ``rng`` the RNG states to store
    (by default the current ones; :class:`Checkpoints` passes those of the moment the checkpoint
    fell due); ``loss_guard`` the :class:`LossGuard` state. Under
    torchrun every rank calls this: a whole model (one process, DDP) is written by rank 0 alone;
    an FSDP2-sharded one through ``torch.distributed.checkpoint`` into ``dcp/`` (each rank its
    shard, readable at any world size). Either way the folder appears by one rename, after all
    ranks have written.
    """
    model = _unwrap(model)
    if (bad := nonfinite_weights(model)) is not None:
        raise diverged_error(f"the weights are not finite ({bad})", step, folder)
    main, sharded = distributed.env().main, distributed._is_fsdp(model)
    final = folder / f"step-{step:06d}"
    tmp = folder / f".tmp-step-{step:06d}"
    if main:
        folder.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    distributed.barrier()
    state: dict = {"step": step}
    if sharded:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_sd, optim_sd = get_state_dict(model, optimizer)
        dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=str(tmp / "dcp"))
    elif main:
        save_model(model, str(tmp / "model.safetensors"))
        opt_state = optimizer.state_dict()
        tensors, scalars = {}, {}
        for idx, st in opt_state["state"].items():
            for k, v in st.items():
                (tensors if torch.is_tensor(v) else scalars)[f"{idx}.{k}"] = v.contiguous() if torch.is_tensor(v) else v
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        state.update(param_groups=opt_state["param_groups"], optimizer_scalars=scalars)
    if main:
        rng_tensors, rng_meta = rng or _rng_state()
        save_file(rng_tensors, str(tmp / "rng.safetensors"))
        write_json(tmp / "state.json", {**state, "scheduler": scheduler.state_dict(), "rng": rng_meta,
                                        "extra": extra or {}, "config": config, "loss_guard": loss_guard})
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in sorted(folder.glob("step-*"))[:-max(keep, 1)]:
            if old != final:  # never the checkpoint just written
                shutil.rmtree(old)
    distributed.barrier()
    return final


def _unwrap(model):
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def latest_checkpoint(folder: Path) -> Path | None:
    """The newest ``step-NNNNNN`` folder in ``folder`` (None when there is none).

    Nothing is skipped silently: an entry named ``step-*`` that is not such a folder is an error
    naming it. (``.tmp-step-*`` folders are writes that never finished; they are not checkpoints.)
    """
    found = []
    for path in sorted(folder.glob("step-*")) if folder.is_dir() else []:
        if not (path.is_dir() and path.name[5:].isdigit()):
            raise CheckpointError(f"{path}: not a checkpoint tether wrote (expected a folder step-NNNNNN); "
                                  f"move it out of {folder} to resume")
        found.append(path)
    return max(found, key=lambda p: int(p.name[5:])) if found else None


def _bad_checkpoint(path: Path, name: str, what: str) -> CheckpointError:
    return CheckpointError(f"{path / name}: {what}; delete the folder {path} to resume from the checkpoint before it "
                           "(if one is kept), or start over with --overwrite")


def _short(err: Exception) -> str:
    return " ".join(str(err).split())[:200] or type(err).__name__


def checkpoint_state(path: Path) -> dict:
    """``state.json`` of checkpoint ``path``, checked: a JSON object with what :func:`load_checkpoint` needs."""
    try:
        text = (path / "state.json").read_text(encoding="utf-8")
    except FileNotFoundError:
        raise _bad_checkpoint(path, "state.json", "missing (an incomplete checkpoint)") from None
    except UnicodeDecodeError:
        raise _bad_checkpoint(path, "state.json", "not text (the file is corrupt)") from None
    except OSError as e:
        raise _bad_checkpoint(path, "state.json", f"cannot be read ({e.strerror or _short(e)})") from None
    if not text.strip():
        raise _bad_checkpoint(path, "state.json", "empty (expected the checkpoint's JSON state)")
    try:
        meta = json.loads(text)
    except json.JSONDecodeError as e:
        raise _bad_checkpoint(path, "state.json", f"not valid JSON (line {e.lineno}: {e.msg})") from None
    if not isinstance(meta, dict):
        raise _bad_checkpoint(path, "state.json", f"expected a JSON object, got {type(meta).__name__}")
    need = ["step", "scheduler", "rng"] + ([] if (path / "dcp").is_dir() else ["param_groups", "optimizer_scalars"])
    if missing := [k for k in need if k not in meta]:
        raise _bad_checkpoint(path, "state.json", f"lacks {', '.join(missing)}")
    step = meta["step"]
    if type(step) is not int or (path.name[5:].isdigit() and step != int(path.name[5:])):
        raise _bad_checkpoint(path, "state.json", f"says step {step!r}, but the folder is {path.name}")
    return meta


def _tensors(path: Path, name: str) -> dict[str, torch.Tensor]:
    if not (path / name).is_file():
        raise _bad_checkpoint(path, name, "missing (an incomplete checkpoint)")
    try:
        return load_file(str(path / name))
    except Exception as e:  # safetensors reports a truncated or garbled file in its own words
        raise _bad_checkpoint(path, name, f"truncated or corrupt ({_short(e)})") from None


def _load_weights(path: Path, model) -> None:
    file = path / "model.safetensors"
    if not file.is_file():
        raise _bad_checkpoint(path, "model.safetensors", "missing (an incomplete checkpoint)")
    try:
        load_model(model, str(file))
    except Exception as e:
        try:
            with safe_open(str(file), "pt") as f:
                for key in f.keys():
                    f.get_slice(key)
        except Exception:
            raise _bad_checkpoint(path, "model.safetensors", f"truncated or corrupt ({_short(e)})") from None
        raise _bad_checkpoint(path, "model.safetensors", f"does not fit this model (was it written with another "
                                                         f"--model or --lora?): {_short(e)}") from None


def load_checkpoint(path: Path, model, optimizer, scheduler) -> int:
    """Restore everything :func:`save_checkpoint` wrote; returns the step to continue from
    (the ``extra`` state is read with :func:`checkpoint_extra`).

    Either kind loads at any world size, into a whole model (one process, DDP) or a sharded one
    (FSDP2): a ``dcp/`` checkpoint (written under FSDP2) through torch.distributed.checkpoint, a
    whole-model one by cutting each full tensor to the rank's shard. A missing,
    empty, truncated or garbled file is a :class:`CheckpointError` naming it and the way on; every
    file is read before the model, optimiser and scheduler are touched.
    """
    model = _unwrap(model)
    meta = checkpoint_state(path)
    rng = _tensors(path, "rng.safetensors")
    if (path / "dcp").is_dir():
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        model_sd, optim_sd = get_state_dict(model, optimizer)
        both = {"model": model_sd, "optimizer": optim_sd}
        try:
            dcp.load(both, checkpoint_id=str(path / "dcp"))
        except Exception as e:
            raise _bad_checkpoint(path, "dcp", f"cannot be loaded ({_short(e)})") from None
        set_state_dict(model, optimizer, model_state_dict=both["model"], optim_state_dict=both["optimizer"])
    else:
        state: dict[int, dict] = {}
        tensors = _tensors(path, "optimizer.safetensors")
        try:
            for key, v in tensors.items():
                idx, name = key.split(".", 1)
                state.setdefault(int(idx), {})[name] = v
            for key, v in meta["optimizer_scalars"].items():
                idx, name = key.split(".", 1)
                state.setdefault(int(idx), {})[name] = v
        except (ValueError, AttributeError) as e:
            raise _bad_checkpoint(path, "optimizer.safetensors",
                                  f"not an optimiser state tether wrote ({_short(e)})") from None
        sharded = distributed._is_fsdp(model)  # a whole-model checkpoint into shards: each rank takes its own
        if not sharded:
            _load_weights(path, model)
        try:
            if sharded:
                _load_whole_into_shards(path, model, optimizer, state, meta["param_groups"])
            else:
                optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
        except (ValueError, KeyError, TypeError, RuntimeError) as e:
            raise _bad_checkpoint(path, "model.safetensors" if sharded else "optimizer.safetensors",
                                  "does not fit this model (was it written with another --model or --lora?): "
                                  f"{_short(e)}") from None
    try:
        scheduler.load_state_dict(meta["scheduler"])
        _set_rng_state(rng, meta["rng"])
    except (ValueError, KeyError, TypeError, RuntimeError, AttributeError) as e:
        raise _bad_checkpoint(path, "state.json",
                              f"holds a scheduler or RNG state that cannot be restored ({_short(e)})") from None
    return meta["step"]


def _load_whole_into_shards(path: Path, model, optimizer, state: dict[int, dict], param_groups: list[dict]) -> None:
    """A whole-model checkpoint (one process or DDP) into an FSDP2-sharded model and its optimiser.

    The optimiser state is stored by parameter number (the order the optimiser holds the parameters,
    the same in a whole and a sharded model); torch.distributed.checkpoint.state_dict takes it by
    parameter name, as full tensors that every rank cuts to its shard.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    weights = _tensors(path, "model.safetensors")
    names = {id(p): n for n, p in model.named_parameters()}
    fqns = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    optim = {"state": {fqns[i]: v for i, v in state.items()},
             "param_groups": [{**g, "params": [fqns[i] for i in g["params"]]} for g in param_groups]}
    set_state_dict(model, optimizer, model_state_dict=weights, optim_state_dict=optim,
                   options=StateDictOptions(full_state_dict=True))


def checkpoint_extra(path: Path) -> dict:
    """The ``extra`` JSON state a checkpoint was saved with ({} if none)."""
    return checkpoint_state(path).get("extra") or {}


def with_metrics(extra: dict, train: dict[str, float], evaluated: dict[str, float]) -> dict:
    """``extra`` with the last step's metrics (training and latest evaluation), for :func:`checkpoint_metrics`."""
    return {**extra, "metrics": {"train": dict(train), "eval": dict(evaluated)}}


def checkpoint_metrics(meta: dict, kind: str) -> dict[str, float]:
    """The ``kind`` ("train" or "eval") metrics of the step a checkpoint's state ``meta`` was written after
    ({} for a checkpoint without them, or none)."""
    found = ((meta.get("extra") or {}).get("metrics") or {}).get(kind)
    return dict(found) if isinstance(found, dict) else {}


# --- resuming with other options ------------------------------------------------------------

# Options that say how a run is driven, not what it learns: never compared on resume.
RESUME_IGNORED = frozenset({"resume", "overwrite", "allow_resume_changes", "out", "device", "keep_checkpoints",
                            "divergence_factor", "strategy"})
# Changes --allow-resume-changes accepts (besides a lower lr and more steps): when to evaluate and save, and
# compilation (the same computation, fused).
RESUME_CADENCE = frozenset({"eval_every", "save_every", "compile"})


def _flat(config: dict, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _a_callable(value) -> bool:
    """A function passed through the Python API, recorded by name only ("<function f>"): not comparable."""
    return isinstance(value, str) and value.startswith("<function ")


def _safe_change(name: str, old, new) -> bool:
    number = lambda x: isinstance(x, (int, float)) and not isinstance(x, bool)  # noqa: E731
    if name == "lr":
        return number(old) and number(new) and new < old
    if name == "steps":
        return number(old) and number(new) and new > old
    return name in RESUME_CADENCE


def resume_changes(path: Path, saved: dict | None, config: dict | None, allow: bool) -> set[str]:
    """Compare the options of a resumed run with those checkpoint ``path`` was written with.

    Returns the names of the (accepted) changed options; raises one :class:`ConfigError` listing every
    option that differs (old → new) unless ``allow`` and each change is safe: a lower ``lr`` (the
    schedule continues from the new peak), more ``steps`` (the schedule is stretched to the new
    end from the current step), or another ``eval_every`` / ``save_every`` / ``compile``. Anything
    else (data, seed, batch sizes, model, loss, ...) changes what the run would have learnt and is
    refused even then. A checkpoint written before configs were stored (``saved`` None) resumes as
    it always did; options that only one side knows (added in another tether version) are not compared, nor
    is a reward function passed through the Python API (recorded by name only).
    """
    if saved is None or config is None:
        return set()
    old = _flat(saved)
    new = _flat(json.loads(json.dumps(config, default=str)))
    diffs = [(key, old[key], new[key]) for key in old
             if key in new and old[key] != new[key] and key.rsplit(".", 1)[-1] not in RESUME_IGNORED
             and not (_a_callable(old[key]) and _a_callable(new[key]))]
    if not diffs:
        return set()

    def listing(items) -> str:
        return ", ".join(f"--{k.rsplit('.', 1)[-1].replace('_', '-')} {json.dumps(a)} → {json.dumps(b)}"
                         for k, a, b in items)

    unsafe = [d for d in diffs if not _safe_change(d[0].rsplit(".", 1)[-1], d[1], d[2])]
    start_over = "resume with the options it was written with, or start over with --overwrite (or another --out)"
    if allow and unsafe:
        raise ConfigError(f"{path}: these options cannot change on resume, even with --allow-resume-changes: "
                          f"{listing(unsafe)}; {start_over}")
    if not allow:
        hint = ("; --allow-resume-changes accepts these changes" if not unsafe else
                "; --allow-resume-changes accepts only a lower --lr, more --steps and another --eval-every, "
                "--save-every or --compile")
        raise ConfigError(f"{path}: --resume with options that differ from those the checkpoint was written with: "
                          f"{listing(diffs)}; {start_over}{hint}")
    return {k.rsplit(".", 1)[-1] for k, _, _ in diffs}


def resume_from(ckpt_dir: Path, model, optimizer, scheduler, cfg: TrainConfig,
                config: dict | None) -> tuple[int, Path | None]:
    """Load the latest checkpoint in ``ckpt_dir`` (if any) after checking ``config`` against the one it
    stored (:func:`resume_changes`); returns (the step to continue from, the checkpoint or None).

    With an accepted change of ``lr`` or ``steps`` the schedule is rebuilt from the new options: the
    scheduler's base lr (which the checkpoint restores) becomes the new ``lr`` and the optimiser's
    current lr is recomputed for the step reached, so the new value takes effect at once.
    """
    ckpt = latest_checkpoint(ckpt_dir)
    if ckpt is None:
        return 0, None
    changed = resume_changes(ckpt, checkpoint_state(ckpt).get("config"), config, cfg.allow_resume_changes)
    step = load_checkpoint(ckpt, model, optimizer, scheduler)
    if changed & {"lr", "steps"}:
        factor = lr_factor(scheduler.last_epoch, cfg)
        scheduler.base_lrs = [cfg.lr for _ in optimizer.param_groups]
        for group in optimizer.param_groups:
            group["initial_lr"], group["lr"] = cfg.lr, cfg.lr * factor
        scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
    return step, ckpt


class Checkpoints:
    """Writes a stage's checkpoints so that every one written holds weights known to work.

    A checkpoint that falls due after step N (:meth:`due`) is written only once the next step has
    computed a finite, non-exploding loss and gradient from exactly those weights
    (:meth:`confirm`), with the RNG state of the moment it fell due (so it resumes exactly); a
    run that diverges in between never writes it, so the checkpoint a :class:`TrainingDiverged`
    names as the last good one is good. The final checkpoint is written at once (:meth:`write`),
    its weights checked finite. Each holds ``config``, the stage's whole config (see :func:`resume_from`).
    The RL stages confirm once the next iteration has sampled (GRPO/RLOO) or sampled and scored
    (PPO) with those weights; if its first update then fails, they pass ``failed`` to :meth:`diverged`.
    """

    def __init__(self, folder: Path, cfg: TrainConfig, config: dict | None):
        self.folder, self.cfg, self.keep, self.config = folder, cfg, cfg.keep_checkpoints, config
        self.pending: dict | None = None
        self.written: set[int] = set()  # the steps this process wrote (the only ones it may set aside)

    def due(self, step: int, extra: dict | None = None, loss_guard: dict | None = None) -> None:
        self.pending = {"step": step, "rng": _rng_state(), "extra": extra, "loss_guard": loss_guard}

    def confirm(self, model, optimizer, scheduler) -> None:
        if self.pending is not None:
            p, self.pending = self.pending, None
            save_checkpoint(self.folder, p["step"], model, optimizer, scheduler, self.keep, p["extra"],
                            config=self.config, rng=p["rng"], loss_guard=p["loss_guard"])
            self.written.add(p["step"])

    def write(self, step: int, model, optimizer, scheduler, extra: dict | None = None,
              loss_guard: dict | None = None) -> Path:
        self.pending = None
        if (bad := nonfinite_weights(_unwrap(model))) is not None:
            raise self.diverged(f"the weights after the update are not finite ({bad})", step)
        path = save_checkpoint(self.folder, step, model, optimizer, scheduler, self.keep, extra, config=self.config,
                               loss_guard=loss_guard)
        self.written.add(step)
        return path

    def diverged(self, what: str, step: int, failed: int | None = None) -> TrainingDiverged:
        """The error to raise when step ``step`` (1-based) went wrong; the pending checkpoint is dropped.

        ``failed``: the step of a checkpoint already written that holds the weights that went wrong
        (a stage that confirms a checkpoint before every check of its weights has run); if this
        process wrote it, it is set aside as ``diverged-step-NNNNNN``, where --resume does not look,
        and not named as good.
        """
        self.pending = None
        note = ""
        bad = self.folder / f"step-{failed or 0:06d}"
        if failed in self.written:  # the same on every rank (the newest checkpoint: never pruned)
            aside = self.folder / f"diverged-{bad.name}"
            if distributed.env().main and bad.is_dir():
                shutil.rmtree(aside, ignore_errors=True)
                os.replace(bad, aside)
            distributed.barrier()
            note = f" ({aside} holds the weights that failed, set aside)"
        elif failed is not None and bad.is_dir():
            note = f" (with the weights of {bad}, which this run resumed from)"
        return diverged_error(what + note, step, self.folder, self.cfg, before=failed)


def diverged_error(what: str, step: int, ckpt_dir: Path, cfg: TrainConfig | None = None,
                   before: int | None = None) -> TrainingDiverged:
    """A :class:`TrainingDiverged` for ``what`` at step ``step`` (1-based) naming the last checkpoint in
    ``ckpt_dir`` (of a step below ``before``, when given) and how to go on from it with a lower
    learning rate (a tenth of ``cfg.lr``)."""
    try:
        last = latest_checkpoint(ckpt_dir)
    except CheckpointError:
        last = None
    first = ""
    if last is not None and before is not None and int(last.name[5:]) >= before:
        first = f"move {last} out of {ckpt_dir}, then "
        older = [p for p in ckpt_dir.glob("step-*")
                 if p.is_dir() and p.name[5:].isdigit() and int(p.name[5:]) < before]
        last = max(older, key=lambda p: int(p.name[5:])) if older else None
    lower = f"{cfg.lr / 10:g}" if cfg else "(a lower value)"
    clip = ("clip the gradient with --max-grad-norm 1" if cfg and not cfg.max_grad_norm
            else "clip harder with a smaller --max-grad-norm")
    if last is not None:
        how = (f"The last good checkpoint is {last}; to go on from it with a lower learning rate, {first}run the "
               f"same command with --resume --allow-resume-changes --lr {lower}")
    else:
        how = f"No good checkpoint is left to go on from; start over with a lower learning rate: --overwrite --lr {lower}"
    return TrainingDiverged(f"{what} at step {step}; stopped. {how} (or {clip}).")
