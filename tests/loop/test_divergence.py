"""Divergence (issue 19, items 2 and 3): a run whose weights or loss blow up stops with TrainingDiverged,
names a checkpoint that is good, and never writes non-finite weights as a checkpoint or as the model."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tether.loop import TrainConfig, TrainingDiverged, latest_checkpoint, train
from tether.trainers.grpo import GRPOConfig, run_grpo
from tests.conftest import error_line, invoke
from tests.toy import X, collate, make_model, mse
from tests.toy import digits


def saved_weights(out: Path) -> list[Path]:
    """Every model file a run left to be used: the model itself and each checkpoint's (not one set aside)."""
    return sorted(out.glob("model.safetensors")) + sorted(out.glob("checkpoints/step-*/model.safetensors"))


def all_finite(path: Path) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in load_file(str(path)).values())


@pytest.fixture
def pairs_file(tmp_path, monkeypatch):
    from tests.toy import pref_rows as _pref_rows

    monkeypatch.setenv("TETHER_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in _pref_rows()[::3]))
    return path


# --- the rule ---------------------------------------------------------------------------------


def test_the_loss_guard_stops_a_blow_up_and_not_healthy_noise():
    from tether.loop import LossGuard

    rng = random.Random(0)
    # healthy shapes: a falling SFT loss, a DPO loss that reaches ~0 on its pairs with noisy batches, and a
    # loss that goes negative (robust DPO); none comes near ten starting sizes above its best
    falling = [5.7 * math.exp(-t / 30) + 0.3 + rng.uniform(-0.3, 0.3) for t in range(300)]
    to_zero = [0.69 * math.exp(-t / 5) + rng.uniform(0, 0.4) * (t % 7 == 0) for t in range(300)]
    negative = [-3 * (1 - math.exp(-t / 20)) + rng.uniform(-0.5, 0.5) for t in range(300)]
    for losses in (falling, to_zero, negative):
        guard = LossGuard(10.0)
        assert all(guard.update(x) is None for x in losses)
    guard = LossGuard(10.0)
    assert guard.update(5.7) is None
    # one step at 8e4 (SFT at lr 1e3): smoothed 0.9 * 5.7 + 0.1 * 8e4 ≈ 8005, far more than 10 x 5.7 above 5.7
    assert "blew up" in guard.update(8e4)
    off = LossGuard(0.0)  # 0: never
    assert all(off.update(x) is None for x in [5.7, 8e4, 1e9])


def test_a_loss_that_blows_up_without_nan_stops_and_names_the_last_good_checkpoint(tmp_path):
    def blows_up_at_step_5(model, batch):
        terms, m = mse(model, batch)
        blows_up_at_step_5.calls += 1
        return ({"rows": terms["rows"] * 1e6} if blows_up_at_step_5.calls >= 5 else terms), m

    blows_up_at_step_5.calls = 0
    cfg = TrainConfig(steps=8, batch_size=8, lr=1e-2, warmup_steps=2, eval_every=0, save_every=1, device="cpu")
    with pytest.raises(TrainingDiverged, match=r"blew up.*at step 5.*step-000003.*--resume --allow-resume-changes --lr"):
        train(make_model(), len(X), collate, blows_up_at_step_5, cfg, tmp_path)
    # step 4's weights produced the blown-up loss: that checkpoint was never written, step 3's is the last good
    assert latest_checkpoint(tmp_path / "checkpoints").name == "step-000003"
    assert not (tmp_path / "checkpoints" / "step-000004").exists()


def test_a_checkpoint_found_bad_after_it_was_written_is_set_aside_and_not_named(tmp_path):
    """GRPO confirms a checkpoint once its weights have sampled, before they score: when the scoring then fails,
    the checkpoint this run just wrote holds the failing weights and must not be resumed from."""
    from tether.loop import Checkpoints, build_optimizer

    model = make_model()
    c = TrainConfig(steps=8, keep_checkpoints=3, device="cpu")
    optimizer = build_optimizer(model, c)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    ckpts = Checkpoints(tmp_path, c, {"train": {}})
    for step in (2, 4):
        ckpts.due(step)
        ckpts.confirm(model, optimizer, scheduler)
    err = ckpts.diverged("the policy's log-probabilities are not finite", 5, failed=4)
    assert "step-000002; to go on from it" in str(err) and "diverged-step-000004" in str(err)
    assert latest_checkpoint(tmp_path).name == "step-000002" and (tmp_path / "diverged-step-000004").is_dir()


# --- non-finite weights -----------------------------------------------------------------------


@pytest.mark.parametrize("evaluate", [True, False], ids=["eval-loss", "final-weights"])
def test_an_update_to_infinite_weights_is_an_error_and_nothing_non_finite_is_saved(tmp_path, tiny_folder, sft_file,
                                                                                    evaluate):
    out = tmp_path / "run"
    r = invoke("sft", "--model", tiny_folder, "--data", sft_file, "--out", out, "--steps", 1, "--lr", 1e39,
               "--max-grad-norm", 0, "--batch-size", 8, "--eval-fraction", 0.1 if evaluate else 0)
    assert r.exit_code == 1, r.output
    line = error_line(r.output)
    assert "not finite" in line or "nan" in line
    assert "No good checkpoint is left" in line and "--lr 1e+38" in line
    assert not (out / "tether.json").exists()
    assert saved_weights(out) == []


def test_weights_blown_to_huge_finite_values_are_never_named_as_a_good_checkpoint(tmp_path, tiny_folder, sft_file):
    out = tmp_path / "run"
    r = invoke("sft", "--model", tiny_folder, "--data", sft_file, "--out", out, "--steps", 5, "--lr", 1e20,
               "--max-grad-norm", 0, "--warmup-steps", 0, "--batch-size", 8, "--save-every", 1, "--eval-fraction", 0)
    assert r.exit_code == 1, r.output
    assert "No good checkpoint is left" in error_line(r.output)
    for path in saved_weights(out):  # whatever is left holds weights that worked
        assert all(t.abs().max() < 1e3 for t in load_file(str(path)).values()), path


@pytest.mark.parametrize("lr", [1e39, 1e20])
def test_an_rl_update_to_non_finite_or_huge_weights_leaves_no_checkpoint_of_them(tmp_path, tiny_folder, lr):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"\n\nHuman: What is {a} plus {b}?\n\nAssistant:"}) + "\n"
                               for a in range(4) for b in range(4)))
    cfg = GRPOConfig(model=str(tiny_folder), prompts=str(prompts), out=str(tmp_path / "grpo"))
    cfg.group_size, cfg.prompts_per_step, cfg.sampling.max_new_tokens = 4, 4, 8
    cfg.train.lr, cfg.train.max_grad_norm, cfg.train.steps, cfg.train.save_every = lr, 0.0, 3, 1
    # 1e39: the first update makes the weights infinite; 1e20: huge but finite, and the next update's gradient
    # is NaN, so the checkpoint written after the first (confirmed when its weights sampled) is set aside
    with pytest.raises(TrainingDiverged, match="at step [12]; stopped. No good checkpoint is left"):
        run_grpo(cfg, digits)
    assert saved_weights(tmp_path / "grpo") == []


