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

from tether import distributed
from tether.config import opt
from tether.errors import TetherError
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

    def validate(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or self.grad_accum < 1:
            raise ValueError("steps, batch_size and grad_accum must be at least 1")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.strategy not in distributed.STRATEGIES:
            raise ValueError(f"strategy must be one of {distributed.STRATEGIES}, got {self.strategy!r}")
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")


class TrainingDiverged(TetherError, RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is left in place."""


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


class MetricsLog:
    """``metrics.jsonl`` (one line a step) and TensorBoard events under ``tb/``."""

    def __init__(self, out_dir: Path, resume_step: int = 0):
        self.path = out_dir / "metrics.jsonl"
        self.main = distributed.env().main  # under torchrun rank 0 alone writes
        if not self.main:
            return
        if self.path.exists():  # keep only what the resumed checkpoint had seen
            lines = [l for l in self.path.read_text().splitlines() if l and json.loads(l)["step"] <= resume_step]
            self.path.write_text("".join(l + "\n" for l in lines))
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
                    extra: dict | None = None) -> Path:
    """Write checkpoint ``step`` atomically into ``folder/step-NNNNNN`` and prune old ones.

    ``extra`` is any further JSON state a stage needs to resume exactly (e.g. PPO's β). Under
    torchrun every rank calls this: a whole model (one process, DDP) is written by rank 0 alone;
    an FSDP2-sharded one through ``torch.distributed.checkpoint`` into ``dcp/`` (each rank its
    shard, readable at any world size). Either way the folder appears by one rename, after all
    ranks have written.
    """
    model = _unwrap(model)
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
        rng_tensors, rng_meta = _rng_state()
        save_file(rng_tensors, str(tmp / "rng.safetensors"))
        write_json(tmp / "state.json", {**state, "scheduler": scheduler.state_dict(), "rng": rng_meta,
                                        "extra": extra or {}})
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in sorted(folder.glob("step-*"))[:-keep]:
            shutil.rmtree(old)
    distributed.barrier()
    return final


def _unwrap(model):
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def latest_checkpoint(folder: Path) -> Path | None:
    found = sorted(folder.glob("step-*")) if folder.exists() else []
    return found[-1] if found else None


def load_checkpoint(path: Path, model, optimizer, scheduler) -> int:
    """Restore everything :func:`save_checkpoint` wrote; returns the step to continue from
    (the ``extra`` state is read with :func:`checkpoint_extra`).

    A ``dcp/`` checkpoint (written under FSDP2) loads at any world size, into a sharded model or
    a whole one; a whole-model checkpoint loads into a whole model (one process or DDP).
    """
    model = _unwrap(model)
    meta = json.loads((path / "state.json").read_text())
    if (path / "dcp").is_dir():
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        model_sd, optim_sd = get_state_dict(model, optimizer)
        both = {"model": model_sd, "optimizer": optim_sd}
        dcp.load(both, checkpoint_id=str(path / "dcp"))
        set_state_dict(model, optimizer, model_state_dict=both["model"], optim_state_dict=both["optimizer"])
    else:
        if distributed._is_fsdp(model):
            raise ValueError(f"{path} holds a whole-model checkpoint (written without fsdp2); resume it with "
                             "--strategy ddp")
        load_model(model, str(path / "model.safetensors"))
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
    ``tokens`` entry, if present, feeds the throughput figure; a ``loss_weight`` entry, if
    present, is what the mean runs over, e.g. labelled tokens, used when a micro-batch is split
    across ranks; rows by default). ``eval_fn(model)`` returns evaluation metrics; under torchrun
    every rank calls it. Checkpoints go to ``out_dir/checkpoints``; with ``resume`` the latest
    one there is loaded first. Under torchrun, rank r trains on its pieces of every global step
    (tether.distributed.step_pieces) and ``model`` holds the trained weights on every rank at the end.
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
    ckpt_dir = out_dir / "checkpoints"
    start = 0
    if resume and (ckpt := latest_checkpoint(ckpt_dir)) is not None:
        start = load_checkpoint(ckpt, net.module, optimizer, scheduler)
    order = DataOrder(n_examples, cfg.batch_size, cfg.seed)
    log = MetricsLog(out_dir, resume_step=start)
    bar = tqdm(total=cfg.steps, initial=start, desc=desc, dynamic_ncols=True, disable=not env.main)
    train_metrics: dict[str, float] = {}
    eval_metrics: dict[str, float] = {}
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
                raise _diverged(f"loss is {bad}" if bad is not None else "the loss is not finite on another rank",
                                step, ckpt_dir)
            grad_norm = net.clip_grad_norm(cfg.max_grad_norm)
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
                net.module.eval()
                with torch.no_grad(), autocast(device, cfg.precision):
                    eval_metrics = evaluated = eval_fn(eval_model)
                net.module.train()
            log.log(done, {**train_metrics, **evaluated})
            if (cfg.save_every and done % cfg.save_every == 0) or done == cfg.steps:
                save_checkpoint(ckpt_dir, done, net.module, optimizer, scheduler, cfg.keep_checkpoints)
            bar.update(1)
            bar.set_postfix(loss=f"{sums['loss']:.3f}", **(
                {"tok/s": f"{train_metrics['perf/tokens_per_s']:.0f}"} if "tokens" in sums else {}))
    finally:
        bar.close()
        log.close()
    net.finish()
    return TrainResult(cfg.steps, train_metrics, eval_metrics, time.perf_counter() - t0)
