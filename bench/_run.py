"""What the experiment scripts in bench/ share: the tether command, a logged, single-threaded subprocess, and the
optimiser steps an RL stage takes (:class:`Steps`, for the timing scripts)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

TETHER = [sys.executable, "-m", "tether.cli"]


def sh(args: list[str], log: Path) -> None:
    """Run ``args`` with one thread per process (several runs share the cores), appending the command line and
    its output to ``log``; a failing command raises."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as f:
        f.write("$ " + " ".join(args) + "\n")
        f.flush()
        subprocess.run(args, stdout=f, stderr=subprocess.STDOUT, env=env, check=True)


class Steps:
    """What an RL stage's update asks of its :class:`tether.loop.Run`, and no more: ``optimizer_step`` (clip the
    gradient norm, stop on a non-finite one, step AdamW, clear the gradients; returns the norm), with no
    checkpoints, metrics log or progress bar, so that a benchmark times the update alone."""

    def __init__(self, trained, cfg):
        from tether.loop import build_optimizer

        self.trained, self.cfg = trained, cfg
        self.optimizer = build_optimizer(trained, cfg)

    def optimizer_step(self, *, confirm: bool = False, first: bool = True) -> float:
        import torch

        from tether import distributed
        from tether.loop import TrainingDiverged

        grad_norm = distributed.clip_grad_norm(self.trained, self.cfg.max_grad_norm)
        if not torch.isfinite(grad_norm):
            raise TrainingDiverged(f"the gradient norm is {grad_norm.item()}", from_start=first)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(grad_norm)