# --- blow-ups that never become NaN, through the command line -----------------------------------


def test_sft_at_lr_1e3_is_stopped_with_a_way_on(tmp_path, tiny_folder, sft_file):
    out = tmp_path / "run"
    r = invoke("sft", "--model", tiny_folder, "--data", sft_file, "--out", out, "--steps", 30, "--lr", 1e3,
               "--batch-size", 8, "--save-every", 0)
    assert r.exit_code == 1, r.output
    line = error_line(r.output)
    assert "blew up" in line and "--divergence-factor" in line and "--lr 100" in line
    assert not (out / "tether.json").exists() and not (out / "model.safetensors").exists()
    # the rule is an option: off, the same run goes on to the end (and saves what it reached: finite garbage)
    off = invoke("sft", "--model", tiny_folder, "--data", sft_file, "--out", tmp_path / "off", "--steps", 3,
                 "--lr", 1e3, "--batch-size", 8, "--save-every", 0, "--divergence-factor", 0)
    assert off.exit_code == 0, off.output


def test_a_blown_up_dpo_is_stopped(tmp_path, tiny_folder, pairs_file):
    out = tmp_path / "dpo"
    # IPO at lr 1e2: the loss goes 25 -> 5e8 in one step, and is never NaN
    r = invoke("dpo", "--model", tiny_folder, "--data", pairs_file, "--out", out, "--loss", "ipo", "--lr", 1e2,
               "--steps", 10, "--batch-size", 8, "--eval-every", 0, "--save-every", 0, "--max-len", 64)
    assert r.exit_code == 1, r.output
    assert "blew up" in error_line(r.output)
    assert not (out / "tether.json").exists()


def test_a_healthy_run_is_not_stopped(tmp_path, tiny_folder, sft_file, pairs_file):
    r = invoke("sft", "--model", tiny_folder, "--data", sft_file, "--out", tmp_path / "sft", "--steps", 30,
               "--batch-size", 8, "--lr", 3e-3, "--eval-every", 10, "--save-every", 10, "--eval-fraction", 0.1)
    assert r.exit_code == 0, r.output
    r = invoke("dpo", "--model", tiny_folder, "--data", pairs_file, "--out", tmp_path / "dpo", "--steps", 20,
               "--batch-size", 8, "--lr", 1e-2, "--eval-every", 0, "--save-every", 5, "--max-len", 64)
    assert r.exit_code == 0, r.output
    for out in (tmp_path / "sft", tmp_path / "dpo"):
        assert all(all_finite(p) for p in saved_weights(out))
