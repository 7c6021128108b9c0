"""The one training loop every gradient stage shares.

AdamW, linear warm-up then cosine or linear decay, gradient accumulation, gradient clipping,
bf16 autocast where the device supports it, periodic evaluation, ``metrics.jsonl`` and
TensorBoard events, a progress bar, and checkpoints that resume exactly. Under torchrun the same
loop runs on every rank with DDP or FSDP2 (tether.distributed): each rank trains on its share of
every global step, the global batch stays ``batch_size × grad_accum``, and the averaged gradient
equals the single-process one.

A checkpoint holds the model, optimiser, scheduler, every RNG state and the data position (the
step: the data order is a pure function of seed and step). It is written into a temporary
folder and renamed into place, so a process killed at any moment leaves the last complete
checkpoint intact; a resumed run ends with the same weights as an uninterrupted one (bitwise
on CPU). Nothing here is pickled: tensors go to safetensors, everything else to JSON.

Failure is designed (DESIGN.md): a checkpoint is written only once the next step has computed a
finite, non-exploding loss from its weights (:class:`Checkpoints`), and never with non-finite
weights, so the checkpoint a :class:`TrainingDiverged` names as the last good one is good; a loss
that blows up without becoming NaN stops the run too (:class:`LossGuard`, ``--divergence-factor``).
Every checkpoint stores the stage's whole config; ``--resume`` with other options is refused,
listing them, unless ``--allow-resume-changes`` and each change is safe (a lower lr, more steps,
eval/save cadence: :func:`resume_changes`). A damaged checkpoint is a one-line
:class:`~tether.errors.CheckpointError` naming the file and the way on.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, load_model, save_file, save_model
from tqdm.auto import tqdm

from tether import distributed
from tether.config import SEED_MAX, check, check_fields, opt, to_dict
from tether.errors import CheckpointError, ConfigError, TetherError
from tether.io import write_json

SCHEDULES = ("cosine", "linear", "constant")
PRECISIONS = ("auto", "fp32", "bf16")


@dataclass
class TrainConfig:
    """Optimisation settings shared by every stage that trains by gradient descent."""

    steps: int = opt(200, "optimiser steps (RL stages: iterations of rollout + update)")
    batch_size: int = opt(16, "sequences per micro-batch")
    grad_accum: int = opt(1, "micro-batches per optimiser step (effective batch = batch_size x grad_accum)")
    lr: float = opt(3e-4, "peak learning rate (AdamW)")
    weight_decay: float = opt(0.0, "AdamW weight decay on matrices (not on norms, biases or embeddings)")
    warmup_steps: int = opt(10, "steps of linear warm-up from 0 to lr")
    schedule: str = opt("cosine", "decay after warm-up: cosine | linear | constant")
    min_lr_ratio: float = opt(0.1, "final learning rate as a fraction of lr")
    max_grad_norm: float = opt(1.0, "clip the global gradient norm to this (0: no clipping)")
    precision: str = opt("auto", "auto (bf16 autocast on a GPU that has it, else fp32) | fp32 | bf16")
    device: str = opt("auto", "auto | cpu | cuda | cuda:N")
    eval_every: int = opt(50, "evaluate every N steps (0: only at the end)")
    save_every: int = opt(100, "checkpoint every N steps (0: only at the end)")
    keep_checkpoints: int = opt(1, "how many recent checkpoints to keep")
    seed: int = opt(0, "seed for initialisation, data order and sampling")
    strategy: str = opt("ddp", "under torchrun: ddp (whole model on every rank) | fsdp2 (fully_shard each block)")
    compile: bool = opt(False, "torch.compile the training and scoring passes (inductor; RL sampling: compiled "
                               "static-cache decoding): the first steps pay the compilation (tens of seconds on a "
                               "CPU), later ones run fused kernels; the same results")
    divergence_factor: float = opt(10.0, "stop when the smoothed training loss climbs above its running best by more "
                                         "than this many times the loss's own scale (tether.loop.LossGuard; 0: never; "
                                         "supervised stages: an RL surrogate loss has no scale to judge, and RL stages "
                                         "stop on non-finite losses, gradients and weights only)")
    allow_resume_changes: bool = opt(False, "with --resume: accept the safe changes to the options the checkpoint was "
                                            "written with (a lower lr, more steps, eval/save cadence, compile); "
                                            "any other change is refused either way")

    def validate(self) -> None:
        check_fields(self, "steps batch_size grad_accum keep_checkpoints", ge=1, integer=True)
        check_fields(self, "warmup_steps eval_every save_every", ge=0, integer=True)
        check("lr", self.lr, gt=0)
        check("weight_decay", self.weight_decay, ge=0)
        check("min_lr_ratio", self.min_lr_ratio, ge=0, le=1)
        check("max_grad_norm", self.max_grad_norm, ge=0, note="0: no clipping")
        check("seed", self.seed, ge=0, le=SEED_MAX, integer=True)
        check("divergence_factor", self.divergence_factor, ge=0, note="0: never stop on a rising loss")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.strategy not in distributed.STRATEGIES:
            raise ConfigError(f"strategy must be one of {distributed.STRATEGIES}, got {self.strategy!r}")


class TrainingDiverged(TetherError, RuntimeError):
    """The loss, gradient or weights became NaN or infinite, or the loss blew up (:class:`LossGuard`);
    the last good checkpoint is left in place and the message names it.

    ``from_start`` (an RL update, raised inside it): whether it went wrong before the iteration's
    first optimiser step, that is with the very weights the iteration started from.
    """

    def __init__(self, message: str, from_start: bool = True):
        super().__init__(message)
        self.from_start = from_start


class LossGuard:
    """Stops a run whose loss blows up without ever becoming NaN (``--divergence-factor``).

    On the training loss L_t of each optimiser step (the mean over the whole global batch):

        S_t = 0.9 · S_{t-1} + 0.1 · L_t,   S_1 = L_1     smoothed: one odd batch moves it a tenth of the way
        B_t = min(S_1, ..., S_t)                         the running best
        scale_t = max(|B_t|, |S_1|)                      the loss's own size
        diverged  <=>  S_t - B_t > factor · scale_t

    Why this form. Losses may be negative (robust DPO, a custom loss) or tend to 0 (a fitted
    reward model, a DPO loss on its training pairs), so a ratio S_t / B_t means nothing and a rise
    measured against |B_t| alone would stop a run that has reached ~0 at its first noisy batch.
    The rise is therefore measured in units of the larger of the best and the starting size: a
    positive loss may wander up to ``factor`` starting losses above its best before the run stops.
    With the default 10 no healthy run comes near (an SFT loss starts near ln V and falls; the DPO
    family starts at ln 2, 1 or (1/2β)²), while a blow-up passes it at once (SFT at lr 1e3 goes
    5.7 -> 8e4 in one step; IPO at lr 1e2 goes 25 -> 5e8). What it cannot see is a collapse that
    climbs back no further than the starting loss (a DPO policy that forgets everything returns to
    ln 2): that is no blow-up of the loss, and the evaluation shows it. The state travels in every
    checkpoint, so a resumed run judges its loss as an uninterrupted one would.
    """

    ALPHA = 0.1

    def __init__(self, factor: float, state: dict | None = None):
        self.factor = factor
        self.smoothed: float | None = None
        self.best: float | None = None
        self.start: float | None = None
        keys = ("smoothed", "best", "start")
        if isinstance(state, dict) and all(isinstance(state.get(k), (int, float)) for k in keys):
            self.smoothed, self.best, self.start = (float(state[k]) for k in keys)  # else: judged afresh

    def state(self) -> dict:
        return {"smoothed": self.smoothed, "best": self.best, "start": self.start}

    def update(self, loss: float) -> str | None:
        """Take one step's loss; returns what blew up (for the message) or None."""
        if self.smoothed is None:
            self.smoothed = self.best = self.start = loss
        else:
            self.smoothed = (1 - self.ALPHA) * self.smoothed + self.ALPHA * loss
            self.best = min(self.best, self.smoothed)
        scale = max(abs(self.best), abs(self.start))
        if self.factor and scale > 0 and self.smoothed - self.best > self.factor * scale:
            return (f"the loss blew up: smoothed {self.smoothed:.4g} against a best of {self.best:.4g} (more than "
                    f"--divergence-factor {self.factor:g} x {scale:.4g} above it; this step's loss {loss:.4g})")
        return None


