"""The supervised loop: SFT, reward models, DPO and its family, KTO and pretraining train through it.

Each optimiser step takes ``batch_size × grad_accum`` examples in the seeded order of
:class:`~tether.loop.pieces.DataOrder`; under torchrun rank r trains on its pieces of them
(tether.distributed.step_pieces). The gradient is accumulated by sums and counts
(tether.loop.accumulate), so it is the same for any split into micro-batches and ranks.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from tether import distributed
from tether.loop.accumulate import Counts, accumulate, length_passes, rows
from tether.loop.guards import LossGuard, TrainingDiverged
from tether.loop.pieces import DataOrder, TrainConfig, autocast, compiled
from tether.loop.run import Run

LossFn = Callable[[torch.nn.Module, dict], tuple[dict[str, torch.Tensor], dict[str, float]]]


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
    count: Callable[[dict], Counts] = rows,
    lengths: Sequence[int] | None = None,
    eval_fn: Callable[[torch.nn.Module], dict[str, float]] | None = None,
    resume: bool = False,
    desc: str = "train",
    run_config: dict | None = None,
) -> TrainResult:
    """Train ``model`` for ``cfg.steps`` optimiser steps and return the last metrics.

    ``collate(indices)`` builds a micro-batch (a dict of tensors) from example indices;
    ``loss_fn(model, batch)`` returns the micro-batch's loss terms as sums ({term: Σ ℓ}) and its
    metrics (means over the micro-batch; a ``tokens`` entry feeds the throughput figure), and
    ``count(batch)`` the units each term's mean runs over ({term: n}; rows by default), from the
    batch alone: the step's loss is Σ_term (Σ sums) / (Σ counts) over every micro-batch and rank
    (tether.loop.accumulate). ``eval_fn(model)`` returns evaluation metrics; under torchrun every
    rank calls it. Checkpoints go to ``out_dir/checkpoints``; with ``resume`` the latest one there is
    loaded first. Under torchrun ``model`` holds the trained weights on every rank at the end.

    ``lengths``: each example's width in its micro-batch (tokens; a pair: its longer side), for a loss that is
    a sum over examples (not KTO's, whose reference point is a micro-batch mean); given, each micro-batch is
    cut into forward passes of like-length examples (tether.loop.accumulate.length_passes, ``cfg.pass_cost``).

    ``run_config`` is the stage's whole config as a dict (``tether.config.to_dict``), stored in every
    checkpoint (tether.loop.run.Run). The run stops with :class:`TrainingDiverged` when a loss or
    gradient is not finite, the loss blows up (:class:`LossGuard`), an evaluation loss is not finite,
    or the final weights are not; checkpoints are only written once their weights have worked.
    """
    cfg.validate()
    out_dir.mkdir(parents=True, exist_ok=True)
    env, device = distributed.setup(cfg.device)
    distributed.check_batch(cfg.batch_size, cfg.grad_accum, env.world_size)
    net = distributed.Trainable(model, cfg.strategy, device)
    net.module.train()
    eval_model = net.module if net.sharded else net.plain  # FSDP2: every rank runs the sharded forward
    forward = compiled(net.module, cfg)
    run = Run(net.module, cfg, out_dir, resume=resume, run_config=run_config, desc=desc)
    guard = LossGuard(cfg.divergence_factor, run.state.get("loss_guard"))
    order = DataOrder(n_examples, cfg.batch_size, cfg.seed)
    t0 = time.perf_counter()
    try:
        for step in range(run.start, cfg.steps):
            tick = time.perf_counter()
            micro = [order.indices(step * cfg.grad_accum + m) for m in range(cfg.grad_accum)]
            pieces = distributed.step_pieces(micro, env.rank, env.world_size)
            if lengths is not None:  # each micro-batch in passes of like-length rows: less padding, the same update
                pieces = [[idx[i] for i in p] for idx in pieces
                          for p in length_passes([lengths[i] for i in idx], cfg.pass_cost)]
            batches = [{k: v.to(device) for k, v in collate(idx).items()} for idx in pieces]
            filler = None if batches else {k: v.to(device) for k, v in collate(micro[0][:1]).items()}  # weight 0
            out = accumulate(net.module, batches, count, lambda b: loss_fn(forward, b), filler=filler,
                             context=lambda: autocast(device, cfg.precision))
            if out.nonfinite is not None:
                raise run.diverged(out.nonfinite, step + 1)
            if (blown := guard.update(out.loss)) is not None:
                raise run.diverged(blown, step + 1)
            try:
                grad_norm = run.optimizer_step()  # first confirms the checkpoint these weights just earned
            except TrainingDiverged as err:
                raise run.diverged(str(err), step + 1) from None
            run.scheduler.step()
            seconds = time.perf_counter() - tick
            metrics = {f"train/{k}": v for k, v in out.metrics.items() if k != "tokens"}
            metrics.update({"train/lr": run.lr, "train/grad_norm": grad_norm})
            if "tokens" in out.metrics:
                metrics["perf/tokens_per_s"] = out.metrics["tokens"] / seconds
            done = step + 1
            evaluated = {}
            if eval_fn is not None and run.eval_due(done):
                net.module.eval()
                with torch.no_grad(), autocast(device, cfg.precision):
                    evaluated = eval_fn(eval_model)
                net.module.train()
                nonfinite = [k for k, v in evaluated.items() if k.endswith("loss") and not math.isfinite(v)]
                if nonfinite:
                    raise run.diverged(f"the evaluation {nonfinite[0]} is {evaluated[nonfinite[0]]} after the "
                                       "update", done)
            postfix = {"loss": f"{out.loss:.3f}"}
            if "perf/tokens_per_s" in metrics:
                postfix["tok/s"] = f"{metrics['perf/tokens_per_s']:.0f}"
            run.record(done, metrics, evaluated, loss_guard=guard.state(), **postfix)
    finally:
        run.close()
    net.finish()
    return TrainResult(cfg.steps, run.train_metrics, run.eval_metrics, time.perf_counter() - t0)
