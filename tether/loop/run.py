"""What every training run holds, supervised or RL: the optimiser and schedule, checkpoints and resume,
the metrics log and progress bar, and the checks that stop a run going wrong.

A stage builds one :class:`Run` around the module it trains, then for each step (an optimiser step
of the supervised loop, an iteration of an RL one) back-propagates through ``tether.loop.accumulate``,
calls :meth:`Run.optimizer_step` (clip, check finite, confirm the pending checkpoint, step) and
:meth:`Run.record` (metrics.jsonl, the checkpoint falling due, the progress bar).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from tether import distributed
from tether.config import to_dict
from tether.loop.checkpoints import (
    Checkpoints,
    checkpoint_metrics,
    checkpoint_state,
    resume_from,
    with_metrics,
)
from tether.loop.guards import TrainingDiverged, nonfinite_weights
from tether.loop.pieces import (
    MetricsLog,
    TrainConfig,
    build_optimizer,
    lr_factor,
    peak_memory_gb,
    use_gradient_checkpointing,
)


class Run:
    """Optimiser, schedule, checkpoints, resume, log and bar of one run of ``cfg.steps`` steps on ``trained``
    (the module as wrapped for training: DDP / FSDP2 under torchrun).

    ``run_config``: the stage's whole config as a dict, stored in every checkpoint (a resumed run with
    other options is refused: tether.loop.checkpoints.resume_from). After construction ``start`` is the
    step to continue from, ``state`` the resumed checkpoint's state (``extra``: what the stage stored
    there), and ``train_metrics`` / ``eval_metrics`` the metrics it ended with (so a run resumed from its
    final checkpoint trains no step and still returns what an uninterrupted one did).
    """

    def __init__(self, trained: torch.nn.Module, cfg: TrainConfig, out_dir: Path, *, resume: bool,
                 run_config: dict | None, desc: str):
        self.trained, self.cfg = trained, cfg
        if cfg.gradient_checkpointing:
            use_gradient_checkpointing(trained)
        self.optimizer = build_optimizer(trained, cfg)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_factor(s, cfg))
        self.ckpts = Checkpoints(out_dir / "checkpoints", cfg, run_config or {"train": to_dict(cfg)})
        self.start, ckpt = (resume_from(self.ckpts.folder, trained, self.optimizer, self.scheduler, cfg,
                                        self.ckpts.config) if resume else (0, None))
        self.state = checkpoint_state(ckpt) if ckpt is not None else {}
        self.extra = self.state.get("extra") or {}
        self.train_metrics = checkpoint_metrics(self.state, "train")
        self.eval_metrics = checkpoint_metrics(self.state, "eval")
        self.log = MetricsLog(out_dir, resume_step=self.start)
        self.bar = tqdm(total=cfg.steps, initial=self.start, desc=desc, dynamic_ncols=True,
                        disable=not distributed.env().main)
        self.cpu_clock = time.process_time()

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def diverged(self, what: str, step: int, failed: int | None = None) -> TrainingDiverged:
        return self.ckpts.diverged(what, step, failed)

    def optimizer_step(self, *, confirm: bool = True, first: bool = True) -> float:
        """Clip the gradient, stop on a non-finite one, write the checkpoint pending on the weights that gave
        it (with ``confirm``), step and clear; returns the gradient norm before clipping. ``first``: whether
        this is the first optimiser step from the weights the step (iteration) started with (an RL update
        takes several), carried by the :class:`TrainingDiverged` raised."""
        grad_norm = distributed.clip_grad_norm(self.trained, self.cfg.max_grad_norm)
        if not torch.isfinite(grad_norm):
            raise TrainingDiverged(f"the gradient norm is {grad_norm.item()}", from_start=first)
        if confirm:
            self.ckpts.confirm(self.trained, self.optimizer, self.scheduler)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(grad_norm)

    def check_weights(self, model: torch.nn.Module, step: int) -> None:
        if (bad := nonfinite_weights(model)) is not None:
            raise self.diverged(f"the weights after the update are not finite ({bad})", step)

    def record(self, done: int, metrics: dict[str, float], evaluated: dict[str, float], *, extra: dict | None = None,
               loss_guard: dict | None = None, **postfix) -> None:
        """Log step ``done`` (1-based), then write its checkpoint (the final one now, its weights checked
        finite; a periodic one once the next step has worked with its weights). Adds ``perf/cpu_s`` (this
        process's CPU seconds since the previous step was recorded, evaluation included) and
        ``perf/peak_memory_gb`` (tether.loop.pieces.peak_memory_gb)."""
        clock, self.cpu_clock = self.cpu_clock, time.process_time()
        metrics = {**metrics, "perf/cpu_s": self.cpu_clock - clock,
                   "perf/peak_memory_gb": peak_memory_gb(next(self.trained.parameters()).device)}
        self.train_metrics, self.eval_metrics = metrics, evaluated or self.eval_metrics
        self.log.log(done, {**metrics, **evaluated})
        state = with_metrics(dict(extra or {}), metrics, self.eval_metrics)
        if done == self.cfg.steps:
            self.ckpts.write(done, self.trained, self.optimizer, self.scheduler, state, loss_guard=loss_guard)
        elif self.cfg.save_every and done % self.cfg.save_every == 0:
            self.ckpts.due(done, state, loss_guard=loss_guard)
        self.bar.update(1)
        if postfix:
            self.bar.set_postfix(**postfix)

    def eval_due(self, done: int) -> bool:
        every = self.cfg.eval_every
        return bool(every and done % every == 0) or done == self.cfg.steps

    def close(self) -> None:
        self.bar.close()
        self.log.close()
