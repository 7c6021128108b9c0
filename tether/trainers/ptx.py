"""PPO-ptx (InstructGPT, eq. 2): the pretraining micro-batches PPO's update mixes in, γ · log π(x) on them.

The stream is resumable: its position travels in every checkpoint (tether.trainers.ppo.PPO.state).
"""

from __future__ import annotations

from tether import distributed
from tether.data import chat_tokenizer, load_sft
from tether.data.collate import encode_sft, nothing_left, pad
from tether.loop import DataOrder, length_passes


def ptx_rows(cfg, tokenizer) -> list:
    """PPO-ptx examples, tokenised (and validated) before anything is written; [] when ptx is off."""
    if not cfg.ptx_coef:
        return []
    records = load_sft(cfg.ptx_data, tokenizer=chat_tokenizer(tokenizer, cfg))
    rows, count = encode_sft(records, tokenizer, cfg.max_len)
    if not rows:
        raise nothing_left(cfg.ptx_data, "PPO-ptx examples", len(records), count, cfg.max_len, "truncate")
    return rows


class PtxStream:
    """A resumable stream of padded PPO-ptx micro-batches of ``batch_size`` rows, the same at every world size.

    ``position`` counts the micro-batches taken so far by all ranks together (the same on every rank) and is
    saved in each checkpoint: an update that stops early on ``target_kl`` takes fewer than an iteration's full
    share, so the position is not a function of the iteration."""

    def __init__(self, rows: list, pad_id: int, micro: int, seed: int, position: int = 0, pass_cost: int = 0):
        self.rows, self.pad_id, self.position, self.pass_cost = rows, pad_id, position, pass_cost
        self.order = DataOrder(len(rows), micro, seed)

    def take(self, k: int) -> list[dict]:
        """The next ``k`` micro-batches of the stream, of which this rank trains numbers rank, rank + W, ...,
        each as forward passes of like-length rows (tether.loop.accumulate.length_passes, ``pass_cost``)."""
        e = distributed.env()
        mine = [self.order.indices(p) for p in range(self.position + e.rank, self.position + k, e.world_size)]
        self.position += k
        passes = [[idx[i] for i in p] for idx in mine
                  for p in length_passes([len(self.rows[i].input_ids) for i in idx], self.pass_cost)]
        return [pad([self.rows[i] for i in idx], self.pad_id) for idx in passes]


def ptx_stream(cfg, rows: list, pad_id: int, start_iteration: int,
               position: int | None = None) -> PtxStream | None:
    """The resumable PPO-ptx stream (None when ptx is off), at ``position`` (a checkpoint's) if given, else at
    the start of iteration ``start_iteration`` as an update that never stops early would have left it
    (``grad_accum`` micro-batches a mini-batch, as in tether.trainers.ppo.ppo_update)."""
    if not rows:
        return None
    per_iteration = cfg.epochs * (cfg.rollout_batch // cfg.step_rows()) * cfg.train.grad_accum
    return PtxStream(rows, pad_id, cfg.train.batch_size, cfg.train.seed + 1,
                     start_iteration * per_iteration if position is None else position, cfg.train.pass_cost)
