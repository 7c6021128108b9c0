"""`tether eval` and `tether diagnose` end to end on tiny random models over a small gold world, and the LLM judge."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from tether.cli import main

from tests.conftest import SHARED_DATA as SHARED
from tests.conftest import eval_world


@pytest.fixture(scope="module")
def world_models(tmp_path_factory):
    """A small exported world, a tokenizer trained on it, two tiny models (base, policy) and a reward model."""
    root = tmp_path_factory.mktemp("evalworld")
    base, policy = eval_world(root, pretrain_docs=300, sft_train=50, sft_eval=10, pref_train=50, pref_test=40,
                              feedback=20)
    return root, base, policy


@pytest.mark.slow
def test_eval_writes_a_report_and_diagnose_reads_it(world_models):
    root, base, policy = world_models
    out = root / "eval"
    args = ["eval", "--policy", str(policy), "--base", str(base), "--world", str(root / "world"), "--rm", str(root / "rm"),
            "--prompts", "8", "--probe-limit", "4", "--limit", "3", "--max-new-tokens", "8", "--ascent-prompts", "1",
            "--ascent-steps", "3", "--bon-pool", "4", "--bon-prompts", "2", "--judge", f"llm:{base}", "--out", str(out), "--refusal-judge", f"llm:{base}",
            "--xstest", str(SHARED / "xstest" / "xstest_prompts.csv"), "--gsm8k", str(SHARED / "gsm8k" / "test.jsonl")]
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    s = report["summary"]
    assert s["kl_exact"] > 0 and s["kl_exact_stderr"] > 0  # two different random models
    assert 0 <= s["win_rate"] <= 1 and s["judge"] == f"llm:{base}"
    assert 0 <= report["sections"]["win_rate"]["first_position_rate"] <= 1
    for key in ("rm_accuracy", "refusal_benign_policy", "refusal_xstest_safe_base", "sycophancy_policy",
                "mc_acc_policy", "gsm8k_em_base", "padding_slope", "length_ratio"):
        assert key in s, key
    assert report["sections"]["capability"]["gsm8k"]["count"] == 3
    assert 0 <= report["sections"]["refusal_judge"]["refusal_judge/world_benign_policy"] <= 1
    assert len(report["sections"]["hacking"]["ascent"]) == 1
    assert any("over-optimisation of the run" in x for x in report["skipped"])  # no training run behind this policy
    bon = report["sections"]["overoptimisation_bon"]
    assert [p["n"] for p in bon["points"]] == [1, 2, 4] and bon["form"] == "bon" and "gold_peak" in bon
    html = (out / "report.html").read_text()
    assert html.count("<img") >= 6 and "<table" in html and "Diagnosis" in html
    found = CliRunner().invoke(main, ["diagnose", str(policy), "--report", str(out / "report.json"), "--json"])
    assert found.exit_code == 0, found.output
    assert json.loads(found.output)["verdict"]
    missing = CliRunner().invoke(main, ["diagnose", str(policy)])
    assert missing.exit_code != 0 and "no eval report" in missing.output


def test_eval_errors_are_one_line(world_models):
    root, base, policy = world_models
    bad = CliRunner().invoke(main, ["eval", "--policy", str(policy), "--base", str(base), "--judge", "oracle",
                                    "--world", str(root / "world")])
    assert bad.exit_code != 0 and "judge 'oracle'" in bad.output


def test_llm_judge_asked_in_both_orders_cannot_prefer_identical_answers(world_models):
    from tether.rlaif.judge import LMJudge
    from tether.models import load_model, load_tokenizer

    _, base, _ = world_models
    judge = LMJudge(load_model(base), load_tokenizer(base))  # the one LLM judge, called as `tether eval`'s
    prompts = ["\n\nHuman: What is 2 plus 2?\n\nAssistant:"] * 3
    same = judge(prompts, [" 4", " five", " no"], [" 4", " five", " no"])
    assert same.outcome.tolist() == [0.5, 0.5, 0.5]  # whatever its position bias, the orders cancel
    swapped_a = judge(prompts, [" 4", " five", " no"], [" x", " y", " z"]).outcome
    swapped_b = judge(prompts, [" x", " y", " z"], [" 4", " five", " no"]).outcome
    assert torch.equal(swapped_a, 1 - swapped_b)  # antisymmetric: a vs b is the mirror of b vs a
