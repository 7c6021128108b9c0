"""End to end: `tether demo` on a small gold world. SFT must beat the pretrained model on gold reward,
and every later stage (RM, PPO, DPO, GRPO) must run and be reported."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from tether.cli import main


@pytest.mark.slow
def test_demo_runs_every_stage_and_sft_raises_the_gold_reward(tmp_path):
    out = tmp_path / "demo"
    result = CliRunner().invoke(main, ["demo", "--quick", "--out", str(out), "--pretrain-steps", "250",
                                       "--sft-steps", "120", "--eval-prompts", "1000"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "gold/reward" in result.output and "report.json" in result.output
    report = json.loads((out / "report.json").read_text())
    for stage in ("world", "pretrain", "sft", "rm", "ppo", "dpo", "grpo"):
        assert (tmp_path / "demo" / stage).is_dir()
    assert {"pretrained", "sft", "ppo", "dpo", "grpo"} <= set(report["gold"])
    g = report["grpo"]
    assert 0 <= g["eval_exact_match_start"] <= 1 and 0 <= g["eval_exact_match_end"] <= 1
    assert "gold/arithmetic_exact_match" in report["gold"]["grpo"] and "GRPO (exact-match reward)" in result.output
    assert 0.5 < report["rm"]["eval/rm/accuracy"] <= 1 and report["ppo"]["eval/kl"] is not None
    assert report["pretrain"]["eval/loss"] < 0.5 * report["pretrain"]["data/unigram_entropy"]
    # scored on every test prompt (401; a sample of 100 held ~4 harmful ones, whose mean moved with the CPU's
    # floating-point rounding): measured -1.28 -> -0.98 overall and -0.55 -> +0.43 on the 14 harmful prompts
    before, after = report["gold"]["pretrained"], report["gold"]["sft"]
    assert after["gold/reward"] > before["gold/reward"] + 0.2, (before, after)
    assert after["gold/reward_harmful"] > before["gold/reward_harmful"] + 0.5, (before, after)
    # the demo ends with tether eval and tether diagnose of both policies
    assert "tether diagnose PPO" in result.output and "tether diagnose DPO" in result.output
    for name in ("ppo", "dpo"):
        assert (out / name / "eval" / "report.html").exists()
        found = report["instruments"][name]
        assert found["summary"]["kl_exact"] >= 0 and 0 <= found["summary"]["win_rate"] <= 1
        assert found["diagnosis"]["verdict"]
    # where the time went: every part timed, together (nearly) the whole run
    parts = report["stage_seconds"]
    assert set(parts) == {"world", "pretrain", "sft", "label", "rm", "ppo", "dpo", "grpo", "gold", "instruments"}
    assert all(v > 0 for v in parts.values()) and 0.9 * report["seconds"] < sum(parts.values()) <= report["seconds"]
