"""The training loops every gradient stage shares, and their pieces.

    pieces.py       TrainConfig (the optimisation options of every stage), device and bf16 autocast,
                    AdamW, warm-up + decay, torch.compile, the seeded data order, metrics.jsonl + TensorBoard
    accumulate.py   the one accumulation rule: loss terms as sums and counts, divided by the step's
                    global count across micro-batches and ranks (the gradient does not depend on the split, so
                    a micro-batch runs as passes of like-length rows: length_passes)
    guards.py       TrainingDiverged, the rising-loss rule (LossGuard), the finite-weights check
    checkpoints.py  atomic checkpoints that resume exactly, written only once their weights have worked;
                    the resume guard (a resumed run with other options is refused, or accepted when safe)
    run.py          Run: what every run holds (optimiser, schedule, checkpoints, resume, log, bar)
    supervised.py   train(): the supervised loop (SFT, RM, DPO family, KTO, pretraining)
    rl.py           train_rl(): the RL loop (PPO, GRPO, RLOO plug in rollout -> score -> update)

Failure is designed (DESIGN.md): a checkpoint is written only once the next step has computed a
finite, non-exploding loss from its weights (:class:`Checkpoints`), and never with non-finite
weights, so the checkpoint a :class:`TrainingDiverged` names as the last good one is good; a loss
that blows up without becoming NaN stops the run too (:class:`LossGuard`, ``--divergence-factor``).
Under torchrun the same loops run on every rank with DDP or FSDP2 (tether.distributed).
"""

from tether.loop.accumulate import Accumulated, Counts, accumulate, length_passes, rows, step_counts
from tether.loop.checkpoints import (
    Checkpoints,
    checkpoint_extra,
    checkpoint_metrics,
    checkpoint_state,
    diverged_error,
    latest_checkpoint,
    load_checkpoint,
    resume_changes,
    resume_from,
    save_checkpoint,
    with_metrics,
)
from tether.loop.guards import LossGuard, TrainingDiverged, nonfinite_weights
from tether.loop.pieces import (
    PRECISIONS,
    SCHEDULES,
    DataOrder,
    MetricsLog,
    TrainConfig,
    autocast,
    build_optimizer,
    compiled,
    logged_until,
    lr_factor,
    resolve_device,
)
from tether.loop.run import Run
from tether.loop.supervised import LossFn, TrainResult, train

__all__ = [
    "PRECISIONS", "SCHEDULES", "Accumulated", "Checkpoints", "Counts", "DataOrder", "LossFn", "LossGuard",
    "MetricsLog", "Run", "TrainConfig", "TrainResult", "TrainingDiverged", "accumulate", "autocast",
    "build_optimizer", "checkpoint_extra", "checkpoint_metrics", "checkpoint_state", "compiled", "diverged_error",
    "latest_checkpoint", "length_passes", "load_checkpoint", "logged_until", "lr_factor", "nonfinite_weights",
    "resolve_device", "resume_changes", "resume_from", "rows", "save_checkpoint", "step_counts", "train", "with_metrics",
]
