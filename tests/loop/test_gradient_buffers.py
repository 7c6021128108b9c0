"""Gradients kept allocated between optimiser steps (tether.loop.pieces.GradientBuffers) give the same update as
freeing them: a parameter that receives no gradient in a step is skipped by AdamW, not stepped with a zero."""

from __future__ import annotations

import copy

import torch

from tether.loop import TrainConfig, build_optimizer
from tether.loop.pieces import GradientBuffers


class TwoHeads(torch.nn.Module):
    """A body and two heads; a step uses one head or both, so the other receives no gradient."""

    def __init__(self):
        super().__init__()
        self.body, self.a, self.b = torch.nn.Linear(6, 8), torch.nn.Linear(8, 1), torch.nn.Linear(8, 1)

    def forward(self, x, heads):
        h = torch.tanh(self.body(x))
        return sum(getattr(self, k)(h).square().mean() for k in heads)


def _train(model, buffers: bool, plan):
    opt = build_optimizer(model, TrainConfig(lr=0.05, weight_decay=0.1))
    grads = GradientBuffers(opt, enabled=buffers)
    g = torch.Generator().manual_seed(0)
    storage = []
    for heads in plan:
        for _ in range(2):  # two micro-batches a step
            model(torch.randn(4, 6, generator=g), heads).backward()
        grads.ready()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        grads.clear()
        storage.append(model.body.weight.grad.data_ptr() if model.body.weight.grad is not None else None)
    return model, opt, storage


def test_kept_gradients_give_set_to_none_updates_and_are_not_reallocated():
    torch.manual_seed(0)
    start = TwoHeads()
    plan = [("a", "b"), ("a",), ("a",), ("b",), ("a", "b")]  # b idle at steps 2-3, a at step 4
    kept, kept_opt, storage = _train(copy.deepcopy(start), True, plan)
    freed, freed_opt, freed_storage = _train(copy.deepcopy(start), False, plan)
    for (name, p), q in zip(kept.named_parameters(), freed.parameters()):
        assert torch.equal(p, q), name
    for p, q in zip(kept.parameters(), freed.parameters()):
        s, t = kept_opt.state[p], freed_opt.state[q]
        assert torch.equal(s["step"], t["step"]) and torch.equal(s["exp_avg"], t["exp_avg"])
    assert kept_opt.state[kept.b.weight]["step"].item() == 3  # b was stepped only when it had a gradient
    assert len(set(storage)) == 1 and None not in storage  # one gradient buffer for the body throughout
    assert freed_storage == [None] * len(plan)  # freed after every step
    assert kept.b.weight.grad is not None and torch.count_nonzero(kept.b.weight.grad) == 0  # zeroed, kept


def test_a_head_unused_since_the_last_step_is_skipped_not_decayed():
    """Without the hook the idle head's zero gradient would be stepped: weight decay and momentum move it."""
    torch.manual_seed(1)
    model = TwoHeads()
    opt = build_optimizer(model, TrainConfig(lr=0.05, weight_decay=0.1))
    grads = GradientBuffers(opt, enabled=True)
    model(torch.randn(4, 6), ("a", "b")).backward()
    grads.ready(), opt.step(), grads.clear()
    before = model.b.weight.detach().clone()
    model(torch.randn(4, 6), ("a",)).backward()
    grads.ready()
    assert model.b.weight.grad is None and model.a.weight.grad is not None
    opt.step(), grads.clear()
    assert torch.equal(model.b.weight, before)


def test_a_run_keeping_its_gradients_equals_one_freeing_them(tmp_path):
    """The supervised loop with --keep-gradients: the same weights bitwise, micro-batches accumulated (2 a step)."""
    from tether.loop import train
    from tests.toy import X, collate, make_model, mse
    from tests.toy import loop_cfg as cfg

    freed = make_model()  # seeds the RNG: the same weights and dropout masks for both runs
    train(freed, len(X), collate, mse, cfg(batch_size=4, grad_accum=2, save_every=0), tmp_path / "a")
    kept = make_model()
    train(kept, len(X), collate, mse, cfg(batch_size=4, grad_accum=2, save_every=0, keep_gradients=True),
          tmp_path / "b")
    assert all(p.grad is not None for p in kept.parameters()) and all(p.grad is None for p in freed.parameters())
    for p, q in zip(freed.parameters(), kept.parameters()):
        assert torch.equal(p, q)
