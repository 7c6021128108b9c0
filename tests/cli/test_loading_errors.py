"""Loading what a user names (issue 19): model folders, reward sources, the critic, YAML configs, data, the DPO cache.

A bad model folder, reward source, config file or data file is one line ``Error: ...`` naming the
path and what was expected, with no traceback and no output folder left behind; a nonexistent
local model path fails at once without asking the hub. Also the two correctness fixes: a reward
model trained without normalisation keeps its trained head (item 7), and PPO's critic starts from
a source resolved in one place (item 8); and a damaged DPO reference cache is recomputed.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from tether.cli import main

from tests.conftest import CORPUS

PAIRS = [(t.split("\n\nAssistant:")[0] + "\n\nAssistant:", t.split("\n\nAssistant:")[1]) for t in CORPUS]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def files(tmp_path) -> dict[str, Path]:
    """A valid input file for every kind of stage."""
    return {
        "sft": write_jsonl(tmp_path / "sft.jsonl", [{"prompt": p, "completion": c} for p, c in PAIRS[:24]]),
        "prefs": write_jsonl(tmp_path / "prefs.jsonl", [{"prompt": p, "chosen": c, "rejected": " no"} for p, c in PAIRS[:24]]),
        "feedback": write_jsonl(tmp_path / "fb.jsonl", [{"prompt": p, "completion": c, "label": i % 2 == 0}
                                                        for i, (p, c) in enumerate(PAIRS[:24])]),
        "prompts": write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": p} for p, _ in PAIRS[:8]]),
        "corpus": write_jsonl(tmp_path / "corpus.jsonl", [{"text": t} for t in CORPUS[:24]]),
    }


def stage_args(stage: str, model: Path | str, files: dict[str, Path], out: Path) -> list[str]:
    """A short, valid command line for ``stage`` (one step, tiny batches)."""
    data = {"sft": ["--data", files["sft"]], "rm": ["--data", files["prefs"], "--norm-prompts", "0"],
            "dpo": ["--data", files["prefs"], "--kl-prompts", "0"], "kto": ["--data", files["feedback"], "--kl-prompts", "0"],
            "ppo": ["--prompts", files["prompts"], "--rollout-batch", "4", "--max-new-tokens", "4", "--epochs", "1"],
            "grpo": ["--prompts", files["prompts"], "--prompts-per-step", "2", "--group-size", "2", "--max-new-tokens",
                     "4", "--reward", "format"],
            "pretrain": ["--data", files["corpus"], "--max-len", "32"]}[stage]
    return [stage, "--model", str(model), *map(str, data), "--out", str(out), "--steps", "1", "--batch-size", "4",
            "--eval-every", "0", "--save-every", "0"]


def fails(args: list, *names: str, out: Path | None = None) -> str:
    """Run the CLI; it must exit non-zero with one ``Error:`` line naming ``names``, no traceback, no ``out``."""
    r = CliRunner().invoke(main, [str(a) for a in args])
    assert r.exit_code not in (0, None), r.output
    assert "Traceback" not in r.output, r.output
    errors = [line for line in r.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, r.output
    assert "a bug in tether" not in errors[0], errors[0]  # a designed error (TetherError or OSError), not a stray one
    for name in names:
        assert str(name) in errors[0], errors[0]
    if out is not None:
        assert not out.exists(), f"{out} was left behind"
    return errors[0]


def succeeds(args: list) -> None:
    r = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    assert r.exit_code == 0, r.output


# --- model folders ------------------------------------------------------------------------


def _no_weights(folder: Path) -> None:
    (folder / "model.safetensors").unlink()


def _truncated(folder: Path) -> None:
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _garbage(folder: Path) -> None:
    (folder / "model.safetensors").write_bytes(b"this is not a safetensors file at all" * 20)


def _bad_header(folder: Path) -> None:
    path = folder / "model.safetensors"
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    path.write_bytes(data[:8] + b"{" + b"x" * (n - 1) + data[8 + n :])  # the right length, not JSON


def _short(folder: Path) -> None:
    (folder / "model.safetensors").write_bytes(b"\x01\x02")


def _no_config(folder: Path) -> None:
    (folder / "config.json").unlink()


DAMAGE = {
    "no-weights": (_no_weights, "no model.safetensors or pytorch_model.bin"),
    "truncated": (_truncated, "model.safetensors is truncated or not a safetensors file"),
    "garbage": (_garbage, "model.safetensors is truncated or not a safetensors file (header"),
    "bad-header": (_bad_header, "model.safetensors is truncated or not a safetensors file (header: not a valid JSON"),
    "two-bytes": (_short, "model.safetensors is truncated or not a safetensors file (2 bytes)"),
    "no-config": (_no_config, "no config.json"),
}


def damaged(tiny: Path, root: Path, kind: str) -> Path:
    folder = root / f"model-{kind}"
    shutil.copytree(tiny, folder)
    DAMAGE[kind][0](folder)
    return folder


@pytest.mark.parametrize("kind", sorted(DAMAGE))
def test_a_damaged_model_folder_is_one_line_naming_it(tmp_path, tiny_folder, files, kind):
    model, out = damaged(tiny_folder, tmp_path, kind), tmp_path / "out"
    fails(stage_args("sft", model, files, out), str(model), DAMAGE[kind][1], out=out)


@pytest.mark.parametrize("stage", ["rm", "dpo", "kto", "ppo", "grpo", "pretrain"])
def test_every_stage_refuses_a_model_folder_without_weights_before_writing(tmp_path, tiny_folder, files, stage):
    model, out = damaged(tiny_folder, tmp_path, "no-weights"), tmp_path / "out"
    fails(stage_args(stage, model, files, out), str(model), "no model.safetensors", out=out)


@pytest.mark.parametrize("stage", ["sft", "dpo", "ppo"])
def test_every_stage_refuses_a_truncated_model_before_writing(tmp_path, tiny_folder, files, stage):
    model, out = damaged(tiny_folder, tmp_path, "truncated"), tmp_path / "out"
    fails(stage_args(stage, model, files, out), str(model), "truncated", out=out)


def test_the_checks_in_the_library(tmp_path, tiny_folder):
    from tether.errors import ModelError
    from tether.models import load_model, load_tokenizer
    from tether.models.reward import load_reward_model
    from tether.models.value import load_critic

    tokenizer = load_tokenizer(tiny_folder)
    for kind in ("truncated", "garbage", "no-weights"):
        folder = damaged(tiny_folder, tmp_path, kind)
        for load in (load_model, load_critic, lambda f: load_reward_model(f, tokenizer)):
            with pytest.raises(ModelError, match=DAMAGE[kind][1].replace("(", r"\(")):
                load(folder)
        assert load_tokenizer(folder).pad_token is not None  # a tokenizer needs no weights
    with pytest.raises(ModelError, match="is a file; expected a model folder"):
        load_model(tiny_folder / "config.json")


@pytest.mark.parametrize("path", ["/no/such/model", "./no-such-model", "~/no-such-model-4821", "runs/no-such-sft",
                                  "a/b/c", "model.safetensors"])
def test_a_local_looking_model_path_that_does_not_exist_fails_at_once_without_the_hub(
        tmp_path, files, monkeypatch, path):
    import transformers

    def no_hub(*args, **kwargs):
        raise AssertionError("transformers was asked to load a path that does not exist")

    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()  # so "runs/no-such-sft" is a local path, not an org/name on the hub
    for auto in ("AutoTokenizer", "AutoModelForCausalLM", "AutoModel", "AutoModelForSequenceClassification"):
        monkeypatch.setattr(getattr(transformers, auto), "from_pretrained", no_hub)
    out = tmp_path / "out"
    start = time.perf_counter()
    fails(stage_args("sft", path, files, out), path, "no such folder; expected a model folder", out=out)
    assert time.perf_counter() - start < 20


def test_hub_names_still_go_to_transformers():
    from tether.models.hf import check_model_source, is_hub_name

    for name in ("gpt2", "HuggingFaceTB/SmolLM2-135M-Instruct", "org/name.v2"):
        assert is_hub_name(name) and check_model_source(name) == name
    for name in ("/abs/x", "./x", "~/x", "a/b/c", "../x", "x.safetensors", "org/na me"):
        assert not is_hub_name(name)


# --- reward sources and ensembles ---------------------------------------------------------


def make_rm(tiny: Path, folder: Path) -> Path:
    """A reward-model folder on the tiny backbone (a random head, saved as a trained RM would be)."""
    from tether.models import load_tokenizer
    from tether.models.reward import load_reward_model, mark_trained

    tokenizer = load_tokenizer(tiny)
    model = load_reward_model(tiny, tokenizer)
    mark_trained(model)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def make_ensemble(tiny: Path, folder: Path, k: int = 2) -> Path:
    folder.mkdir()
    for i in range(k):
        make_rm(tiny, folder / f"member-{i}")
    (folder / "tether.json").write_text(json.dumps({"stage": "rm-ensemble", "members": [f"member-{i}" for i in range(k)],
                                                   "config": {"aggregation": "mean"}}))
    return folder


def test_bad_reward_sources_are_one_line_before_ppo_writes(tmp_path, tiny_folder, files):
    out = tmp_path / "out"
    no_weights = damaged(tiny_folder, tmp_path, "no-weights")
    fails(stage_args("ppo", tiny_folder, files, out) + ["--reward", no_weights], str(no_weights),
          "no model.safetensors", out=out)
    truncated = damaged(tiny_folder, tmp_path, "truncated")
    fails(stage_args("ppo", tiny_folder, files, out) + ["--reward", f"rm:{truncated}:1,format:0.2"], str(truncated),
          "truncated", out=out)
    ens = make_ensemble(tiny_folder, tmp_path / "ens")
    shutil.rmtree(ens / "member-1")
    fails(stage_args("ppo", tiny_folder, files, out) + ["--reward", ens], str(ens / "member-1"),
          "ensemble member named in", out=out)
    (ens / "tether.json").write_text("{not json")
    fails(stage_args("ppo", tiny_folder, files, out) + ["--reward", ens], str(ens / "tether.json"),
          "not readable as JSON", out=out)
    fails(stage_args("ppo", tiny_folder, files, out) + ["--reward", "overlong(max=x)"], "overlong(max=x)", out=out)


def test_a_language_model_is_not_served_as_a_reward_with_a_random_head(tmp_path, tiny_folder, files):
    out = tmp_path / "out"
    fails(stage_args("ppo", tiny_folder, files, out) + ["--reward", tiny_folder], str(tiny_folder),
          "no reward head (score.weight) in the weights", out=out)


def _bad_config_json(folder: Path) -> None:
    (folder / "config.json").write_text("{ not json")


def _no_tokenizer(folder: Path) -> None:
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (folder / name).unlink(missing_ok=True)


@pytest.mark.parametrize("damage, message", [(_bad_config_json, "cannot load the"), (_no_tokenizer, "cannot load the tokenizer")])
def test_a_broken_config_or_tokenizer_is_one_line(tmp_path, tiny_folder, files, damage, message):
    model, out = tmp_path / "model", tmp_path / "out"
    shutil.copytree(tiny_folder, model)
    damage(model)
    fails(stage_args("sft", model, files, out), str(model), message, out=out)


def test_an_ensemble_folder_given_as_a_model_says_so(tmp_path, tiny_folder, files):
    ens = make_ensemble(tiny_folder, tmp_path / "ens")
    out = tmp_path / "out"
    fails(stage_args("dpo", ens / "member-0", files, out) + ["--ref", ens], str(ens), "an ensemble of reward models",
          out=out)


# --- item 7: a reward model trained without normalisation keeps its head -------------------


def test_a_reward_model_trained_without_normalisation_loads_its_trained_head(tmp_path, tiny_folder, files):
    from transformers import AutoModelForSequenceClassification

    from tether.rewards import LearnedReward, load_reward

    out = tmp_path / "rm"
    succeeds(["rm", "--model", tiny_folder, "--data", files["prefs"], "--out", out, "--norm-prompts", "0",
              "--steps", "3", "--batch-size", "8", "--lr", "1e-2", "--eval-every", "0", "--save-every", "0"])
    assert json.loads((out / "config.json").read_text())["reward_head"] == "trained"
    prompts, responses = [p for p, _ in PAIRS[:4]], [c for _, c in PAIRS[:4]]
    first, second = load_reward(out), load_reward(out)
    assert isinstance(first, LearnedReward) and not hasattr(first.model.config, "reward_gain")
    a, b = first(prompts, responses), second(prompts, responses)
    assert torch.equal(a, b)  # the same head on every load, not a fresh random one
    plain = AutoModelForSequenceClassification.from_pretrained(out)  # the trained model, as saved
    assert torch.equal(first.model.score.weight, plain.score.weight)
    assert torch.allclose(a, LearnedReward(plain, first.tokenizer)(prompts, responses), atol=1e-6)


def test_the_head_is_new_exactly_when_the_folder_has_none(tmp_path, tiny_folder):
    from tether.models import load_tokenizer
    from tether.models.reward import load_reward_model

    tokenizer = load_tokenizer(tiny_folder)
    fresh = [load_reward_model(tiny_folder, tokenizer).score.weight for _ in range(2)]
    assert not torch.equal(*fresh)  # a causal-LM folder: a new head each time
    rm = make_rm(tiny_folder, tmp_path / "rm")
    cfg = json.loads((rm / "config.json").read_text())
    cfg.pop("reward_head")  # as an RM written before the marker, without normalisation
    (rm / "config.json").write_text(json.dumps(cfg))
    loaded = [load_reward_model(rm, tokenizer).score.weight for _ in range(2)]
    assert torch.equal(*loaded)


# --- item 8: where PPO's critic starts ------------------------------------------------------


def test_the_critic_source_rule(tmp_path, tiny_folder):
    from tether.errors import ModelError
    from tether.models.value import critic_source
    from tether.trainers.ppo import PPOConfig

    rm, ens = make_rm(tiny_folder, tmp_path / "rm"), make_ensemble(tiny_folder, tmp_path / "ens")
    model = str(tiny_folder)

    def source(**kw):
        return critic_source(PPOConfig(model=model, prompts="p.jsonl", **kw))

    assert source(reward=str(rm)) == str(rm) and source(reward=f"rm:{rm}") == str(rm)
    assert source(reward=str(ens)) == str(ens / "member-0")  # an ensemble: its first member
    assert source(reward=f"rm:{rm}:1,format:0.2") == str(rm)  # a weighted sum: its first reward model
    assert source(reward=f"format:0.5,rm:{ens}:1") == str(ens / "member-0")
    assert source(reward="gold") == model and source(reward="exact_match:1,format:0.2") == model
    assert source(reward=str(rm), critic_model=model) == model
    assert source(reward=str(rm), value="head") is None
    assert critic_source(PPOConfig(model=model, prompts="p.jsonl", reward=str(rm)), reward=lambda p, r: [0.0]) == model
    with pytest.raises(ModelError, match="no such folder"):
        source(critic_model=str(tmp_path / "missing"))


def test_a_critic_on_a_smaller_vocabulary_is_refused(tmp_path, tiny_folder):
    from tether.errors import ConfigError
    from tether.models.value import critic_source
    from tether.trainers.ppo import PPOConfig

    rm = make_rm(tiny_folder, tmp_path / "rm")
    cfg = json.loads((rm / "config.json").read_text())
    (rm / "config.json").write_text(json.dumps({**cfg, "vocab_size": cfg["vocab_size"] - 1}))
    with pytest.raises(ConfigError, match=r"vocabulary .* is smaller than the policy's"):
        critic_source(PPOConfig(model=str(tiny_folder), prompts="p.jsonl", reward=str(rm)))
    assert critic_source(PPOConfig(model=str(tiny_folder), prompts="p.jsonl", reward=str(rm), value="head")) is None


def test_a_bad_critic_model_stops_ppo_before_writing(tmp_path, tiny_folder, files):
    out, bad = tmp_path / "out", damaged(tiny_folder, tmp_path, "garbage")
    fails(stage_args("ppo", tiny_folder, files, out) + ["--critic-model", bad], str(bad), "truncated", out=out)


@pytest.mark.parametrize("spec", ["ensemble", "weighted"])
def test_ppo_runs_with_an_ensemble_or_a_weighted_spec_and_the_default_critic(tmp_path, tiny_folder, files, spec):
    ens = make_ensemble(tiny_folder, tmp_path / "ens")
    reward = str(ens) if spec == "ensemble" else f"rm:{ens / 'member-1'}:1,format:0.2"
    out = tmp_path / "out"
    succeeds(stage_args("ppo", tiny_folder, files, out) + ["--reward", reward])
    assert (out / "model.safetensors").exists()


# --- YAML configs ---------------------------------------------------------------------------


YAML_CASES = {
    "unknown-key": ("lrr: 1\n", "unknown option(s) lrr"),
    "unknown-nested": ("train:\n  stepz: 3\n", "train: unknown option(s) stepz"),
    "flat-group-key": ("lr: 0.001\n", "lr belongs under train:"),
    "wrong-type": ("train:\n  steps: many\n", "train.steps: expected int, got 'many'"),
    "wrong-type-str": ("model: [a, b]\n", "model: expected str, got ['a', 'b']"),
    "group-scalar": ("train: 5\n", "train: expected a mapping of option: value, got int"),
    "invalid": ("train:\n  steps: 3\n  lr: [1, 2\n", ":4: invalid YAML"),
    "tab": ("train:\n\tsteps: 3\n", ":2: invalid YAML"),
    "top-level-list": ("- lr: 1\n- steps: 2\n", "expected a mapping of option: value at the top level, got a list"),
    "scalar": ("just text\n", "at the top level, got str"),
    "empty": ("", "empty; expected option: value lines"),
    "comments-only": ("# nothing here\n", "empty; expected option: value lines"),
    "not-utf8": (b"model: \xff\xfe\n", "invalid UTF-8"),
}


@pytest.mark.parametrize("case", sorted(YAML_CASES))
def test_a_bad_yaml_config_is_one_line_naming_the_file(tmp_path, tiny_folder, files, case):
    content, message = YAML_CASES[case]
    path = tmp_path / "c.yaml"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    out = tmp_path / "out"
    fails(stage_args("sft", tiny_folder, files, out) + ["--config", path], str(path), message, out=out)


def test_load_yaml_raises_config_error(tmp_path):
    from tether.config import load_yaml
    from tether.errors import ConfigError
    from tether.trainers.sft import SFTConfig

    path = tmp_path / "c.yaml"
    path.write_text("train:\n  steps: 7\n")
    assert load_yaml(SFTConfig, path).train.steps == 7
    path.write_text("[1, 2]\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: expected a mapping"):
        load_yaml(SFTConfig, path)


# --- data -----------------------------------------------------------------------------------


@pytest.mark.parametrize("stage, key", [("sft", "sft"), ("rm", "prefs"), ("dpo", "prefs"), ("kto", "feedback"),
                                        ("ppo", "prompts"), ("grpo", "prompts"), ("pretrain", "corpus")])
@pytest.mark.parametrize("content", ["", "\n  \n"])
def test_an_empty_data_file_is_one_line_in_every_stage(tmp_path, tiny_folder, files, stage, key, content):
    files[key].write_text(content)
    out = tmp_path / "out"
    fails(stage_args(stage, tiny_folder, files, out), str(files[key]), "empty: no records", out=out)


@pytest.mark.parametrize("stage, key, row", [
    ("sft", "sft", {"prompt": "P", "completion": 3}),
    ("rm", "prefs", {"prompt": "P", "chosen": "a", "rejected": "a"}),
    ("dpo", "prefs", {"prompt": "P", "chosen": ["a"], "rejected": "b"}),
    ("kto", "feedback", {"prompt": "P", "completion": "c", "label": "maybe"}),
])
def test_every_record_skipped_is_one_line_with_the_count(tmp_path, tiny_folder, files, stage, key, row):
    write_jsonl(files[key], [row] * 5)
    out = tmp_path / "out"
    fails(stage_args(stage, tiny_folder, files, out) + ["--skip-invalid"], str(files[key]),
          "all 5 record(s) are invalid and were skipped (skip_invalid)", out=out)


@pytest.mark.parametrize("stage, key", [("sft", "sft"), ("rm", "prefs"), ("dpo", "prefs"), ("kto", "feedback")])
def test_every_record_dropped_as_too_long_is_one_line_with_the_counts(tmp_path, tiny_folder, files, stage, key):
    out = tmp_path / "out"
    line = fails(stage_args(stage, tiny_folder, files, out) + ["--max-len", "4", "--overflow", "drop"], str(files[key]),
                 "left to train on", "dropped as longer than max_len=4 (overflow=drop)", out=out)
    assert "all longer than max_len" not in line


def test_a_single_record_held_out_says_so(tmp_path, tiny_folder, files):
    write_jsonl(files["sft"], [{"prompt": "P", "completion": " c"}])
    out = tmp_path / "out"
    fails(stage_args("sft", tiny_folder, files, out), str(files["sft"]), "1 held out for evaluation", out=out)


@pytest.mark.parametrize("row, field, message", [
    ({"prompt": "P", "chosen": ["a"], "rejected": "b"}, "chosen", "expected a string like 'rejected'"),
    ({"prompt": "P", "chosen": "a", "rejected": ["b"]}, "rejected", "expected a string like 'chosen'"),
    ({"chosen": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "a"}], "rejected": "b"},
     "rejected", "expected a list of messages like 'chosen'"),
    ({"prompt": "P", "chosen": {"text": "a"}, "rejected": "b"}, "chosen", "expected a non-empty string, got dict"),
])
def test_a_wrong_typed_preference_field_is_reported_under_its_own_name(tmp_path, row, field, message):
    from tether.data import DataError, load_preferences

    with pytest.raises(DataError) as err:
        load_preferences(write_jsonl(tmp_path / "p.jsonl", [row]))
    assert err.value.field == field and message in str(err.value) and str(err.value).startswith("p.jsonl:1:")


def test_a_list_in_chosen_is_reported_against_chosen_on_the_command_line(tmp_path, tiny_folder, files):
    write_jsonl(files["prefs"], [{"prompt": "P", "chosen": ["x"], "rejected": "y"}])
    out = tmp_path / "out"
    fails(stage_args("dpo", tiny_folder, files, out), "prefs.jsonl:1: field 'chosen'", out=out)


def test_csv_with_a_missing_column_and_a_bad_margin_are_one_line(tmp_path, tiny_folder, files):
    csv = tmp_path / "sft.csv"
    csv.write_text("prompt,answer\nhello,world\n")
    out = tmp_path / "out"
    fails(stage_args("sft", tiny_folder, {**files, "sft": csv}, out), "sft.csv:2: field 'completion': missing", out=out)
    write_jsonl(files["prefs"], [{"prompt": p, "chosen": c, "rejected": " no", "m": "big"} for p, c in PAIRS[:8]])
    fails(stage_args("rm", tiny_folder, files, out) + ["--margin-field", "m"], "prefs.jsonl:", "field 'm'",
          "expected a number", out=out)
    fails(stage_args("sft", tiny_folder, files, out) + ["--max-len", "4", "--overflow", "error"], "sft.jsonl:",
          "longer than max_len=4", out=out)


# --- the DPO reference cache ----------------------------------------------------------------


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty", "wrong-length", "nan"])
def test_a_damaged_reference_cache_is_recomputed_and_replaced(tmp_path, tiny_folder, monkeypatch, caplog, damage):
    from safetensors.torch import load_file, save_file

    from tether.data.collate import Encoded
    from tether.loop import TrainConfig
    from tether.models import load_tokenizer
    from tether.scoring import cached_reference

    monkeypatch.setenv("TETHER_CACHE", str(tmp_path / "cache"))
    tokenizer = load_tokenizer(tiny_folder)
    rows = []
    for p, c in PAIRS[:6]:
        ids = tokenizer(p + c)["input_ids"]
        rows.append(Encoded(ids, [-100] * 3 + ids[3:]))
    cfg = TrainConfig(batch_size=4)
    first, hit = cached_reference(str(tiny_folder), rows, tokenizer.pad_token_id, cfg)
    first = first.cached
    assert not hit and first.shape == (6,)
    (path,) = (tmp_path / "cache" / "ref_logps").iterdir()
    data = path.read_bytes()
    if damage == "truncated":
        path.write_bytes(data[: len(data) - 7])
    elif damage == "garbage":
        path.write_bytes(b"\x00garbage" * 50)
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "wrong-length":
        save_file({"logps": torch.zeros(3)}, str(path))
    else:
        save_file({"logps": torch.full((6,), float("nan"))}, str(path))
    with caplog.at_level("WARNING", logger="tether.scoring"):
        again, hit = cached_reference(str(tiny_folder), rows, tokenizer.pad_token_id, cfg)
    again = again.cached
    assert not hit and torch.equal(again, first)
    assert any("is unusable" in r.message and "recomputing" in r.message for r in caplog.records)
    assert torch.equal(load_file(str(path))["logps"], first)  # replaced by a good one
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left
    third, hit = cached_reference(str(tiny_folder), rows, tokenizer.pad_token_id, cfg)
    assert hit and third.kind == "cache" and torch.equal(third.cached, first)
