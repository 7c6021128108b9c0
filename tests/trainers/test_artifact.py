"""Output folders (issue 19, items 1, 3 and 5): what --overwrite may replace, when anything is written,
an --out that is a file, the final write, the checkpoints kept, and `tether world export` into a used folder."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from tether.cli import main

from tests.conftest import CORPUS


def run(*args) -> tuple[int, str]:
    r = CliRunner().invoke(main, [str(a) for a in args])
    return r.exit_code, r.output


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` with its SHA-256."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def error_line(output: str) -> str:
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), output
    return lines[0]


def sft(tiny: Path, data: Path, out: Path, *extra) -> list:
    return ["sft", "--model", tiny, "--data", data, "--out", out, "--steps", 2, "--batch-size", 4, "--max-len", 64,
            "--eval-fraction", 0, "--save-every", 1, *extra]


@pytest.fixture
def old_run(tmp_path, tiny_folder, sft_file) -> Path:
    out = tmp_path / "run"
    code, output = run(*sft(tiny_folder, sft_file, out))
    assert code == 0, output
    return out


@pytest.fixture
def weightless_model(tmp_path, tiny_folder) -> Path:
    """A model folder whose tokenizer loads but whose weights are cut short: it fails only once the model loads."""
    bad = tmp_path / "bad-model"
    shutil.copytree(tiny_folder, bad)
    weights = bad / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])
    return bad


# --- --overwrite ------------------------------------------------------------------------------


def test_overwrite_never_touches_a_folder_tether_did_not_write(tmp_path, tiny_folder, sft_file):
    out = tmp_path / "X"
    out.mkdir()
    (out / "thesis.txt").write_text("precious\n")
    code, output = run(*sft(tiny_folder, sft_file, out, "--overwrite"))
    assert code == 1
    line = error_line(output)
    assert str(out) in line and "did not write" in line
    assert snapshot(out) == {"thesis.txt": hashlib.sha256(b"precious\n").hexdigest()}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["X", "sft.jsonl"]  # no staging folder beside it


def test_a_bad_model_with_overwrite_leaves_the_old_run_bitwise_intact(old_run, tiny_folder, sft_file, weightless_model):
    before = snapshot(old_run)
    code, _ = run(*sft(weightless_model, sft_file, old_run, "--overwrite"))
    assert code != 0
    assert snapshot(old_run) == before
    assert not old_run.with_name("run.tether-new").exists()  # nothing was written before the model loaded


def test_a_run_that_fails_midway_leaves_the_old_run_and_the_next_overwrite_replaces_it(old_run, tiny_folder, sft_file,
                                                                                    monkeypatch):
    import tether.trainers.sft as sft_stage

    before = snapshot(old_run)
    real = sft_stage.fit_causal_lm

    def killed(model, tokenizer, rows, eval_rows, cfg, out, **kw):
        real(model, tokenizer, rows, eval_rows, cfg, out, **kw)  # trains and checkpoints, then "dies"
        raise RuntimeError("killed")

    monkeypatch.setattr(sft_stage, "fit_causal_lm", killed)
    code, _ = run(*sft(tiny_folder, sft_file, old_run, "--overwrite", "--seed", 1))
    assert code != 0
    assert snapshot(old_run) == before  # the new run went to a sibling folder
    monkeypatch.setattr(sft_stage, "fit_causal_lm", real)
    code, output = run(*sft(tiny_folder, sft_file, old_run, "--overwrite", "--seed", 1))
    assert code == 0, output
    assert json.loads((old_run / "tether.json").read_text())["config"]["train"]["seed"] == 1
    assert sorted(p.name for p in old_run.parent.iterdir()) == ["run", "sft.jsonl"]  # the leftover is gone


def test_overwrite_replaces_a_run_tether_wrote_and_marks_the_new_one(old_run, tiny_folder, sft_file):
    assert (old_run / ".tether-run").is_file()  # the marker a later --overwrite recognises
    (old_run / ".tether-run").unlink()  # a run written before the marker: its tether.json is recognised too
    before = snapshot(old_run)
    code, output = run(*sft(tiny_folder, sft_file, old_run, "--overwrite", "--seed", 3, "--steps", 3))
    assert code == 0, output
    after = snapshot(old_run)
    assert after["model.safetensors"] != before["model.safetensors"]
    assert json.loads((old_run / "tether.json").read_text())["config"]["train"]["steps"] == 3
    assert (old_run / ".tether-run").is_file() and (old_run / "checkpoints" / "step-000003").is_dir()
    assert not (old_run / "checkpoints" / "step-000002").exists()  # nothing of the old run is left in it
    assert sorted(p.name for p in old_run.parent.iterdir()) == ["run", "sft.jsonl"]


def test_a_new_run_writes_in_place_and_resume_continues_there(tmp_path, tiny_folder, sft_file):
    out = tmp_path / "fresh"
    out.mkdir()  # an empty folder is as good as none
    code, output = run(*sft(tiny_folder, sft_file, out))
    assert code == 0, output
    assert (out / ".tether-run").is_file() and (out / "checkpoints" / "step-000002").is_dir()
    code, output = run(*sft(tiny_folder, sft_file, out, "--resume"))
    assert code == 0, output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fresh", "sft.jsonl"]


# --- --out that is a file, or lies under one ------------------------------------------------


@pytest.fixture
def stage_args(tmp_path, tiny_folder, sft_file):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": t.split("Assistant:")[0] + "Assistant:",
                                         "chosen": t.split("Assistant:")[1], "rejected": " no"}) + "\n"
                             for t in CORPUS[:16]))
    feedback = tmp_path / "feedback.jsonl"
    feedback.write_text("".join(json.dumps({"prompt": t.split("Assistant:")[0] + "Assistant:",
                                            "completion": t.split("Assistant:")[1], "label": i % 2 == 0}) + "\n"
                                for i, t in enumerate(CORPUS[:16])))
    return {"sft": ["sft", "--model", tiny_folder, "--data", sft_file],
            "dpo": ["dpo", "--model", tiny_folder, "--data", pairs],
            "rm": ["rm", "--model", tiny_folder, "--data", pairs],
            "kto": ["kto", "--model", tiny_folder, "--data", feedback]}


@pytest.mark.parametrize("stage", ["sft", "dpo", "rm", "kto"])
def test_out_that_is_a_file_is_refused_before_anything_is_written(tmp_path, stage_args, stage):
    file = tmp_path / "notes.txt"
    file.write_text("mine\n")
    code, output = run(*stage_args[stage], "--out", file, "--steps", 1)
    assert code == 1
    line = error_line(output)
    assert str(file) in line and "is a file" in line
    assert file.read_text() == "mine\n"

    code, output = run(*stage_args[stage], "--out", file / "run", "--steps", 1, "--overwrite")
    assert code == 1
    line = error_line(output)
    assert f"lies under {file}" in line
    assert file.read_text() == "mine\n"


# --- the final write ------------------------------------------------------------------------


def test_a_final_write_cut_short_leaves_no_tether_json_and_resume_completes_it(old_run, tiny_folder, sft_file,
                                                                             monkeypatch):
    import tether.trainers.artifact as artifact

    complete = snapshot(old_run)

    def cut(*args, **kwargs):
        raise RuntimeError("killed during the final write")

    monkeypatch.setattr(artifact, "save_yaml", cut)  # after the model files, before tether.json
    code, _ = run(*sft(tiny_folder, sft_file, old_run, "--resume"))
    assert code != 0
    assert not (old_run / "tether.json").exists()  # a folder without it is not a complete run
    assert (old_run / "checkpoints" / "step-000002").is_dir()
    assert (old_run / "model.safetensors").read_bytes()  # no half-written model in place
    monkeypatch.undo()
    code, output = run(*sft(tiny_folder, sft_file, old_run, "--resume"))
    assert code == 0, output
    redone = snapshot(old_run)
    assert redone["model.safetensors"] == complete["model.safetensors"]
    assert (old_run / "tether.json").is_file() and not (old_run / ".final.tmp").exists()


# --- checkpoints kept -----------------------------------------------------------------------


@pytest.mark.parametrize("keep", [-1, 0, 1])
def test_pruning_never_deletes_the_checkpoint_just_written(tmp_path, tiny_folder, keep):
    from tether.loop import latest_checkpoint, save_checkpoint
    from tether.models import load_model

    model = load_model(str(tiny_folder))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    folder = tmp_path / "checkpoints"
    for step in (1, 2, 3):
        written = save_checkpoint(folder, step, model, optimizer, scheduler, keep)
        assert written.is_dir() and latest_checkpoint(folder) == written


# --- tether world export --------------------------------------------------------------------

SMALL_WORLD = ["--pretrain-docs", 20, "--sft-train", 5, "--sft-eval", 5, "--pref-train", 5, "--pref-test", 5,
               "--feedback", 5]


def test_world_export_refuses_a_used_folder_and_overwrites_only_its_own_files(tmp_path):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "sft_train.jsonl").write_text("my own data\n")
    code, output = run("world", "export", "--out", foreign, *SMALL_WORLD, "--overwrite")
    assert code == 1 and str(foreign) in error_line(output)
    assert snapshot(foreign) == {"sft_train.jsonl": hashlib.sha256(b"my own data\n").hexdigest()}

    world = tmp_path / "world"
    code, output = run("world", "export", "--out", world, *SMALL_WORLD)
    assert code == 0, output
    (world / "notes.txt").write_text("mine\n")
    before = snapshot(world)
    code, output = run("world", "export", "--out", world, *SMALL_WORLD, "--seed", 5)
    assert code == 1 and "--overwrite" in error_line(output)
    assert snapshot(world) == before

    code, output = run("world", "export", "--out", world, *SMALL_WORLD, "--seed", 5, "--overwrite")
    assert code == 0, output
    assert json.loads((world / "world.json").read_text())["config"]["seed"] == 5
    assert (world / "notes.txt").read_text() == "mine\n"  # never a file it did not write

    under = tmp_path / "file.txt"
    under.write_text("x\n")
    code, output = run("world", "export", "--out", under / "w", *SMALL_WORLD)
    assert code == 1 and f"lies under {under}" in error_line(output)


@pytest.mark.parametrize("atomic", [True, False])
def test_swap_dirs_exchanges_two_folders_with_or_without_an_atomic_exchange(tmp_path, monkeypatch, atomic):
    import tether.io as io

    if not atomic:  # the three-rename fallback of systems without renameat2
        monkeypatch.setattr(io, "_exchange", lambda a, b: False)
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "new.txt").write_text("new\n")
    (b / "old.txt").write_text("old\n")
    io.swap_dirs(a, b)
    assert [p.name for p in b.iterdir()] == ["new.txt"] and [p.name for p in a.iterdir()] == ["old.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]
