"""Past one machine: torchrun, DDP or FSDP2, with world size 1 as the same code path.

    torchrun --nproc_per_node N [--nnodes M --rdzv-endpoint HOST:PORT] -m tether <stage> ...

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; :func:`setup` reads them, joins the process group
(nccl on CUDA, gloo on the CPU, chosen from the device) and pins each process to its GPU. Without
torchrun (or with one process) the world has size 1, no process group is created, and every helper
below is the identity, so a single-process run goes through the same lines as a distributed one.

Strategies (``TrainConfig.strategy``):

- ``ddp`` (default): every rank holds the whole model; DistributedDataParallel averages gradients.
  Checkpoints and the final model are written by rank 0 alone, in the single-process format.
- ``fsdp2``: ``torch.distributed.fsdp.fully_shard`` on every decoder block, then on the root, so
  parameters, gradients and optimiser state are split across ranks (LoRA too). The unsharded model
  the stage handed in stays where it is (the CPU for a supervised stage, the device for an RL one,
  which samples with it) and receives the trained weights after every RL update and at the end
  (:class:`Trainable`); checkpoints go through ``torch.distributed.checkpoint`` (every rank writes its
  shard), which can be read back at any world size and under either strategy.

Data: :func:`step_pieces` says which examples of a global step this rank trains on; the global
batch (``batch_size × grad_accum``) is the config's at every world size, and tether.loop.accumulate
divides each piece's summed loss by the step's global count, so that the averaged gradient equals
the single-process one.
Helpers to reduce metrics, gather evaluation results and shard lists across ranks follow.
"""

from __future__ import annotations

import atexit
import contextlib
import copy
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

STRATEGIES = ("ddp", "fsdp2")


