"""The Python API at the package top: ``from tether import DPOConfig, run_dpo`` (issue 21).

Every exported name resolves; ``import tether`` alone does not import torch; the README's
Python API section is true: its first example runs as it stands, and every other example names
only exported things and real config fields.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import re
import shutil
import subprocess
import sys
import typing
from pathlib import Path

import pytest

import tether

from tests.conftest import CORPUS

README = Path(__file__).resolve().parents[1] / "README.md"


def _api_blocks() -> list[str]:
    """The ```python blocks of the README's "Python API" section, in order."""
    text = README.read_text(encoding="utf-8")
    section = text.split("\n## Python API\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def test_every_exported_name_resolves():
    assert len(tether.__all__) == len(set(tether.__all__))
    for name in tether.__all__:
        assert getattr(tether, name) is not None, name
    assert set(tether.__all__) <= set(dir(tether))
    for stage in ("Pretrain", "SFT", "RM", "DPO", "KTO", "PPO", "GRPO", "RLOO", "BoN", "Label", "Revise", "Eval"):
        cfg = getattr(tether, f"{stage}Config")
        assert dataclasses.is_dataclass(cfg), stage
    assert tether.SamplingConfig.__module__ == "tether.rollout"
    assert issubclass(tether.ConfigError, tether.TetherError) and issubclass(tether.ConfigError, ValueError)
    with pytest.raises(AttributeError):
        tether.no_such_name  # noqa: B018


def test_import_tether_does_not_import_torch():
    code = ("import sys, tether; assert 'torch' not in sys.modules, 'torch imported'; "
            "assert 'run_dpo' in dir(tether); print(tether.__version__)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == tether.__version__


def _pref_rows() -> list[dict]:
    rows = []
    for a in range(12):
        for b in range(0, 12, 3):
            right, wrong = a + b, a + b + 1 + (a % 3)
            rows.append({"prompt": f"\n\nHuman: What is {a} plus {b}?\n\nAssistant:",
                         "chosen": f" {a} plus {b} is {right}. #### {right}",
                         "rejected": f" {a} plus {b} is {wrong}. I am not sure."})
    return rows


def test_the_readme_example_runs_as_shown(tmp_path, tiny_folder, monkeypatch, capsys):
    """SFT then DPO, in this process, from the files the README names (laid out in a fresh folder)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TETHER_CACHE", str(tmp_path / "cache"))
    shutil.copytree(tiny_folder, tmp_path / "runs" / "pre")
    with open("sft.jsonl", "w") as f:
        for text in CORPUS:
            prompt, completion = text.split("\n\nAssistant:")
            f.write(json.dumps({"prompt": prompt + "\n\nAssistant:", "completion": completion}) + "\n")
    Path("prefs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _pref_rows()))

    exec(compile(_api_blocks()[0], "README.md (Python API)", "exec"), {"__name__": "readme"})

    accuracy, kl = (float(x) for x in capsys.readouterr().out.split())
    assert 0.0 <= accuracy <= 1.0 and kl == kl  # numbers, not NaN
    for stage in ("sft", "dpo"):
        meta = json.loads((tmp_path / "runs" / stage / "tether.json").read_text())
        assert meta["stage"] == stage
    assert json.loads((tmp_path / "runs" / "dpo" / "tether.json").read_text())["config"]["model"] == "runs/sft"


def _field(cls: type, name: str) -> type:
    hints = typing.get_type_hints(cls)
    assert name in {f.name for f in dataclasses.fields(cls)}, f"{cls.__name__} has no field {name!r}"
    return hints[name]


def test_the_other_readme_examples_name_real_things():
    """Every name imported from tether is exported, every keyword of a ``*Config(...)`` is a field, and every
    ``cfg.group.field`` of a config built in the example exists (the examples need data, so they do not run)."""
    for block in _api_blocks():
        tree = ast.parse(block)
        configs: dict[str, type] = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module == "tether":
                assert {a.name for a in node.names} <= set(tether.__all__)
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id.endswith("Config"):
                cls = getattr(tether, node.func.id)
                for kw in node.keywords:
                    _field(cls, kw.arg)
            if (isinstance(node, ast.Assign) and isinstance(node.value, ast.Call)
                    and isinstance(node.value.func, ast.Name) and node.value.func.id.endswith("Config")):
                for target in node.targets:
                    if isinstance(target, ast.Name):
                        configs[target.id] = getattr(tether, node.value.func.id)
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute):
                chain, inner = [node.attr], node.value
                while isinstance(inner, ast.Attribute):
                    chain.insert(0, inner.attr)
                    inner = inner.value
                if isinstance(inner, ast.Name) and inner.id in configs and node is _outermost(tree, node):
                    cls = configs[inner.id]
                    for name in chain:
                        cls = _field(cls, name)


def _outermost(tree: ast.AST, node: ast.Attribute) -> ast.Attribute:
    """The longest attribute chain ``node`` belongs to (so ``a.b.c`` is checked once, not as ``a.b`` too)."""
    for parent in ast.walk(tree):
        if isinstance(parent, ast.Attribute) and parent.value is node:
            return _outermost(tree, parent)
    return node
