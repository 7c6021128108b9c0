"""Configs: YAML round trip, CLI options from dataclasses, precedence, clear errors."""

from __future__ import annotations

import click
import pytest
from click.testing import CliRunner

from tether.config import from_dict, load_yaml, options, save_yaml, to_dict
from tether.trainers.pretrain import PretrainConfig
from tether.trainers.sft import SFTConfig


def test_yaml_round_trip_keeps_every_field(tmp_path):
    cfg = SFTConfig(model="m", data="d.jsonl", packing=True)
    cfg.train.lr = 1e-5
    cfg.lora.r = 8
    save_yaml(cfg, tmp_path / "c.yaml")
    back = load_yaml(SFTConfig, tmp_path / "c.yaml")
    assert back == cfg and to_dict(back)["train"]["lr"] == 1e-5


def test_partial_nested_override_keeps_the_stage_defaults():
    cfg = from_dict(PretrainConfig, {"train": {"lr": 0.5}})
    assert cfg.train.lr == 0.5
    assert cfg.train.steps == PretrainConfig().train.steps != SFTConfig().train.steps


def test_unknown_keys_and_wrong_types_are_errors():
    with pytest.raises(ValueError, match=r"^config: train: unknown option\(s\) lrr"):
        from_dict(SFTConfig, {"train": {"lrr": 1}})
    with pytest.raises(ValueError, match=r"^config: train\.steps: expected int"):
        from_dict(SFTConfig, {"train": {"steps": "many"}})
    assert from_dict(SFTConfig, {"train": {"lr": "3e-4"}}).train.lr == 3e-4  # YAML reads 3e-4 as text


def _command():
    seen = {}

    @click.command()
    @options(SFTConfig)
    def cmd(cfg):
        seen["cfg"] = cfg

    return cmd, seen


def test_cli_options_yaml_and_precedence(tmp_path):
    cmd, seen = _command()
    (tmp_path / "c.yaml").write_text("model: from-yaml\ndata: d.jsonl\ntrain:\n  lr: 0.01\n  steps: 7\n")
    result = CliRunner().invoke(cmd, ["--config", str(tmp_path / "c.yaml"), "--steps", "9", "--packing"])
    assert result.exit_code == 0, result.output
    cfg = seen["cfg"]
    assert (cfg.model, cfg.train.lr, cfg.train.steps, cfg.packing) == ("from-yaml", 0.01, 9, True)


def test_help_lists_every_option_with_its_default():
    cmd, _ = _command()
    text = CliRunner().invoke(cmd, ["--help"], terminal_width=200).output
    for flag in ("--model", "--lr", "--grad-accum", "--max-grad-norm", "--packing / --no-packing", "--config", "--r "):
        assert flag in text
    assert "[default: 0.0003]" in text


def test_cross_field_validation_is_a_usage_error():
    cmd, _ = _command()
    result = CliRunner().invoke(cmd, ["--model", "m", "--data", "d", "--schedule", "wobbly"])
    assert result.exit_code == 2 and "schedule must be one of" in result.output
