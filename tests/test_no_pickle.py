"""No pickle is ever written or loaded: weights and optimiser state in safetensors, the rest JSON or YAML.

A pickle runs code when it is loaded, so a checkpoint or model folder from somewhere else would be
a way in. Here a run with checkpoints (the PPO stage, which holds the most state: policy, critic,
optimiser, β, RNG) is written, every file it wrote is read as what its name says, and then it is
resumed and its model loaded with ``torch.load`` and every pickle loader made to fail the test.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from safetensors import safe_open

from tether.cli import main

TEXT_SUFFIXES = {".json", ".jsonl", ".yaml", ".txt", ".jinja"}


def _kind(path: Path) -> str:
    """What the file is, read from its content (raises if it is not what its name says)."""
    head = path.read_bytes()[:4]
    assert not head.startswith(b"\x80") and not head.startswith(b"PK"), f"{path} looks like a pickle / torch.save"
    if path.suffix == ".safetensors":
        with safe_open(str(path), "pt") as f:
            list(f.keys())
        return "safetensors"
    if path.suffix in (".json", ".jsonl"):
        text = path.read_text(encoding="utf-8")
        [json.loads(line) for line in text.splitlines() if line.strip()] if path.suffix == ".jsonl" else json.loads(text)
        return "json"
    if path.suffix == ".yaml":
        yaml.safe_load(path.read_text(encoding="utf-8"))
        return "yaml"
    if "tfevents" in path.name:
        return "tensorboard"  # protobuf records, read by TensorBoard, never by tether
    if path.suffix in TEXT_SUFFIXES or path.stat().st_size == 0 or path.name.startswith("."):
        path.read_text(encoding="utf-8")
        return "text"
    raise AssertionError(f"{path}: a file of unknown kind in a run folder")


def test_a_run_writes_no_pickle_and_resumes_and_loads_without_one(tmp_path, tiny_folder, monkeypatch):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"\n\nHuman: What is {a} plus 1?\n\nAssistant:"}) + "\n"
                               for a in range(8)))
    out = tmp_path / "ppo"
    args = ["ppo", "--model", tiny_folder, "--prompts", prompts, "--reward", "format", "--value", "critic",
            "--critic-model", tiny_folder, "--out", out, "--steps", 2, "--rollout-batch", 4, "--batch-size", 4,
            "--max-new-tokens", 6, "--save-every", 1, "--keep-checkpoints", 2, "--eval-every", 0]
    r = CliRunner().invoke(main, [str(a) for a in args])
    assert r.exit_code == 0, r.output
    kinds = {str(p.relative_to(out)): _kind(p) for p in out.rglob("*") if p.is_file()}
    assert sum(k.endswith("optimizer.safetensors") for k in kinds) == 2  # both checkpoints hold the optimiser

    def refuse(*a, **k):
        raise AssertionError("a pickle loader was called")

    for module, name in ((torch, "load"), (pickle, "load"), (pickle, "loads"), (pickle, "Unpickler")):
        monkeypatch.setattr(module, name, refuse)
    (out / "tether.json").unlink()  # as if killed during the final write: --resume loads the last checkpoint
    r = CliRunner().invoke(main, [str(a) for a in args] + ["--resume"])
    assert r.exit_code == 0, r.output
    from tether.models import load_model

    load_model(out)