@dataclass(frozen=True)
class Env:
    """This process's place in the world. ``world_size == 1``: no process group, helpers are identities."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1


def _from_environment() -> Env:
    return Env(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0)))


def setup(device: str = "auto") -> tuple[Env, torch.device]:
    """Join the torchrun world (once) and return it with this rank's device.

    ``device``: auto | cpu | cuda | cuda:N. Under torchrun, ``auto`` and ``cuda`` mean this
    process's GPU, ``cuda:LOCAL_RANK``. The backend follows the device: nccl for CUDA, gloo for the CPU.

    More ranks on a machine than GPUs: nccl refuses two ranks on one GPU (NCCL ≥ 2.5: "Duplicate GPU
    detected"), so that is an error naming the fix, unless ``TETHER_DIST_BACKEND=gloo`` is set: then rank r
    shares ``cuda:(LOCAL_RANK mod GPUs)`` and gloo carries DDP's all-reduce and broadcast of CUDA tensors
    (slower than nccl; for checks such as bench/gpu_check.py on one GPU; FSDP2 over gloo on GPUs is untested).
    """
    env = _from_environment()
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    backend = os.environ.get("TETHER_DIST_BACKEND") or ("nccl" if dev.type == "cuda" else "gloo")
    if backend not in ("nccl", "gloo") or (backend == "nccl" and dev.type != "cuda"):
        raise ValueError(f"TETHER_DIST_BACKEND={backend} with device {dev}: use gloo (any device) or nccl (CUDA)")
    if dev.type == "cuda" and env.active and dev.index is None:
        gpus = torch.cuda.device_count()
        if backend == "nccl" and 0 < gpus <= env.local_rank:
            raise RuntimeError(f"local rank {env.local_rank} has no GPU of its own ({gpus} visible) and nccl cannot put "
                               f"two ranks on one GPU: run --nproc_per_node {gpus}, or set TETHER_DIST_BACKEND=gloo "
                               "to share the GPUs (slower: for checks)")
        dev = torch.device("cuda", env.local_rank % gpus if gpus else env.local_rank)
    if dev.type == "cuda" and dev.index is not None:
        torch.cuda.set_device(dev)
    if env.active and not dist.is_initialized():
        dist.init_process_group(backend, device_id=dev if backend == "nccl" else None)
        atexit.register(_teardown)
    if env.active and dist.get_world_size() != env.world_size:
        raise RuntimeError(f"WORLD_SIZE is {env.world_size} but the process group has {dist.get_world_size()} ranks")
    return env, dev


def _teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def env() -> Env:
    """This process's place in the world, from torchrun's variables; joins nothing (a stage joins with its
    ``--device`` through :func:`setup`, so that a config check before it cannot pick the wrong backend)."""
    return _from_environment()


def _world() -> Env:
    """The world for a collective: joined first (the default device's backend) if no stage has joined it."""
    e = _from_environment()
    if e.active and not dist.is_initialized():
        setup("auto")
    return e


def barrier() -> None:
    if _world().active:
        dist.barrier()


# --- reductions -------------------------------------------------------------------------------


def _device() -> torch.device:
    """Where collectives run: the current GPU under nccl, the CPU under gloo."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce(x: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """Sum (or max, min) of ``x`` over ranks, returned on ``x``'s device; ``x`` itself is left alone."""
    if not _world().active:
        return x
    y = x.detach().to(_device(), copy=True)
    dist.all_reduce(y, {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}[op])
    return y.to(x.device)


def reduce_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """Sum each metric over ranks; a key missing on some rank counts 0 there.

    Callers pass per-rank shares (a mean's terms already divided by the global count), so the sum is
    the global value.
    """
    if not _world().active:
        return dict(metrics)
    keys: list[list[str]] = [None] * _world().world_size  # type: ignore[list-item]
    dist.all_gather_object(keys, sorted(metrics))
    union = sorted(set().union(*keys))
    values = torch.tensor([float(metrics.get(k, 0.0)) for k in union], dtype=torch.float64)
    return dict(zip(union, all_reduce(values).tolist()))


def gather(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` (equal shapes on every rank) along dim 0 in rank order."""
    if not _world().active:
        return x
    parts = [torch.empty_like(x, device=_device()) for _ in range(_world().world_size)]
    dist.all_gather(parts, x.detach().to(_device()).contiguous())
    return torch.cat(parts).to(x.device)


def gather_objects(items: list) -> list:
    """Concatenate picklable lists from every rank in rank order."""
    if not _world().active:
        return list(items)
    out: list[list] = [None] * _world().world_size  # type: ignore[list-item]
    dist.all_gather_object(out, list(items))
    return [x for part in out for x in part]


# --- sharding ---------------------------------------------------------------------------------


def shard_bounds(n: int, rank: int | None = None, world: int | None = None) -> tuple[int, int]:
    """This rank's contiguous block [start, stop) of n items, blocks of ceil(n / world) (the last ones may be short)."""
    e = _world()
    rank, world = e.rank if rank is None else rank, e.world_size if world is None else world
    per = -(-n // world)
    return min(rank * per, n), min((rank + 1) * per, n)


def map_rows(fn: Callable[[list], torch.Tensor], rows: Sequence) -> torch.Tensor:
    """``fn(rows)`` computed by splitting ``rows`` across ranks and gathering the results, in order.

    Every rank gets a block of the same length (the last blocks padded with copies of the last
    row, dropped afterwards), so ranks make the same number of forward passes, which FSDP2's
    collectives need. Shape: fn(list of k rows) -> (k, ...); result (len(rows), ...) on every rank.
    """
    e = _world()
    if not e.active or not rows:
        return fn(list(rows))
    per = -(-len(rows) // e.world_size)
    mine = [rows[min(i, len(rows) - 1)] for i in range(e.rank * per, (e.rank + 1) * per)]
    return gather(fn(mine))[: len(rows)]


# --- which examples a rank trains on ----------------------------------------------------------


def check_batch(batch_size: int, grad_accum: int, world: int) -> None:
    """A global step of ``grad_accum`` micro-batches of ``batch_size`` must give every rank some rows."""
    if world > 1 and grad_accum % world and batch_size < world:
        raise ValueError(f"a micro-batch of {batch_size} cannot be split over {world} ranks: use --batch-size of at "
                         f"least {world}, or --grad-accum a multiple of {world}")


def step_pieces(micro_batches: list[list[int]], rank: int, world: int) -> list[list[int]]:
    """The pieces of one global step that ``rank`` trains on (none of them empty; a rank may get none).

    With ``grad_accum`` a multiple of the world size each rank takes whole micro-batches (rank r:
    numbers r, r + world, ...), so a loss that is a statistic of its micro-batch (KTO's reference
    point) sees exactly the rows it sees in one process. Otherwise every micro-batch is cut into
    ``world`` contiguous blocks, one a rank.
    """
    if world == 1:
        return micro_batches
    if len(micro_batches) % world == 0:
        return micro_batches[rank::world]
    pieces = [mb[slice(*shard_bounds(len(mb), rank, world))] for mb in micro_batches]
    return [p for p in pieces if p]


# --- models -----------------------------------------------------------------------------------


def decoder_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated transformer blocks: modules whose class a Hugging Face model names in
    ``_no_split_modules`` (e.g. LlamaDecoderLayer)."""
    names: set[str] = set()
    for m in model.modules():
        names.update(getattr(m, "_no_split_modules", None) or [])
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if not blocks:
        raise ValueError(f"fsdp2: found no decoder blocks in {type(model).__name__} (no _no_split_modules); "
                         "use --strategy ddp")
    return blocks


def _is_fsdp(module: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def accumulating(module: torch.nn.Module, last: bool):
    """Context for one micro-batch's backward: gradients are synchronised across ranks only on the last."""
    if not env().active:
        return contextlib.nullcontext()
    if _is_fsdp(module):
        module.set_requires_gradient_sync(last)
        return contextlib.nullcontext()
    if isinstance(module, torch.nn.parallel.DistributedDataParallel) and not last:
        return module.no_sync()
    return contextlib.nullcontext()


def clip_grad_norm(module: torch.nn.Module, max_norm: float) -> torch.Tensor:
    """Clip the global gradient norm (0: no clipping; across shards under FSDP2); returns it as a plain tensor."""
    params = [p for p in module.parameters() if p.requires_grad]
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


class Trainable:
    """The module a rank trains, beside the plain model the stage handed in.

    ``module``: what the loss runs on (the model itself in one process; a DDP wrapper around it;
    or, under FSDP2, a sharded copy). ``plain``: the unwrapped model, for sampling, scoring without
    gradient, evaluation and saving. Under DDP it shares its parameters with ``module``; under FSDP2
    it is a whole copy that :meth:`sync` refreshes from the shards (the RL stages sample with it after
    every update: gather for generation) and :meth:`finish` refreshes at the end.

    FSDP2 shards every decoder block, then every child of the root that holds blocks when the root is
    not itself a Hugging Face model (PPO's ActorCritic: the policy and the critic, each then callable
    on its own, as PPO-ptx calls the policy), then the root. With LoRA (peft) the frozen base weights
    are sharded beside the adapters and only the adapters have gradients and optimiser state.
    """

    def __init__(self, model: torch.nn.Module, strategy: str, device: torch.device):
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
        self.plain, self.strategy, self.device = model, strategy, device
        e = _world()
        if not e.active:
            self.module = model.to(device)
        elif strategy == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            model.to(device)
            self.module = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        else:
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            mesh = init_device_mesh(device.type, (e.world_size,))
            sharded = copy.deepcopy(model).to(device)  # the plain model stays where it is
            blocks = decoder_blocks(sharded)
            for block in blocks:
                fully_shard(block, mesh=mesh)
            for child in _units_between(sharded, blocks):
                fully_shard(child, mesh=mesh)
            fully_shard(sharded, mesh=mesh)
            self.module = sharded

    @property
    def sharded(self) -> bool:
        return _is_fsdp(self.module)

    def accumulating(self, last: bool):
        return accumulating(self.module, last)

    def clip_grad_norm(self, max_norm: float) -> torch.Tensor:
        return clip_grad_norm(self.module, max_norm)

    @torch.no_grad()
    def sync(self) -> None:
        """Under FSDP2, copy the trained parameters into the plain model (a collective: every rank calls it).

        One parameter is gathered at a time, so the cost beyond the plain copy itself is the largest
        parameter; frozen ones (LoRA's base weights) and buffers never change and are not gathered.
        Elsewhere the plain model already holds the trained weights.
        """
        if not self.sharded:
            return
        plain = dict(self.plain.named_parameters())
        for name, p in self.module.named_parameters():
            if p.requires_grad:
                plain[name].copy_(p.full_tensor() if hasattr(p, "full_tensor") else p)

    def finish(self) -> torch.nn.Module:
        """The plain model, holding the trained weights (gathered under FSDP2), on the device."""
        self.sync()
        return self.plain.to(self.device)


def _units_between(root: torch.nn.Module, blocks: list[torch.nn.Module]) -> list[torch.nn.Module]:
    """The root's children that hold decoder blocks, when the root is not itself a Hugging Face model."""
    from transformers import PreTrainedModel

    if isinstance(root, PreTrainedModel):
        return []
    ids = {id(b) for b in blocks}
    return [c for c in root.children() if any(id(m) in ids for m in c.modules())]
