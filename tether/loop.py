"""The one training loop every gradient stage shares.

AdamW, linear warm-up then cosine or linear decay, gradient accumulation, gradient clipping,
bf16 autocast where the device supports it, periodic evaluation, ``metrics.jsonl`` and
TensorBoard events, a progress bar, and checkpoints that resume exactly.

A checkpoint holds the model, optimiser, scheduler, every RNG state and the data position (the
step: the data order is a pure function of seed and step). It is written into a temporary
folder and renamed into place, so a process killed at any moment leaves the last complete
checkpoint intact; a resumed run ends with the same weights as an uninterrupted one (bitwise
on CPU). Nothing here is pickled: tensors go to safetensors, everything else to JSON.
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
from safetensors.torch import load_file, load_model, save_file, save_model
from tqdm.auto import tqdm

from tether.config import opt
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

    def validate(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or self.grad_accum < 1:
            raise ValueError("steps, batch_size and grad_accum must be at least 1")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is left in place."""


# --- pieces -------------------------------------------------------------------------------


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def autocast(device: torch.device, precision: str):
    """bf16 autocast when asked for, or on ``auto`` when the GPU supports it; otherwise nothing."""
    use_bf16 = precision == "bf16" or (
        precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported()
    )
    return torch.autocast(device.type, dtype=torch.bfloat16) if use_bf16 else contextlib.nullcontext()


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW over trainable parameters; weight decay only on matrices that are not embeddings."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 and "embed" not in name else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr)


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


class MetricsLog:
    """``metrics.jsonl`` (one line a step) and TensorBoard events under ``tb/``."""

    def __init__(self, out_dir: Path, resume_step: int = 0):
        self.path = out_dir / "metrics.jsonl"
        if self.path.exists():  # keep only what the resumed checkpoint had seen
            lines = [l for l in self.path.read_text().splitlines() if l and json.loads(l)["step"] <= resume_step]
            self.path.write_text("".join(l + "\n" for l in lines))
        self.file = open(self.path, "a", encoding="utf-8")
        from tensorboardX import SummaryWriter

        self.tb = SummaryWriter(str(out_dir / "tb"))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.file.write(json.dumps({"step": step, **metrics}) + "\n")
        self.file.flush()
        for k, v in metrics.items():
            self.tb.add_scalar(k, v, step)

    def close(self) -> None:
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
                    extra: dict | None = None) -> Path:
    """Write checkpoint ``step`` atomically into ``folder/step-NNNNNN`` and prune old ones.

    ``extra`` is any further JSON state a stage needs to resume exactly (e.g. PPO's β).
    """
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"step-{step:06d}"
    tmp = folder / f".tmp-step-{step:06d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_model(model, str(tmp / "model.safetensors"))
    opt_state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, st in opt_state["state"].items():
        for k, v in st.items():
            (tensors if torch.is_tensor(v) else scalars)[f"{idx}.{k}"] = v.contiguous() if torch.is_tensor(v) else v
    save_file(tensors, str(tmp / "optimizer.safetensors"))
    rng_tensors, rng_meta = _rng_state()
    save_file(rng_tensors, str(tmp / "rng.safetensors"))
    write_json(tmp / "state.json", {
        "step": step,
        "param_groups": opt_state["param_groups"],
        "optimizer_scalars": scalars,
        "scheduler": scheduler.state_dict(),
        "rng": rng_meta,
        "extra": extra or {},
    })
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in sorted(folder.glob("step-*"))[:-keep]:
        shutil.rmtree(old)
    return final


def latest_checkpoint(folder: Path) -> Path | None:
    found = sorted(folder.glob("step-*")) if folder.exists() else []
    return found[-1] if found else None


def load_checkpoint(path: Path, model, optimizer, scheduler) -> int:
    """Restore everything :func:`save_checkpoint` wrote; returns the step to continue from
    (the ``extra`` state is read with :func:`checkpoint_extra`)."""
    load_model(model, str(path / "model.safetensors"))
    meta = json.loads((path / "state.json").read_text())
    state: dict[int, dict] = {}
    for key, v in load_file(str(path / "optimizer.safetensors")).items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = v
    for key, v in meta["optimizer_scalars"].items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = v
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    scheduler.load_state_dict(meta["scheduler"])
    _set_rng_state(load_file(str(path / "rng.safetensors")), meta["rng"])
    return meta["step"]


