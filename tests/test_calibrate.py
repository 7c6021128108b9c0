"""β calibration: the measured frontier matches the closed form; KL and win-rate instruments."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from tether.calibrate import CalibrateConfig, Point, recommend, tabular_frontier, tabular_win_rate
from tether.cli import main
from tether.instruments.kl import sampled_kl
from tether.instruments.winrate import win_rate


def test_tabular_frontier_matches_the_closed_form():
    measured, exact = tabular_frontier(CalibrateConfig(method="tabular", betas="0.1,0.3,1,3"))
    for m, e in zip(measured, exact):
        assert m.kl == pytest.approx(e.kl, abs=2e-3)
        assert m.win_rate == pytest.approx(e.win_rate, abs=2e-3)
        assert m.reward == pytest.approx(e.reward, abs=2e-3)
    kls = [p.kl for p in exact]
    assert kls == sorted(kls, reverse=True)  # larger β, smaller KL


def test_tabular_win_rate_by_hand():
    # π puts all mass on the best of three; π_ref is uniform: it beats 2 of 3 and ties 1 → (2 + 0.5)/3
    assert tabular_win_rate(np.array([1.0, 0, 0]), np.full(3, 1 / 3), np.array([1.0, 0.5, -1])) == pytest.approx(2.5 / 3)
    assert tabular_win_rate(np.full(3, 1 / 3), np.full(3, 1 / 3), np.array([1.0, 0.5, -1])) == pytest.approx(0.5)


def test_recommend_takes_the_best_win_rate_within_budget():
    pts = [Point(0.1, 3.0, 0.8, 1.0), Point(0.3, 1.5, 0.7, 0.9), Point(1.0, 0.4, 0.6, 0.5)]
    assert recommend(pts, 2.0).beta == 0.3
    assert recommend(pts, 0.1) is None


def test_win_rate_counts_ties_half_and_brackets_itself():
    rate, (lo, hi) = win_rate([1, 2, 3, 4], [0, 2, 5, 1])
    assert rate == pytest.approx((1 + 0.5 + 0 + 1) / 4)
    assert lo <= rate <= hi


def test_sampled_kl_of_a_policy_from_itself_is_zero(tiny_folder):
    from tether.models import load_model, load_tokenizer

    model, tok = load_model(tiny_folder), load_tokenizer(tiny_folder)
    est = sampled_kl(model, model, tok, ["\n\nHuman: What is 1 plus 2?\n\nAssistant:"] * 4, max_new_tokens=6)
    assert est.kl == 0.0 and len(est.responses) == 4
    other = load_model(tiny_folder)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.05 * torch.randn_like(p))
    assert sampled_kl(other, model, tok, ["\n\nHuman: Hi\n\nAssistant:"] * 8, max_new_tokens=6).kl != 0.0


def test_calibrate_beta_command_writes_frontier_and_recommends(tmp_path):
    result = CliRunner().invoke(main, ["calibrate-beta", "--method", "tabular", "--betas", "0.1,1,3", "--kl-budget", "0.2",
                                       "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "recommended β = 1" in result.output
    summary = json.loads((tmp_path / "frontier.json").read_text())
    assert summary["recommended_beta"] == 1.0 and (tmp_path / "frontier.png").stat().st_size > 10_000


@pytest.mark.slow
def test_calibrate_beta_with_short_dpo_trainings(tmp_path, tiny_folder):
    from tether.world import format_prompt

    rows = [{"prompt": format_prompt(f"What is {a} plus {b}?"), "chosen": f" {a} plus {b} is {a + b}. #### {a + b}",
             "rejected": f" {a} plus {b} is {a + b + 1}. #### {a + b + 1}"} for a in range(6) for b in range(6)]
    (tmp_path / "prefs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = CliRunner().invoke(main, [
        "calibrate-beta", "--model", str(tiny_folder), "--data", str(tmp_path / "prefs.jsonl"),
        "--prompts", str(tmp_path / "prefs.jsonl"), "--betas", "0.1,1", "--steps", "6", "--batch-size", "8",
        "--eval-prompts", "8", "--max-new-tokens", "8", "--kl-budget", "100", "--out", str(tmp_path / "cal")])
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "cal" / "frontier.json").read_text())
    assert [p["beta"] for p in summary["points"]] == [0.1, 1.0]
    assert all(0 <= p["win_rate"] <= 1 and np.isfinite(p["kl"]) for p in summary["points"])
    assert summary["recommended_beta"] in (0.1, 1.0) and (tmp_path / "cal" / "frontier.png").exists()


@pytest.mark.slow
def test_calibrate_beta_with_short_ppo_trainings_keeps_large_beta_close(tmp_path, tiny_folder):
    from tether.world import format_prompt

    rows = [{"prompt": format_prompt(f"What is {a} plus {b}?"), "answer": str(a + b)} for a in range(6) for b in range(6)]
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = CliRunner().invoke(main, [
        "calibrate-beta", "--method", "ppo", "--model", str(tiny_folder), "--data", str(tmp_path / "prompts.jsonl"),
        "--prompts", str(tmp_path / "prompts.jsonl"), "--reward", "gold", "--betas", "0.001,30", "--steps", "6",
        "--batch-size", "8", "--rollout-batch", "16", "--lr", "1e-2", "--warmup-steps", "0", "--eval-prompts", "36",
        "--max-new-tokens", "8", "--kl-budget", "100", "--out", str(tmp_path / "cal")])
    assert result.exit_code == 0, result.output
    points = json.loads((tmp_path / "cal" / "frontier.json").read_text())["points"]
    assert [p["beta"] for p in points] == [0.001, 30.0]
    assert points[0]["kl"] > points[1]["kl"]  # a strong tie to the reference keeps the policy near it


def test_one_reward_option_serves_both_methods():
    """--reward was declared twice (the tabular R(y) shadowed PPO's reward, so PPO got "1,0.5,-1" as a spec)."""
    from tether.calibrate import CalibrateConfig

    assert CalibrateConfig(method="ppo").reward_spec() == "gold"
    assert CalibrateConfig(method="tabular").reward_spec() == "1,0.5,-1"
    assert CalibrateConfig(method="ppo", reward="runs/rm").reward_spec() == "runs/rm"
