"""The instruments read GRPO and RLOO runs as they read PPO's: every RL stage logs the held-out reward, KL to
the reference, gold reward and length in one vocabulary (docs/metrics.md), so the over-optimisation fit and
`tether diagnose` work on them (before, they read PPO runs only)."""

from __future__ import annotations

import json
import shutil

import pytest

from tether.instruments.diagnose import diagnose
from tether.instruments.overopt import overoptimisation, run_points
from tether.trainers.grpo import GRPOConfig, run_grpo
from tether.trainers.rloo import RLOOConfig, run_rloo
from tests.toy import digits

PROMPTS = [f"\n\nHuman: What is {a} plus {b}?\n\nAssistant:" for a in range(4) for b in range(4)]


@pytest.fixture(scope="module")
def runs(tiny_folder, tmp_path_factory):
    root = tmp_path_factory.mktemp("rl_instruments")
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    out = {}
    for kind, config, run in (("grpo", GRPOConfig, run_grpo), ("rloo", RLOOConfig, run_rloo)):
        cfg = config(model=str(tiny_folder), prompts=str(prompts), eval_prompts=str(prompts), out=str(root / kind),
                     group_size=4, prompts_per_step=4, eval_samples=2, beta=0.0)
        cfg.sampling.max_new_tokens = 12
        cfg.train.steps, cfg.train.eval_every, cfg.train.lr, cfg.train.batch_size, cfg.train.grad_accum = 8, 1, 3e-2, 16, 1
        out[kind] = run(cfg, digits)  # the proxy; the gold world scores the same samples
    return out


@pytest.mark.parametrize("kind", ["grpo", "rloo"])
def test_every_evaluation_logs_reward_kl_gold_and_length(runs, kind):
    rows = [json.loads(line) for line in (runs[kind] / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval/reward" in r]
    assert [r["step"] for r in evals] == list(range(9))  # step 0 (the starting policy), then every iteration
    for r in evals:
        assert {"eval/kl", "eval/gold", "eval/length"} <= set(r)
    assert evals[0]["eval/kl"] == 0.0 and evals[-1]["eval/kl"] > 0  # the reference is the starting policy
    assert all("reward/gold" in r and "rollout/length" in r for r in rows[1:])


@pytest.mark.parametrize("kind", ["grpo", "rloo"])
def test_the_overoptimisation_fit_reads_the_run(runs, kind):
    fit = overoptimisation(run_points(runs[kind]))
    assert len(fit["points"]) == 9
    assert "alpha" in fit["fit_gold"] and "alpha" in fit["fit_proxy"]
    points = fit["points"]
    assert points[0]["d"] == 0 < points[-1]["d"] and points[-1]["proxy"] > points[0]["proxy"]  # the proxy gained
    assert fit["gold_peak"]["kl"] == next(p["kl"] for p in points if p["gold"] == fit["gold_peak"]["gold"])


@pytest.mark.parametrize("kind", ["grpo", "rloo"])
def test_diagnose_reads_the_run(runs, kind, tmp_path):
    """The run's metrics feed the rules that read training curves (gold against proxy, the sign of k1): on this
    run neither fires; on a copy whose gold curve is replaced by one that peaks and falls while the proxy
    climbs, the over-optimisation rule does."""
    report = tmp_path / "report.json"
    report.write_text(json.dumps({"summary": {}}))  # no `tether eval` report: the run's own metrics alone
    assert diagnose(runs[kind], report_path=report)["findings"] == []
    run = shutil.copytree(runs[kind], tmp_path / "run")
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for i, r in enumerate(rows):  # gold up for 3 evaluations, then down by 0.2 each; the proxy up all along
        r["eval/gold"], r["eval/reward"] = 0.2 * min(i, 3) - 0.2 * max(i - 3, 0), r["eval/reward"] + 0.1 * i
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    found = diagnose(run, report_path=report)
    assert [f["symptom"] for f in found["findings"]] == ["gold falls while proxy rises"]