def checkpoint_extra(path: Path) -> dict:
    """The ``extra`` JSON state a checkpoint was saved with ({} if none)."""
    return json.loads((path / "state.json").read_text()).get("extra", {})


# --- the loop -----------------------------------------------------------------------------


def _diverged(what: str, step: int, ckpt_dir: Path) -> TrainingDiverged:
    last = latest_checkpoint(ckpt_dir)
    return TrainingDiverged(
        f"{what} at step {step + 1}; stopping before the update. The last good checkpoint is "
        f"{last or 'none (none was written yet)'}. Try a lower lr or a smaller max_grad_norm."
    )


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
) -> TrainResult:
    """Train ``model`` for ``cfg.steps`` optimiser steps and return the last metrics.

    ``collate(indices)`` builds a micro-batch (a dict of tensors) from example indices;
    ``loss_fn(model, batch)`` returns the micro-batch's mean loss and metrics to log (a
    ``tokens`` entry, if present, feeds the throughput figure). ``eval_fn(model)`` returns
    evaluation metrics. Checkpoints go to ``out_dir/checkpoints``; with ``resume`` the latest
    one there is loaded first.
    """
    cfg.validate()
    out_dir.mkdir(parents=True, exist_ok=True)
    device = resolve_device(cfg.device)
    model.to(device).train()
    optimizer = build_optimizer(model, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg))
    ckpt_dir = out_dir / "checkpoints"
    start = 0
    if resume and (ckpt := latest_checkpoint(ckpt_dir)) is not None:
        start = load_checkpoint(ckpt, model, optimizer, scheduler)
    order = DataOrder(n_examples, cfg.batch_size, cfg.seed)
    log = MetricsLog(out_dir, resume_step=start)
    bar = tqdm(total=cfg.steps, initial=start, desc=desc, dynamic_ncols=True)
    train_metrics: dict[str, float] = {}
    eval_metrics: dict[str, float] = {}
    t0 = time.perf_counter()
    try:
        for step in range(start, cfg.steps):
            tick = time.perf_counter()
            sums: dict[str, float] = {}
            for micro in range(cfg.grad_accum):
                batch = {k: v.to(device) for k, v in collate(order.indices(step * cfg.grad_accum + micro)).items()}
                with autocast(device, cfg.precision):
                    loss, metrics = loss_fn(model, batch)
                if not torch.isfinite(loss):
                    raise _diverged(f"loss is {loss.item()}", step, ckpt_dir)
                (loss / cfg.grad_accum).backward()
                for k, v in {"loss": loss.item(), **metrics}.items():
                    sums[k] = sums.get(k, 0.0) + v / (1 if k == "tokens" else cfg.grad_accum)
            grad_norm = torch.nn.utils.clip_grad_norm_(
                model.parameters(), cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf")
            )
            if not torch.isfinite(grad_norm):
                raise _diverged(f"the gradient norm is {grad_norm.item()}", step, ckpt_dir)
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
                model.eval()
                with torch.no_grad(), autocast(device, cfg.precision):
                    eval_metrics = evaluated = eval_fn(model)
                model.train()
            log.log(done, {**train_metrics, **evaluated})
            if (cfg.save_every and done % cfg.save_every == 0) or done == cfg.steps:
                save_checkpoint(ckpt_dir, done, model, optimizer, scheduler, cfg.keep_checkpoints)
            bar.update(1)
            bar.set_postfix(loss=f"{sums['loss']:.3f}", **(
                {"tok/s": f"{train_metrics['perf/tokens_per_s']:.0f}"} if "tokens" in sums else {}))
    finally:
        bar.close()
        log.close()
    return TrainResult(cfg.steps, train_metrics, eval_metrics, time.perf_counter() - t0)
