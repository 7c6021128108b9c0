"""The pieces of a training run every stage shares: its optimisation settings, device and precision,
optimiser and learning-rate schedule, data order and metrics log."""

from __future__ import annotations

import contextlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from tether import distributed
from tether.config import SEED_MAX, check, check_fields, opt
from tether.errors import ConfigError

SCHEDULES = ("cosine", "linear", "constant")
PRECISIONS = ("auto", "fp32", "bf16")


@dataclass
class TrainConfig:
    """Optimisation settings shared by every stage that trains by gradient descent."""

    steps: int = opt(200, "optimiser steps (RL stages: iterations of rollout + update)")
    batch_size: int = opt(16, "sequences per micro-batch")
    score_batch_size: int = opt(0, "rows per no-grad scoring pass (reference log-probs, evaluation, KL; 0: "
                                   "batch_size): its logits take rows x length x vocabulary x 4 bytes")
    gradient_checkpointing: bool = opt(False, "recompute each transformer block's activations in the backward pass "
                                              "instead of keeping them (less memory, about a third more compute)")
    grad_accum: int = opt(1, "micro-batches per optimiser step (effective batch = batch_size x grad_accum)")
    pass_cost: int = opt(256, "cut a micro-batch into forward passes of like-length rows when that spares more "
                              "padding than this many tokens a pass costs (the same update: tether.loop."
                              "length_passes); 0: one pass a micro-batch")
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
        check_fields(self, "warmup_steps eval_every save_every score_batch_size pass_cost", ge=0, integer=True)
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

    def score_rows(self) -> int:
        """Rows per no-grad scoring pass: ``score_batch_size``, else ``batch_size``."""
        return self.score_batch_size or self.batch_size


def peak_memory_gb(device: torch.device) -> float:
    """The process's peak memory so far, in GB: CUDA's allocator peak on a GPU, else the resident-set
    high-water mark (``ru_maxrss``: everything the process holds, model loading included)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # Linux reports KiB


def use_gradient_checkpointing(model: torch.nn.Module) -> None:
    """Turn on transformers' gradient checkpointing in every pretrained model inside ``model`` (a policy, a
    critic, a LoRA or DDP / FSDP2 wrapper): non-reentrant, so frozen inputs (LoRA) need no grad hook.

    transformers recomputes a block only when the block's own ``training`` flag is set. An RL policy
    runs in eval mode (no dropout: the ratio is 1 before its update), so each block's flag alone is
    set: the dropout its attention and MLP hold stays off, and the blocks are recomputed.
    """
    from transformers import PreTrainedModel

    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
    except ImportError:  # transformers before 4.52: checkpointing follows the model's mode alone
        GradientCheckpointingLayer = ()  # noqa: N806
    for m in model.modules():
        if isinstance(m, PreTrainedModel) and m.supports_gradient_checkpointing:
            kwargs = {"use_reentrant": False}
            if hasattr(m, "activation_checkpointing_enable"):  # transformers 5.x's name
                m.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            else:
                m.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        elif GradientCheckpointingLayer and isinstance(m, GradientCheckpointingLayer):
            m.training = True


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
    """``model`` with its transformer backbones behind ``torch.compile`` when ``cfg.compile``, else ``model`` itself.

    The result shares the parameters (optimiser, checkpoints and the saved model keep using
    ``model``); stages call it for the passes that train (and the no-grad passes that score
    a batch), not for sampling, whose KV-cache shapes change every token (the RL stages' sampler
    decodes from a static cache compiled by transformers instead: tether.rollout.sample). A micro-batch of a new
    sequence length costs one recompilation, after which the length is a dynamic dimension. Where it
    pays: the elementwise work between matmuls (norms, rotary, SiLU, softmax) is fused, so a
    small, overhead-bound model gains most (bench/compare_trl.py --compile).

    Only the backbones are compiled (:class:`CompiledBackbones`), not the output layer after them: the
    scoring passes stand that layer in for one that never materialises the logits (tether.scoring.
    labelled_logprobs), which a graph compiled whole would hide. A model without a transformers backbone is
    compiled whole.
    """
    if not cfg.compile:
        return model
    backbones = _backbones(model)
    return CompiledBackbones(model, backbones) if backbones else torch.compile(model)


def _backbones(model: torch.nn.Module) -> list[tuple[torch.nn.Module, str, torch.nn.Module]]:
    """(parent, attribute name, module) of every transformers base model inside ``model`` (a causal LM's decoder
    stack, a reward model's or a critic's backbone): the modules whose ``base_model`` is themselves."""
    from transformers import PreTrainedModel

    bases = {id(m) for m in model.modules() if isinstance(m, PreTrainedModel) and m.base_model is m}
    return [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
            if id(child) in bases]


class CompiledBackbones(torch.nn.Module):
    """``model``, with each backbone swapped for its ``torch.compile``d self for the length of a call.

    Attributes other than its own come from ``model`` (as a ``torch.compile``d module's do).
    """

    def __init__(self, model: torch.nn.Module, backbones: list[tuple[torch.nn.Module, str, torch.nn.Module]]):
        super().__init__()
        self.model = model
        self._swaps = [(parent, name, child, torch.compile(child)) for parent, name, child in backbones]  # unregistered

    def forward(self, *args, **kwargs):
        for parent, name, _, fast in self._swaps:
            parent._modules[name] = fast
        try:
            return self.model(*args, **kwargs)
        finally:
            for parent, name, child, _ in self._swaps:
                parent._modules[name] = child

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.model, name)


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
