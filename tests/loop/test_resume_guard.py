"""--resume (issue 19, items 3 and 4, and the checkpoint half of the bad-input list): a resumed run whose
options differ from its checkpoint's is refused unless the change is a documented safe one that
--allow-resume-changes accepts, and then the change takes effect; a damaged checkpoint is one clear error."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tether.errors import CheckpointError
from tether.loop import latest_checkpoint, train
from tests.conftest import error_line, invoke
from tests.toy import X, collate, loop_cfg as cfg, make_model, mse


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture
def sft_run(tmp_path, tiny_folder, sft_file):
    """A finished 4-step SFT run with checkpoints, and the arguments that made it."""
    out = tmp_path / "run"
    args = ["sft", "--model", tiny_folder, "--data", sft_file, "--out", out, "--steps", 4, "--batch-size", 8,
            "--lr", 1e-3, "--schedule", "constant", "--warmup-steps", 0, "--save-every", 2, "--eval-fraction", 0]
    r = invoke(*args)
    assert r.exit_code == 0, r.output
    return out, args


def test_resume_with_another_seed_data_and_batch_size_is_refused_listing_each(sft_run, tmp_path):
    out, args = sft_run
    other = tmp_path / "other.jsonl"
    other.write_text(Path(args[4]).read_text())
    changed = [str(other) if a == args[4] else a for a in args]
    before = snapshot(out)
    for allow in ([], ["--allow-resume-changes"]):  # unsafe changes are refused even with the option
        r = invoke(*changed, "--resume", "--seed", 1, "--batch-size", 4, "--steps", 6, *allow)
        assert r.exit_code == 1, r.output
        line = error_line(r.output)
        assert "--seed 0 → 1" in line and "--batch-size 8 → 4" in line and f'"{other}"' in line, line
        assert "step-000004" in line
        assert ("--steps" in line) != bool(allow)  # with the option the safe change (more steps) is not listed
        assert snapshot(out) == before  # nothing written, nothing truncated


def test_a_lower_lr_needs_the_option_and_then_takes_effect(sft_run):
    out, args = sft_run
    r = invoke(*args, "--resume", "--steps", 6, "--lr", 1e-4)
    assert r.exit_code == 1, r.output
    line = error_line(r.output)
    assert "--lr 0.001 → 0.0001" in line and "--steps 4 → 6" in line and "--allow-resume-changes" in line
    r = invoke(*args, "--resume", "--steps", 6, "--lr", 1e-4, "--allow-resume-changes")
    assert r.exit_code == 0, r.output
    lrs = {m["step"]: m["train/lr"] for m in metrics(out)}
    assert [lrs[s] for s in range(1, 7)] == pytest.approx([1e-3] * 4 + [1e-4] * 2)
    assert json.loads((out / "tether.json").read_text())["config"]["train"]["lr"] == 1e-4
    # a higher lr is not a safe change
    r = invoke(*args, "--resume", "--steps", 8, "--lr", 1e-2, "--allow-resume-changes")
    assert r.exit_code == 1 and "--lr 0.0001 → 0.01" in error_line(r.output)


def test_resuming_a_finished_run_records_the_same_final_metrics(sft_run):
    out, args = sft_run

    def final():
        metrics = json.loads((out / "tether.json").read_text())["metrics"]
        return {k: v for k, v in metrics.items() if not k.startswith(("time/", "perf/"))}

    before = final()
    assert "train/loss" in before
    r = invoke(*args, "--resume")  # the last checkpoint is the final one: no step is trained
    assert r.exit_code == 0, r.output
    assert final() == before


def test_a_checkpoint_from_before_configs_were_stored_resumes_as_it_did(sft_run):
    out, args = sft_run
    state = out / "checkpoints" / "step-000004" / "state.json"
    meta = json.loads(state.read_text())
    del meta["config"], meta["loss_guard"]
    state.write_text(json.dumps(meta))
    r = invoke(*args, "--resume", "--steps", 5, "--seed", 3)
    assert r.exit_code == 0, r.output
    assert [m["step"] for m in metrics(out)] == [1, 2, 3, 4, 5]


# --- damaged checkpoints --------------------------------------------------------------------------


def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


DAMAGE = {
    "truncated-model": ("model.safetensors", lambda s: _truncate(s / "model.safetensors")),
    "truncated-optimizer": ("optimizer.safetensors", lambda s: _truncate(s / "optimizer.safetensors", 0.9)),
    "header-only-optimizer": ("optimizer.safetensors", lambda s: _truncate(s / "optimizer.safetensors", 0.01)),
    "garbage-state": ("state.json", lambda s: (s / "state.json").write_bytes(b"\x00\xff garbage {")),
    "empty-state": ("state.json", lambda s: (s / "state.json").write_text("")),
    "state-without-step": ("state.json", lambda s: (s / "state.json").write_text('{"scheduler": {}}')),
    "missing-model": ("model.safetensors", lambda s: (s / "model.safetensors").unlink()),
    "missing-state": ("state.json", lambda s: (s / "state.json").unlink()),
    "missing-rng": ("rng.safetensors", lambda s: (s / "rng.safetensors").unlink()),
}


@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_a_damaged_checkpoint_is_a_checkpoint_error_naming_the_file_and_the_way_on(tmp_path, case):
    name, damage = DAMAGE[case]
    train(make_model(), len(X), collate, mse, cfg(steps=4, save_every=2, keep_checkpoints=2), tmp_path)
    step = latest_checkpoint(tmp_path / "checkpoints")
    damage(step)
    with pytest.raises(CheckpointError) as err:
        train(make_model(), len(X), collate, mse, cfg(steps=6, save_every=2, keep_checkpoints=2,
                                                      allow_resume_changes=True), tmp_path, resume=True)
    message = str(err.value)
    assert str(step / name) in message and "delete the folder" in message and "\n" not in message
    shutil.rmtree(step)  # the remedy it names works: resume from the one before
    train(make_model(), len(X), collate, mse, cfg(steps=6, save_every=2, keep_checkpoints=2,
                                                  allow_resume_changes=True), tmp_path, resume=True)
    assert latest_checkpoint(tmp_path / "checkpoints").name == "step-000006"


def test_something_else_among_the_checkpoints_is_named_not_skipped(tmp_path):
    train(make_model(), len(X), collate, mse, cfg(steps=2, save_every=2), tmp_path)
    (tmp_path / "checkpoints" / "step-latest").write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match="step-latest: not a checkpoint tether wrote"):
        latest_checkpoint(tmp_path / "checkpoints")


def test_a_damaged_checkpoint_through_the_command_line_is_one_line(sft_run):
    out, args = sft_run
    _truncate(out / "checkpoints" / "step-000004" / "model.safetensors")
    r = invoke(*args, "--resume")
    assert r.exit_code == 1
    line = error_line(r.output)
    assert "step-000004/model.safetensors" in line and "truncated or corrupt" in line
