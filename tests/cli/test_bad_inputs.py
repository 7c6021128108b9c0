"""The bad-input battery (issue 19): data, models, configs, checkpoints, options and output folders, every stage.

Each case is something a new user types by mistake. Every one must exit non-zero with one line
``Error: ...`` that names the path (or the option) and what was expected, print no Python
traceback, and leave the output folder absent (or, where it existed, byte for byte as it was).
The cases run in-process through click's runner; three of them also run as real processes, to
check what a terminal shows on stderr.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner

from tether.cli import main

from tests.conftest import CORPUS


@dataclass
class Case:
    args: list            # the command line; "{out}" is replaced by the case's output folder
    names: str            # what the error line must mention (a file name or an option)
    out: str = "absent"   # absent | untouched: the output folder afterwards
    prepare: object = None  # prepare(out: Path) makes the output folder's prior state


# --- inputs every case draws from ---------------------------------------------------------


class Inputs:
    """Valid files for every stage, broken copies of them, and a checkpointed run to corrupt."""

    def __init__(self, root: Path, tiny: Path, *, dry: bool = False):
        self.root, self.tiny, self.dry = root, tiny, dry  # dry: names only (for test ids), nothing written
        pairs = [(t.split("\n\nAssistant:")[0] + "\n\nAssistant:", t.split("\n\nAssistant:")[1]) for t in CORPUS]
        self.sft = self.jsonl("sft.jsonl", [{"prompt": p, "completion": c} for p, c in pairs[:40]])
        self.prefs = self.jsonl("prefs.jsonl", [{"prompt": p, "chosen": c, "rejected": " no"} for p, c in pairs[:40]])
        self.feedback = self.jsonl("feedback.jsonl", [{"prompt": p, "completion": c, "label": i % 2 == 0}
                                                      for i, (p, c) in enumerate(pairs[:40])])
        self.prompts = self.jsonl("prompts.jsonl", [{"prompt": p, "answer": c.split("#### ")[-1]} for p, c in pairs[:16]])
        self.corpus = self.jsonl("corpus.jsonl", [{"text": t} for t in CORPUS[:40]])
        self.empty = self.text("empty.jsonl", "")
        self.blank = self.text("blank.jsonl", "\n\n   \n")

    def text(self, name: str, content: str) -> Path:
        return self.binary(name, content.encode())

    def binary(self, name: str, content: bytes) -> Path:
        path = self.root / name
        if not self.dry:
            path.write_bytes(content)
        return path

    def folder(self, name: str) -> Path:
        path = self.root / name
        if not self.dry:
            path.mkdir(exist_ok=True)
        return path

    def jsonl(self, name: str, rows: list[dict]) -> Path:
        return self.text(name, "".join(json.dumps(r) + "\n" for r in rows))

    def model_copy(self, name: str, damage=None) -> Path:
        """A copy of the tiny model folder, with ``damage(folder)`` applied."""
        folder = self.root / name
        if not self.dry and not folder.exists():
            shutil.copytree(self.tiny, folder)
            if damage:
                damage(folder)
        return folder


def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tiny_folder) -> Inputs:
    return Inputs(tmp_path_factory.mktemp("inputs"), tiny_folder)


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory, inputs) -> tuple[Path, list]:
    """A finished two-step SFT run with a checkpoint at each step, and the options that made it."""
    out = tmp_path_factory.mktemp("runs") / "sft"
    args = ["sft", "--model", inputs.tiny, "--data", inputs.sft, "--out", out, "--steps", 2, "--batch-size", 4,
            "--save-every", 1, "--keep-checkpoints", 2, "--eval-every", 0, "--max-len", 64]
    r = CliRunner().invoke(main, [str(a) for a in args])
    assert r.exit_code == 0, r.output
    return out, args


# --- the cases ----------------------------------------------------------------------------


def _data_cases(i: Inputs) -> dict[str, Case]:
    m = ["--model", i.tiny]
    bad_json = i.text("bad_json.jsonl", json.dumps({"prompt": "a", "completion": "b"}) + "\n{\"prompt\": \"a\",\n")
    chosen_list = i.jsonl("chosen_list.jsonl", [{"prompt": "a", "chosen": ["x", "y"], "rejected": "z"}])
    no_rejected = i.jsonl("no_rejected.jsonl", [{"prompt": "a", "chosen": "x"}])
    label_num = i.jsonl("label_num.jsonl", [{"prompt": "a", "completion": "b", "label": 3}])
    completion_num = i.jsonl("completion_num.jsonl", [{"prompt": "a", "completion": 7}])
    prompt_dict = i.jsonl("prompt_dict.jsonl", [{"prompt": {"text": "a"}}])
    all_invalid = i.jsonl("all_invalid.jsonl", [{"prompt": "a", "completion": 1}, {"prompt": 2, "completion": "b"}])
    long_rows = i.jsonl("long_rows.jsonl", [{"prompt": "a " * 40, "completion": "b " * 40}] * 3)
    csv_missing = i.text("missing_col.csv", "prompt,chosen\nhello,world\n")
    garbage = i.binary("garbage.jsonl", bytes(range(256)) * 4)
    bad_role = i.jsonl("bad_role.jsonl", [{"messages": [{"role": "wizard", "content": "hi"}]}])
    fake_parquet = i.text("fake.parquet", "this is not parquet\n")
    empty_dir = i.folder("empty_dir")
    missing = i.root / "does_not_exist.jsonl"
    return {
        "sft-empty-file": Case(["sft", *m, "--data", i.empty, "--out", "{out}"], "empty.jsonl"),
        "sft-blank-lines-only": Case(["sft", *m, "--data", i.blank, "--out", "{out}"], "blank.jsonl"),
        "rm-empty-file": Case(["rm", *m, "--data", i.empty, "--out", "{out}"], "empty.jsonl"),
        "dpo-empty-file": Case(["dpo", *m, "--data", i.empty, "--out", "{out}"], "empty.jsonl"),
        "kto-empty-file": Case(["kto", *m, "--data", i.empty, "--out", "{out}"], "empty.jsonl"),
        "ppo-empty-prompts": Case(["ppo", *m, "--prompts", i.empty, "--reward", "format", "--value", "head",
                                   "--out", "{out}"], "empty.jsonl"),
        "grpo-empty-prompts": Case(["grpo", *m, "--prompts", i.empty, "--reward", "format", "--out", "{out}"],
                                   "empty.jsonl"),
        "rloo-empty-prompts": Case(["rloo", *m, "--prompts", i.empty, "--reward", "format", "--out", "{out}"],
                                   "empty.jsonl"),
        "bon-empty-prompts": Case(["bon", *m, "--prompts", i.empty, "--reward", "format", "--out", "{out}"],
                                  "empty.jsonl"),
        "pretrain-empty-corpus": Case(["pretrain", "--data", i.empty, "--out", "{out}"], "empty.jsonl"),
        "sft-missing-file": Case(["sft", *m, "--data", missing, "--out", "{out}"], "does_not_exist.jsonl"),
        "rm-missing-file": Case(["rm", *m, "--data", missing, "--out", "{out}"], "does_not_exist.jsonl"),
        "sft-invalid-json-line": Case(["sft", *m, "--data", bad_json, "--out", "{out}"], "bad_json.jsonl:2"),
        "rm-chosen-is-a-list": Case(["rm", *m, "--data", chosen_list, "--out", "{out}"], "'chosen'"),
        "dpo-chosen-is-a-list": Case(["dpo", *m, "--data", chosen_list, "--out", "{out}"], "'chosen'"),
        "dpo-rejected-missing": Case(["dpo", *m, "--data", no_rejected, "--out", "{out}"], "no_rejected.jsonl:1"),
        "kto-label-not-boolean": Case(["kto", *m, "--data", label_num, "--out", "{out}"], "'label'"),
        "sft-completion-a-number": Case(["sft", *m, "--data", completion_num, "--out", "{out}"], "'completion'"),
        "grpo-prompt-a-mapping": Case(["grpo", *m, "--prompts", prompt_dict, "--reward", "format", "--out", "{out}"],
                                      "'prompt'"),
        "sft-every-record-skipped": Case(["sft", *m, "--data", all_invalid, "--skip-invalid", "--out", "{out}"],
                                         "all_invalid.jsonl"),
        "sft-every-record-dropped-for-length": Case(["sft", *m, "--data", long_rows, "--overflow", "drop",
                                                     "--max-len", 16, "--out", "{out}"], "long_rows.jsonl"),
        "rm-csv-missing-column": Case(["rm", *m, "--data", csv_missing, "--out", "{out}"], "missing_col.csv"),
        "sft-binary-garbage": Case(["sft", *m, "--data", garbage, "--out", "{out}"], "garbage.jsonl"),
        "sft-unknown-role": Case(["sft", *m, "--data", bad_role, "--out", "{out}"], "bad_role.jsonl:1"),
        "rm-not-parquet": Case(["rm", *m, "--data", fake_parquet, "--out", "{out}"], "fake.parquet"),
        "sft-data-an-empty-folder": Case(["sft", *m, "--data", empty_dir, "--out", "{out}"], "empty_dir"),
    }


def _model_cases(i: Inputs) -> dict[str, Case]:
    nowhere = i.root / "no_such_model"
    no_weights = i.model_copy("no_weights", lambda f: (f / "model.safetensors").unlink())
    truncated = i.model_copy("truncated_weights", lambda f: _truncate(f / "model.safetensors"))
    garbage = i.model_copy("garbage_weights", lambda f: (f / "model.safetensors").write_bytes(b"\x00garbage" * 100))
    huge_header = i.model_copy("bad_header", lambda f: (f / "model.safetensors").write_bytes(
        (10**12).to_bytes(8, "little") + b"{}"))
    bad_config = i.model_copy("bad_config", lambda f: (f / "config.json").write_text("{not json"))
    rm_truncated = i.model_copy("rm_truncated", lambda f: _truncate(f / "model.safetensors", 0.3))
    common = ["--out", "{out}"]
    return {
        "sft-model-path-missing": Case(["sft", "--model", nowhere, "--data", i.sft, *common], "no_such_model"),
        "rm-model-path-missing": Case(["rm", "--model", nowhere, "--data", i.prefs, *common], "no_such_model"),
        "dpo-model-path-missing": Case(["dpo", "--model", nowhere, "--data", i.prefs, *common], "no_such_model"),
        "kto-model-path-missing": Case(["kto", "--model", nowhere, "--data", i.feedback, *common], "no_such_model"),
        "ppo-model-path-missing": Case(["ppo", "--model", nowhere, "--prompts", i.prompts, "--reward", "format",
                                        "--value", "head", *common], "no_such_model"),
        "grpo-model-path-missing": Case(["grpo", "--model", nowhere, "--prompts", i.prompts, "--reward", "format",
                                         *common], "no_such_model"),
        "bon-model-path-missing": Case(["bon", "--model", nowhere, "--prompts", i.prompts, "--reward", "format",
                                        *common], "no_such_model"),
        "relative-model-path-missing": Case(["sft", "--model", "./no_such_model_here", "--data", i.sft, *common],
                                            "no_such_model_here"),
        "sft-model-without-weights": Case(["sft", "--model", no_weights, "--data", i.sft, *common], "no_weights"),
        "kto-model-without-weights": Case(["kto", "--model", no_weights, "--data", i.feedback, *common],
                                          "no_weights"),
        "sft-truncated-safetensors": Case(["sft", "--model", truncated, "--data", i.sft, *common],
                                          "truncated_weights"),
        "dpo-truncated-safetensors": Case(["dpo", "--model", truncated, "--data", i.prefs, *common],
                                          "truncated_weights"),
        "sft-garbage-safetensors": Case(["sft", "--model", garbage, "--data", i.sft, *common], "garbage_weights"),
        "sft-bad-header-safetensors": Case(["sft", "--model", huge_header, "--data", i.sft, *common], "bad_header"),
        "sft-garbage-config-json": Case(["sft", "--model", bad_config, "--data", i.sft, *common], "bad_config"),
        "ppo-reward-folder-missing": Case(["ppo", "--model", i.tiny, "--prompts", i.prompts, "--reward", nowhere,
                                           *common], "no_such_model"),
        "ppo-reward-truncated": Case(["ppo", "--model", i.tiny, "--prompts", i.prompts, "--reward", rm_truncated,
                                      *common], "rm_truncated"),
        "ppo-ref-path-missing": Case(["ppo", "--model", i.tiny, "--ref", nowhere, "--prompts", i.prompts,
                                      "--reward", "format", "--value", "head", *common], "no_such_model"),
        "grpo-unknown-reward-term": Case(["grpo", "--model", i.tiny, "--prompts", i.prompts, "--reward",
                                          "nonsense_term:1.0", *common], "nonsense_term"),
    }


def _config_cases(i: Inputs) -> dict[str, Case]:
    m = ["--model", i.tiny, "--data", i.sft, "--out", "{out}"]
    unknown = i.text("unknown_key.yaml", "lr_typo: 0.1\n")
    wrong_type = i.text("wrong_type.yaml", "train:\n  steps: many\n")
    invalid = i.text("invalid.yaml", "train:\n  steps: [1, 2\n")
    top_list = i.text("top_list.yaml", "- steps\n- 3\n")
    nested_unknown = i.text("nested_unknown.yaml", "train:\n  warmup: 3\n")
    group_scalar = i.text("group_scalar.yaml", "train: 5\n")
    beta_list = i.text("beta_list.yaml", "beta: [1, 2]\n")
    return {
        "sft-config-unknown-key": Case(["sft", "--config", unknown, *m], "lr_typo"),
        "sft-config-wrong-type": Case(["sft", "--config", wrong_type, *m], "steps"),
        "sft-config-invalid-yaml": Case(["sft", "--config", invalid, *m], "invalid.yaml"),
        "sft-config-top-level-list": Case(["sft", "--config", top_list, *m], "top_list.yaml"),
        "dpo-config-nested-unknown-key": Case(["dpo", "--config", nested_unknown, "--model", i.tiny, "--data",
                                               i.prefs, "--out", "{out}"], "warmup"),
        "rm-config-group-is-a-number": Case(["rm", "--config", group_scalar, "--model", i.tiny, "--data", i.prefs,
                                             "--out", "{out}"], "train"),
        "dpo-config-beta-a-list": Case(["dpo", "--config", beta_list, "--model", i.tiny, "--data", i.prefs,
                                        "--out", "{out}"], "beta"),
    }


def _option_cases(i: Inputs) -> dict[str, Case]:
    sft = ["sft", "--model", i.tiny, "--data", i.sft, "--out", "{out}"]
    rm = ["rm", "--model", i.tiny, "--data", i.prefs, "--out", "{out}"]
    dpo = ["dpo", "--model", i.tiny, "--data", i.prefs, "--out", "{out}"]
    kto = ["kto", "--model", i.tiny, "--data", i.feedback, "--out", "{out}"]
    ppo = ["ppo", "--model", i.tiny, "--prompts", i.prompts, "--reward", "format", "--value", "head", "--out", "{out}"]
    grpo = ["grpo", "--model", i.tiny, "--prompts", i.prompts, "--reward", "format", "--out", "{out}"]
    rloo = ["rloo", "--model", i.tiny, "--prompts", i.prompts, "--reward", "format", "--out", "{out}"]
    bon = ["bon", "--model", i.tiny, "--prompts", i.prompts, "--reward", "format", "--out", "{out}"]
    pretrain = ["pretrain", "--data", i.corpus, "--out", "{out}"]
    table = [
        (sft, "--lr", "nan"), (sft, "--lr", "-1e-4"), (sft, "--max-grad-norm", "nan"), (sft, "--warmup-steps", "-3"),
        (sft, "--save-every", "-1"), (sft, "--min-lr-ratio", "7"), (sft, "--keep-checkpoints", "-1"),
        (sft, "--eval-fraction", "nan"), (sft, "--weight-decay", "inf"), (rm, "--lr", "inf"),
        (dpo, "--beta", "nan"), (dpo, "--beta", "-0.1"), (kto, "--beta", "nan"), (ppo, "--rollout-batch", "0"),
        (ppo, "--clip-eps", "-0.2"), (ppo, "--lam", "3"), (ppo, "--top-p", "0"), (ppo, "--max-new-tokens", "0"),
        (ppo, "--kl-horizon", "0"), (ppo, "--temperature", "nan"), (ppo, "--gamma", "nan"),
        (grpo, "--temperature", "nan"), (grpo, "--beta", "nan"), (rloo, "--max-new-tokens", "0"),
        (bon, "--n", "0"), (pretrain, "--lr", "nan"),
    ]
    return {f"{args[0]}{flag}={value}": Case([*args, flag, value], flag) for args, flag, value in table}


def _output_cases(i: Inputs) -> dict[str, Case]:
    m = ["--model", i.tiny, "--data", i.sft]

    def a_file(out: Path) -> None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("my notes\n")

    def precious(out: Path) -> None:
        out.mkdir(parents=True)
        (out / "thesis.txt").write_text("precious\n")

    def under_a_file(out: Path) -> None:
        out.parent.parent.mkdir(parents=True, exist_ok=True)
        out.parent.write_text("a file, not a folder\n")

    return {
        "sft-out-is-a-file": Case(["sft", *m, "--out", "{out}"], "{out}", "untouched", a_file),
        "sft-out-under-a-file": Case(["sft", *m, "--out", "{out}"], "{parent}", "untouched", under_a_file),
        "sft-overwrite-a-folder-tether-did-not-write": Case(["sft", *m, "--out", "{out}", "--overwrite"], "{out}",
                                                            "untouched", precious),
        "world-export-into-a-foreign-folder": Case(["world", "export", "--out", "{out}"], "{out}", "untouched",
                                                   precious),
    }


def _other_command_cases(i: Inputs) -> dict[str, Case]:
    """The commands that are not training stages: eval, diagnose, calibrate-beta, rlaif, world label, bon."""
    nowhere = i.root / "no_such_model"
    no_weights = i.model_copy("no_weights", lambda f: (f / "model.safetensors").unlink())
    report = i.text("report_garbage.json", "{ not json")
    constitution = i.text("bad_constitution.yaml", "principles: 7\n")
    return {
        "eval-policy-missing": Case(["eval", "--policy", nowhere, "--base", i.tiny, "--eval-prompts", i.prompts,
                                     "--out", "{out}"], "no_such_model"),
        "eval-base-without-weights": Case(["eval", "--policy", i.tiny, "--base", no_weights, "--eval-prompts",
                                           i.prompts, "--out", "{out}"], "no_weights"),
        "eval-prompts-empty": Case(["eval", "--policy", i.tiny, "--base", i.tiny, "--eval-prompts", i.empty,
                                    "--out", "{out}"], "empty.jsonl"),
        "eval-judge-folder-missing": Case(["eval", "--policy", i.tiny, "--base", i.tiny, "--eval-prompts", i.prompts,
                                           "--judge", "rm:" + str(nowhere), "--out", "{out}"], "no_such_model"),
        "eval-samples-zero": Case(["eval", "--policy", i.tiny, "--base", i.tiny, "--samples", "0",
                                   "--out", "{out}"], "--samples"),
        "diagnose-report-garbage": Case(["diagnose", i.root, "--report", report], "report_garbage.json"),
        "calibrate-beta-model-missing": Case(["calibrate-beta", "--method", "dpo", "--model", nowhere, "--data",
                                              i.prefs, "--prompts", i.prompts, "--out", "{out}"], "no_such_model"),
        "calibrate-beta-bad-betas": Case(["calibrate-beta", "--method", "dpo", "--model", i.tiny, "--data", i.prefs,
                                          "--prompts", i.prompts, "--betas", "0.1,nan", "--out", "{out}"],
                                         "--betas"),
        "rlaif-label-policy-missing": Case(["rlaif", "label", "--policy", nowhere, "--prompts", i.prompts,
                                            "--judge", i.tiny, "--out", "{out}"], "no_such_model"),
        "rlaif-label-bad-constitution": Case(["rlaif", "label", "--policy", i.tiny, "--prompts", i.prompts,
                                              "--judge", i.tiny, "--constitution", constitution, "--out", "{out}"],
                                             "bad_constitution.yaml"),
        "world-label-prompts-empty": Case(["world", "label", "--policy", i.tiny, "--prompts", i.empty,
                                           "--out", "{out}"], "empty.jsonl"),
        "bon-reward-folder-without-weights": Case(["bon", "--model", i.tiny, "--prompts", i.prompts, "--reward",
                                                   no_weights, "--out", "{out}"], "no_weights"),
    }


CASE_GROUPS = (_data_cases, _model_cases, _config_cases, _option_cases, _output_cases, _other_command_cases)


def _all_cases(i: Inputs) -> dict[str, Case]:
    cases: dict[str, Case] = {}
    for build in CASE_GROUPS:
        cases.update(build(i))
    return cases


def _snapshot(path: Path) -> dict[str, str]:
    """Every file under ``path`` (or ``path`` itself) with its SHA-256; {} when nothing is there."""
    if path.is_file():
        return {".": hashlib.sha256(path.read_bytes()).hexdigest()}
    if not path.exists():
        return {}
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(path.rglob("*"))}


def check_one_clear_line(output: str, names: str) -> str:
    """The output holds exactly one ``Error:`` line, it names ``names``, and no traceback is shown."""
    assert "Traceback" not in output, output
    errors = [line for line in output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, output
    line = errors[0]
    assert names in line, f"{names!r} not named in: {line}"
    assert "unexpected" not in line, line  # not the catch-all for bugs
    return line


@pytest.fixture(scope="module")
def cases(tmp_path_factory, inputs) -> dict[str, Case]:
    return _all_cases(inputs)


def _case_ids() -> list[str]:
    return list(_all_cases(Inputs(Path("/nonexistent"), Path("/nonexistent"), dry=True)))


CASE_IDS = _case_ids()


def test_the_battery_is_large_enough():
    assert len(CASE_IDS) >= 60 and len(set(CASE_IDS)) == len(CASE_IDS)


@pytest.mark.parametrize("name", CASE_IDS)
def test_bad_input_is_one_clear_line_and_writes_nothing(name, cases, tmp_path):
    case = cases[name]
    out = tmp_path / "parent" / "out"
    if case.prepare:
        case.prepare(out)
    before = _snapshot(out.parent if case.names == "{parent}" else out)
    args = [str(a).replace("{out}", str(out)) for a in case.args]
    r = CliRunner().invoke(main, args)
    assert r.exit_code != 0, r.output
    names = case.names.replace("{out}", out.name).replace("{parent}", out.parent.name)
    check_one_clear_line(r.output, names)
    if case.out == "absent":
        assert not out.exists(), sorted(p.name for p in out.iterdir())
    else:
        assert _snapshot(out.parent if case.names == "{parent}" else out) == before


# --- checkpoints: a corrupt latest checkpoint, then --resume ------------------------------


def _damage_model(step: Path) -> None:
    _truncate(step / "model.safetensors")


def _damage_optimizer(step: Path) -> None:
    _truncate(step / "optimizer.safetensors", 0.1)


def _garbage_state(step: Path) -> None:
    (step / "state.json").write_text("{\"step\": 2, \"sched")


def _empty_state(step: Path) -> None:
    (step / "state.json").write_text("")


def _no_rng(step: Path) -> None:
    (step / "rng.safetensors").unlink()


def _state_a_list(step: Path) -> None:
    (step / "state.json").write_text("[1, 2, 3]\n")


@pytest.mark.parametrize("damage,names", [
    (_damage_model, "model.safetensors"), (_damage_optimizer, "optimizer.safetensors"),
    (_garbage_state, "state.json"), (_empty_state, "state.json"), (_no_rng, "rng.safetensors"),
    (_state_a_list, "state.json"),
], ids=["truncated-model", "truncated-optimizer", "garbage-state", "empty-state", "missing-rng", "state-a-list"])
def test_a_corrupt_checkpoint_is_named_on_resume_and_the_run_is_left_as_it_was(damage, names, sft_run, tmp_path):
    source, args = sft_run
    run = tmp_path / "run"
    shutil.copytree(source, run)
    latest = sorted((run / "checkpoints").glob("step-*"))[-1]
    damage(latest)
    before = _snapshot(run)
    resumed = [str(run) if a == source else str(a) for a in args] + ["--resume"]
    r = CliRunner().invoke(main, resumed)
    assert r.exit_code != 0, r.output
    line = check_one_clear_line(r.output, names)
    assert latest.name in line  # which checkpoint, so the user can delete it and resume from the one before
    assert _snapshot(run) == before


# --- what a terminal shows ----------------------------------------------------------------


@pytest.mark.parametrize("name", ["sft-empty-file", "sft-model-without-weights", "sft-config-invalid-yaml"])
def test_a_real_process_prints_one_line_on_stderr(name, cases, tmp_path):
    case = cases[name]
    out = tmp_path / "out"
    args = [str(a).replace("{out}", str(out)) for a in case.args]
    r = subprocess.run([sys.executable, "-m", "tether", *args], capture_output=True, text=True, timeout=300)
    assert r.returncode == 1, r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "Traceback" not in r.stderr, r.stderr
    assert not out.exists()


def test_debug_shows_the_traceback(cases, tmp_path):
    case = cases["sft-empty-file"]
    args = [str(a).replace("{out}", str(tmp_path / "out")) for a in case.args]
    r = CliRunner().invoke(main, ["--debug", *args])
    assert r.exit_code != 0 and r.exception is not None and not isinstance(r.exception, SystemExit)