def nonfinite_weights(model: torch.nn.Module) -> str | None:
    """The name of a parameter holding NaN or ±inf (None when all are finite), the same on every rank.

    Under FSDP2 each rank checks its shard and the answer is reduced over ranks.
    """
    bad = ""
    with torch.no_grad():
        for name, p in model.named_parameters():
            local = p.to_local() if hasattr(p, "to_local") else p
            if local.numel() and not bool(torch.isfinite(local).all()):
                bad = name
                break
    if distributed.env().active:
        flag = distributed.all_reduce(torch.tensor(float(bool(bad))), "max")
        if flag.item() and not bad:
            bad = "(a parameter on another rank)"
    return bad or None


# --- pieces -------------------------------------------------------------------------------


def resolve_device(name: str) -> torch.device:
    """auto | cpu | cuda | cuda:N; under torchrun also joins the process group and picks this rank's GPU."""
    return distributed.setup(name)[1]


def autocast(device: torch.device, precision: str):
    """bf16 autocast when asked for, or on ``auto`` when the GPU supports it; otherwise nothing."""
    use_bf16 = precision == "bf16" or (
        precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported()
    )
    return torch.autocast(device.type, dtype=torch.bfloat16) if use_bf16 else contextlib.nullcontext()


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW over trainable parameters; weight decay only on matrices that are not embeddings.

    The fused kernel (one pass over all parameters, what Hugging Face's Trainer uses by default)
    when every parameter is a plain floating-point tensor on the CPU or a GPU: on a 25.8M-parameter
    model it makes the optimiser step about 3x cheaper than the per-parameter loop
    (bench/compare_trl.py). Sharded (FSDP2) parameters keep the default implementation.
    """
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 and "embed" not in name else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    params = decay + no_decay
    fused = bool(params) and all(type(p.data) is torch.Tensor and p.is_floating_point() and p.device.type in ("cpu", "cuda")
                                 for p in params)
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, fused=fused or None)


def compiled(model: torch.nn.Module, cfg: TrainConfig) -> torch.nn.Module:
    """``model`` behind ``torch.compile`` when ``cfg.compile``, else ``model`` itself.

    The compiled module shares the parameters (optimiser, checkpoints and the saved model keep
    using ``model``); stages call it for the passes that train (and the no-grad passes that score
    a batch), not for sampling, whose KV-cache shapes change every token (the RL stages' sampler
    decodes from a static cache compiled by transformers instead: tether.rollout.sample). A micro-batch of a new
    sequence length costs one recompilation, after which the length is a dynamic dimension. Where it
    pays: the elementwise work between matmuls (norms, rotary, SiLU, softmax) is fused, so a
    small, overhead-bound model gains most (bench/compare_trl.py --compile).
    """
    return torch.compile(model) if cfg.compile else model


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Multiplier of lr at optimiser step ``step`` (0-based): warm-up, then the chosen decay."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if cfg.schedule == "cosine" else 1 - progress
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * shape


class DataOrder:
    """Which examples each micro-batch holds: a fresh seeded permutation every epoch.

    A pure function of (seed, micro-batch number), so the data position of a checkpoint is just
    its step, and resuming replays exactly the batches an uninterrupted run would have seen.
    """

    def __init__(self, n: int, batch_size: int, seed: int):
        if n < 1:
            raise ValueError("no training examples")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self._epoch, self._perm = -1, None

    def indices(self, micro: int) -> list[int]:
        start = micro * self.batch_size
        out = []
        for pos in range(start, start + self.batch_size):
            epoch, i = divmod(pos, self.n)
            if epoch != self._epoch:
                g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
                self._epoch, self._perm = epoch, torch.randperm(self.n, generator=g).tolist()
            out.append(self._perm[i])
        return out


def logged_until(path: Path, step: int) -> list[str]:
    """The lines of a JSONL log (``metrics.jsonl``, ``samples.jsonl``) whose ``step`` is at most ``step``, for a
    run resumed from checkpoint ``step``; none for ``step`` 0 (a run that starts over logs its step 0 again).
    A last line cut short by a killed process is dropped."""
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if lines:
        try:
            json.loads(lines[-1])
        except json.JSONDecodeError:
            lines.pop()
    return [line for line in lines if step and json.loads(line)["step"] <= step]


class MetricsLog:
    """``metrics.jsonl`` (one line a step) and TensorBoard events under ``tb/``."""

    def __init__(self, out_dir: Path, resume_step: int = 0):
        self.path = out_dir / "metrics.jsonl"
        self.main = distributed.env().main  # under torchrun rank 0 alone writes
        if not self.main:
            return
        if self.path.exists():  # keep only what the resumed checkpoint had seen (nothing when starting over)
            self.path.write_text("".join(l + "\n" for l in logged_until(self.path, resume_step)))
        self.file = open(self.path, "a", encoding="utf-8")
        from tensorboardX import SummaryWriter

        self.tb = SummaryWriter(str(out_dir / "tb"))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.main:
            return
        self.file.write(json.dumps({"step": step, **metrics}) + "\n")
        self.file.flush()
        for k, v in metrics.items():
            self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        if not self.main:
            return
        self.file.close()
        self.tb.close()


# --- checkpoints --------------------------------------------------------------------------


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

    A ``dcp/`` checkpoint (written under FSDP2) loads at any world size, into a sharded model or
    a whole one; a whole-model checkpoint loads into a whole model (one process or DDP). A missing,
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
        if distributed._is_fsdp(model):
            raise CheckpointError(f"{path} holds a whole-model checkpoint (written without fsdp2); resume it with "
                                  "--strategy ddp")
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
        _load_weights(path, model)
        try:
            optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
        except (ValueError, KeyError, TypeError) as e:
            raise _bad_checkpoint(path, "optimizer.safetensors", "does not fit this model's optimiser (was it written "
                                  f"with another --model or --lora?): {_short(e)}") from None
    try:
        scheduler.load_state_dict(meta["scheduler"])
        _set_rng_state(rng, meta["rng"])
    except (ValueError, KeyError, TypeError, RuntimeError, AttributeError) as e:
        raise _bad_checkpoint(path, "state.json",
                              f"holds a scheduler or RNG state that cannot be restored ({_short(e)})") from None
    return meta["step"]


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
                            "divergence_factor"})
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


# --- the loop -----------------------------------------------------------------------------


LossFn = Callable[[torch.nn.Module, dict], tuple[torch.Tensor, dict[str, float]]]


@dataclass
class TrainResult:
    step: int
    train: dict[str, float]
    eval: dict[str, float]
    seconds: float


def train(
    model: torch.nn.Module,
    n_examples: int,
    collate: Callable[[list[int]], dict],
    loss_fn: LossFn,
    cfg: TrainConfig,
    out_dir: Path,
    *,
    eval_fn: Callable[[torch.nn.Module], dict[str, float]] | None = None,
    resume: bool = False,
    desc: str = "train",
    run_config: dict | None = None,
) -> TrainResult:
    """Train ``model`` for ``cfg.steps`` optimiser steps and return the last metrics.

    ``collate(indices)`` builds a micro-batch (a dict of tensors) from example indices;
    ``loss_fn(model, batch)`` returns the micro-batch's mean loss and metrics to log (a
    ``tokens`` entry, if present, feeds the throughput figure; a ``loss_weight`` entry, if
    present, is what the mean runs over, e.g. labelled tokens, used when a micro-batch is split
    across ranks; rows by default). ``eval_fn(model)`` returns evaluation metrics; under torchrun
    every rank calls it. Checkpoints go to ``out_dir/checkpoints``; with ``resume`` the latest
    one there is loaded first. Under torchrun, rank r trains on its pieces of every global step
    (tether.distributed.step_pieces) and ``model`` holds the trained weights on every rank at the end.

    ``run_config`` is the stage's whole config as a dict (``tether.config.to_dict``), stored in
    every checkpoint; a resumed run whose options differ is refused (:func:`resume_from`). By
    default the TrainConfig alone is stored. The run stops with :class:`TrainingDiverged` when
    a loss or gradient is not finite, the loss blows up (:class:`LossGuard`), an evaluation loss
    is not finite, or the final weights are not; checkpoints are only written once their weights
    have worked (:class:`Checkpoints`).
    """
    cfg.validate()
    out_dir.mkdir(parents=True, exist_ok=True)
    env, device = distributed.setup(cfg.device)
    distributed.check_batch(cfg.batch_size, cfg.grad_accum, env.world_size)
    net = distributed.Trainable(model, cfg.strategy, device)
    net.module.train()
    eval_model = net.module if net.sharded else net.plain  # FSDP2: every rank runs the sharded forward
    forward = compiled(net.module, cfg)
    optimizer = build_optimizer(net.module, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg))
    if run_config is None:
        run_config = {"train": to_dict(cfg)}
    ckpts = Checkpoints(out_dir / "checkpoints", cfg, run_config)
    start, ckpt = resume_from(ckpts.folder, net.module, optimizer, scheduler, cfg, run_config) if resume else (0, None)
    meta = checkpoint_state(ckpt) if ckpt else {}
    guard = LossGuard(cfg.divergence_factor, meta.get("loss_guard"))
    order = DataOrder(n_examples, cfg.batch_size, cfg.seed)
    log = MetricsLog(out_dir, resume_step=start)
    bar = tqdm(total=cfg.steps, initial=start, desc=desc, dynamic_ncols=True, disable=not env.main)
    # the last step's metrics travel in each checkpoint: resumed from the final one, the run trains no step
    # and still returns (and its stage records) the metrics an uninterrupted run ends with
    train_metrics, eval_metrics = checkpoint_metrics(meta, "train"), checkpoint_metrics(meta, "eval")
    t0 = time.perf_counter()
    try:
        for step in range(start, cfg.steps):
            tick = time.perf_counter()
            micro = [order.indices(step * cfg.grad_accum + m) for m in range(cfg.grad_accum)]
            pieces, split = distributed.step_pieces(micro, env.rank, env.world_size)
            sums: dict[str, float] = {}
            bad = None
            for i, idx in enumerate(pieces):
                batch = {k: v.to(device) for k, v in collate(idx).items()}
                with autocast(device, cfg.precision):
                    loss, metrics = loss_fn(forward, batch)
                metrics = dict(metrics)
                share = distributed.piece_share(metrics.pop("loss_weight", float(len(idx))), split)
                if not torch.isfinite(loss) and bad is None:
                    bad = loss.item()  # every rank stops together, after the reduction below
                with net.accumulating(last=i == len(pieces) - 1):
                    (loss * (share * env.world_size) / cfg.grad_accum).backward()
                for k, v in {"loss": loss.item(), **metrics}.items():
                    sums[k] = sums.get(k, 0.0) + (v if k == "tokens" else v * share / cfg.grad_accum)
            if bad is not None:
                sums["_nonfinite"] = 1.0
            sums = distributed.reduce_metrics(sums)
            if sums.pop("_nonfinite", 0.0):
                raise ckpts.diverged(f"the loss is {bad}" if bad is not None else
                                     "the loss is not finite on another rank", step + 1)
            if (blown := guard.update(sums["loss"])) is not None:
                raise ckpts.diverged(blown, step + 1)
            grad_norm = net.clip_grad_norm(cfg.max_grad_norm)
            if not torch.isfinite(grad_norm):
                raise ckpts.diverged(f"the gradient norm is {grad_norm.item()}", step + 1)
            ckpts.confirm(net.module, optimizer, scheduler)  # these weights just gave a sound loss and gradient
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            seconds = time.perf_counter() - tick
            train_metrics = {f"train/{k}": v for k, v in sums.items() if k != "tokens"}
            train_metrics["train/lr"] = scheduler.get_last_lr()[0]
            train_metrics["train/grad_norm"] = float(grad_norm)
            if "tokens" in sums:
                train_metrics["perf/tokens_per_s"] = sums["tokens"] / seconds
            done = step + 1
            evaluated = {}
            if eval_fn is not None and ((cfg.eval_every and done % cfg.eval_every == 0) or done == cfg.steps):
                net.module.eval()
                with torch.no_grad(), autocast(device, cfg.precision):
                    eval_metrics = evaluated = eval_fn(eval_model)
                net.module.train()
                nonfinite = [k for k, v in evaluated.items() if k.endswith("loss") and not math.isfinite(v)]
                if nonfinite:
                    raise ckpts.diverged(f"the evaluation {nonfinite[0]} is {evaluated[nonfinite[0]]} after the "
                                         "update", done)
            log.log(done, {**train_metrics, **evaluated})
            if done == cfg.steps:  # the final weights: written now, if finite (save_checkpoint checks)
                ckpts.write(done, net.module, optimizer, scheduler, extra=with_metrics({}, train_metrics, eval_metrics),
                            loss_guard=guard.state())
            elif cfg.save_every and done % cfg.save_every == 0:
                ckpts.due(done, extra=with_metrics({}, train_metrics, eval_metrics), loss_guard=guard.state())
            bar.update(1)
            bar.set_postfix(loss=f"{sums['loss']:.3f}", **(
                {"tok/s": f"{train_metrics['perf/tokens_per_s']:.0f}"} if "tokens" in sums else {}))
    finally:
        bar.close()
        log.close()
    net.finish()
    return TrainResult(cfg.steps, train_metrics, eval_metrics, time.perf_counter() - t0)
