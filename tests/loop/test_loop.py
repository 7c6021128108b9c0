"""The shared training loop: schedule, data order, exact resume, divergence, accumulation."""

from __future__ import annotations

import json
import math

import pytest
import torch

from tether.loop import DataOrder, TrainConfig, TrainingDiverged, latest_checkpoint, lr_factor, train

from tests.toy import X, collate, make_model, mse
from tests.toy import loop_cfg as cfg


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    c = TrainConfig(steps=110, warmup_steps=10, lr=1.0, min_lr_ratio=0.1, schedule="cosine")
    assert lr_factor(0, c) == pytest.approx(0.1)  # (0 + 1) / 10
    assert lr_factor(9, c) == pytest.approx(1.0)
    assert lr_factor(60, c) == pytest.approx(0.1 + 0.9 * 0.5)  # half-way through the cosine
    assert lr_factor(110, c) == pytest.approx(0.1)
    lin = TrainConfig(steps=110, warmup_steps=10, min_lr_ratio=0.0, schedule="linear")
    assert lr_factor(60, lin) == pytest.approx(0.5)


def test_data_order_is_a_fresh_permutation_each_epoch_and_deterministic():
    order = DataOrder(10, 4, seed=3)
    seen = [i for m in range(5) for i in order.indices(m)]  # 20 positions = 2 epochs
    assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:]) == list(range(10))
    assert seen[:10] != seen[10:]
    assert DataOrder(10, 4, seed=3).indices(3) == order.indices(3)


def test_interrupted_then_resumed_run_equals_uninterrupted_bitwise(tmp_path):
    whole = make_model()
    train(whole, len(X), collate, mse, cfg(), tmp_path / "a")

    calls = {"n": 0}

    def collate_then_die(idx):
        calls["n"] += 1
        if calls["n"] == 5:  # the 5th micro-batch: after the step-3 checkpoint, mid step 5
            raise KeyboardInterrupt
        return collate(idx)

    with pytest.raises(KeyboardInterrupt):
        train(make_model(), len(X), collate_then_die, mse, cfg(), tmp_path / "b")
    assert latest_checkpoint(tmp_path / "b" / "checkpoints").name == "step-000003"
    torch.manual_seed(1234)  # the resumed process starts from a different RNG state: the checkpoint restores it
    resumed = make_model()
    train(resumed, len(X), collate, mse, cfg(), tmp_path / "b", resume=True)
    for p, q in zip(whole.parameters(), resumed.parameters()):
        assert torch.equal(p, q)
    steps = [json.loads(l)["step"] for l in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 9))  # no step logged twice
    assert list((tmp_path / "b" / "tb").iterdir())


def test_nan_loss_stops_with_message_and_keeps_last_good_checkpoint(tmp_path):
    def nan_at_step_5(model, batch):
        terms, m = mse(model, batch)
        nan_at_step_5.calls += 1
        return ({"rows": terms["rows"] * math.nan} if nan_at_step_5.calls == 5 else terms), m

    nan_at_step_5.calls = 0
    with pytest.raises(TrainingDiverged, match=r"loss is nan at step 5.*step-000003"):
        train(make_model(), len(X), collate, nan_at_step_5, cfg(), tmp_path)
    assert latest_checkpoint(tmp_path / "checkpoints").name == "step-000003"


def test_gradient_accumulation_matches_a_large_batch(tmp_path):
    def no_dropout():
        m = make_model()
        m[1].p = 0.0
        return m

    big, acc = no_dropout(), no_dropout()
    train(big, len(X), collate, mse, cfg(batch_size=8, save_every=0), tmp_path / "a")
    train(acc, len(X), collate, mse, cfg(batch_size=4, grad_accum=2, save_every=0), tmp_path / "b")
    for p, q in zip(big.parameters(), acc.parameters()):
        assert torch.allclose(p, q, atol=1e-6)


def test_training_reduces_the_loss(tmp_path):
    model = make_model()
    before = mse(model, collate(list(range(64))))[0]["rows"].item()
    train(model, len(X), collate, mse, cfg(steps=60, lr=3e-2, save_every=0), tmp_path)
    model.eval()
    assert mse(model, collate(list(range(64))))[0]["rows"].item() < 0.2 * before


def test_every_step_logs_its_cpu_seconds_and_the_peak_memory(tmp_path):
    """perf/cpu_s is this step's CPU time; perf/peak_memory_gb the process's high-water mark, which never falls."""
    import resource

    train(make_model(), len(X), collate, mse, cfg(steps=4, save_every=0), tmp_path)
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2, 3, 4]
    assert all(0 <= x["perf/cpu_s"] < 60 for x in lines)
    peaks = [x["perf/peak_memory_gb"] for x in lines]
    assert peaks == sorted(peaks) and 0.05 < peaks[-1] <= resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9
