"""Best-of-N: the pool statistics against hand computations, and the stage end to end on a tiny model."""

from __future__ import annotations

import json
import math

import pytest
from click.testing import CliRunner

from tether.cli import main
from tether.rollout import SamplingConfig
from tether.theory import bon_kl
from tether.trainers.bon import BoNConfig, curve_sizes, pool_stats, run_bon
from tests.toy import digits

PROMPTS = [f"\n\nHuman: What is {a} plus {b}?\n\nAssistant:" for a in range(3) for b in range(2)]


@pytest.fixture
def prompt_file(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": p, "answer": "1", "id": i}) + "\n" for i, p in enumerate(PROMPTS)))
    return path


def test_pool_stats_of_distinct_responses_by_hand():
    # 4 distinct responses, uniform π̂ = 1/4, rewards 0 < 1 < 2 < 3. Best of 2 keeps level i (1-based
    # rank) with probability (i/4)² − ((i−1)/4)²: 1/16, 3/16, 5/16, 7/16.
    p = [1 / 16, 3 / 16, 5 / 16, 7 / 16]
    got = pool_stats([(1,), (2,), (3,), (4,)], [0.0, 1.0, 2.0, 3.0], 2)
    assert got.expected_reward == pytest.approx(sum(pi * r for pi, r in zip(p, [0, 1, 2, 3])))  # 2.25
    assert got.kl == pytest.approx(sum(pi * math.log(pi * 4) for pi in p))
    assert got.kl < bon_kl(2)  # a finite set: strictly below log 2 − 1/2


def test_pool_stats_merge_repeats_and_ties():
    # (7,) drawn twice: π̂ = (1/2, 1/4, 1/4). Rewards 1, 0, 0: best of 2 picks (7,) unless both draws
    # miss it, probability (1/2)² = 1/4, so π_BoN = (3/4, 1/8, 1/8).
    got = pool_stats([(7,), (8,), (7,), (9,)], [1.0, 0.0, 1.0, 0.0], 2)
    assert got.expected_reward == pytest.approx(0.75)
    assert got.kl == pytest.approx(0.75 * math.log(1.5) + 2 * 0.125 * math.log(0.5))
    assert pool_stats([(1,), (2,)], [3.0, 3.0], 8).kl == pytest.approx(0.0)  # all tied: π_BoN = π̂
    # one response scored twice differently (a stochastic reward): its one reward is the mean, 0.5 here
    assert pool_stats([(1,), (1,), (2,)], [0.0, 1.0, 0.25], 2)[:2] == pool_stats([(1,), (1,), (2,)], [0.5, 0.5, 0.25], 2)[:2]


def test_bon_and_the_overoptimisation_curve_share_one_pool_computation():
    """They used to disagree when one response got two rewards (bon raised, pool_curve kept the first one)."""
    import torch

    from tether.instruments.overopt import pool_curve
    from tether.trainers.bon import merge_pool

    responses = [(1,), (2,), (1,), (3,), (4,), (4,), (4,), (5,)]  # two prompts, pools of 4
    proxy = torch.tensor([[0.0, 0.5, 1.0, 0.2], [0.3, 0.9, 0.6, 0.1]], dtype=torch.float64)
    gold = torch.tensor([[1.0, 0.0, 0.0, 2.0], [0.0, 1.0, 1.0, 0.0]], dtype=torch.float64)
    p_ref, (r, g) = merge_pool(responses[:4], proxy[0].tolist(), gold[0].tolist())
    assert p_ref.tolist() == [0.5, 0.25, 0.25] and r.tolist() == [0.5, 0.5, 0.2] and g.tolist() == [0.5, 0.0, 2.0]
    curve = pool_curve(responses, proxy, gold)
    assert [p["n"] for p in curve] == [1, 2, 4]
    for point in curve:
        per_prompt = [pool_stats(responses[4 * i : 4 * i + 4], proxy[i].tolist(), point["n"], gold[i].tolist())
                      for i in range(2)]
        assert point["kl"] == pytest.approx(sum(s.kl for s in per_prompt) / 2, abs=1e-12)
        assert point["proxy"] == pytest.approx(sum(s.expected_reward for s in per_prompt) / 2, abs=1e-12)
        assert point["gold"] == pytest.approx(sum(s.expected_gold for s in per_prompt) / 2, abs=1e-12)
    # by hand, prompt 0, n = 2: π̂ = (1/2, 1/4, 1/4) with R = (0.5, 0.5, 0.2): the top level {(1,), (2,)} has mass
    # 3/4 and is kept with probability 1 − (1/4)² = 15/16, shared 2:1 within the tie
    p_bon = [15 / 16 * 2 / 3, 15 / 16 * 1 / 3, 1 / 16]
    got = pool_stats(responses[:4], proxy[0].tolist(), 2, gold[0].tolist())
    assert got.expected_reward == pytest.approx(15 / 16 * 0.5 + 1 / 16 * 0.2)
    assert got.expected_gold == pytest.approx(p_bon[0] * 0.5 + p_bon[2] * 2.0)
    assert got.kl == pytest.approx(sum(p * math.log(p / q) for p, q in zip(p_bon, [0.5, 0.25, 0.25])))


def test_curve_sizes_are_powers_of_two_up_to_n():
    assert curve_sizes(1) == [1] and curve_sizes(8) == [1, 2, 4, 8] and curve_sizes(6) == [1, 2, 4, 6]


def test_reward_rises_with_n_and_the_measured_kl_stays_below_the_bound(tiny_folder, prompt_file, tmp_path):
    cfg = BoNConfig(model=str(tiny_folder), prompts=str(prompt_file), out=str(tmp_path / "bon"), n=8, pool=16,
                    device="cpu", sampling=SamplingConfig(max_new_tokens=8))
    out = run_bon(cfg, digits)
    meta = json.loads((out / "tether.json").read_text())
    curve = meta["curve"]
    assert [c["n"] for c in curve] == [1, 2, 4, 8]
    rewards = [c["expected_reward"] for c in curve]
    assert all(b > a for a, b in zip(rewards, rewards[1:])), rewards
    assert curve[0]["kl_measured"] == pytest.approx(0.0, abs=1e-12)  # best of 1 is π_ref itself
    for c in curve[1:]:
        assert 0 < c["kl_measured"] <= c["kl_bound"] == pytest.approx(math.log(c["n"]) - (c["n"] - 1) / c["n"])
    m = meta["metrics"]
    assert m["bon/reward"] > m["base/reward"] and m["bon/kl_bound"] == pytest.approx(bon_kl(8))
    rows = [json.loads(line) for line in (out / "responses.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in rows] == PROMPTS and [r["id"] for r in rows] == list(range(6))
    assert all(r["reward"] == pytest.approx(digits([], [r["response"]])[0]) for r in rows)
    assert sum(r["reward"] for r in rows) / len(rows) == pytest.approx(m["bon/reward"])


def test_the_sampling_group_reaches_the_sampler(tiny_folder, prompt_file, tmp_path):
    """top-k 1 is greedy: each pool is one response repeated, so best-of-N moves nothing (KL 0); a stop string
    ends a response at the token that completes it, the tokens sampled before it unchanged."""
    greedy = BoNConfig(model=str(tiny_folder), prompts=str(prompt_file), out=str(tmp_path / "greedy"), n=2, pool=4,
                       device="cpu", sampling=SamplingConfig(max_new_tokens=8, top_k=1))
    m = json.loads((run_bon(greedy, digits) / "tether.json").read_text())["metrics"]
    assert m["bon/distinct_share"] == 0.25 and m["bon/kl_measured"] == pytest.approx(0.0, abs=1e-12)

    def first_samples(name: str, **sampling) -> list[str]:
        cfg = BoNConfig(model=str(tiny_folder), prompts=str(prompt_file), out=str(tmp_path / name), n=1, pool=1,
                        device="cpu", sampling=SamplingConfig(max_new_tokens=12, **sampling))
        lines = (run_bon(cfg, digits) / "responses.jsonl").read_text().splitlines()
        return [json.loads(line)["response"] for line in lines]

    whole = first_samples("whole")
    stop = whole[0].strip()[len(whole[0].strip()) // 2]  # a character from the middle of the first response
    cut = first_samples("cut", stop_strings=stop)
    assert all(w.startswith(c) for c, w in zip(cut, whole)) and len(cut[0]) < len(whole[0])
    assert all(stop in c for c, w in zip(cut, whole) if c != w)


def test_cli_bon_with_a_verifiable_reward(tiny_folder, prompt_file, tmp_path):
    out = tmp_path / "cli"
    result = CliRunner().invoke(main, ["bon", "--model", str(tiny_folder), "--prompts", str(prompt_file), "--reward",
                                       "exact_match:1.0,format:0.2", "--n", "2", "--pool", "4", "--limit", "3",
                                       "--max-new-tokens", "6", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "bon/kl_bound" in result.output and "best-of-2 responses in" in result.output
    assert len((out / "responses.jsonl").read_text().splitlines()) == 3
    bad = CliRunner().invoke(main, ["bon", "--model", "m", "--prompts", "p", "--n", "8", "--pool", "4"])
    assert bad.exit_code != 0 and "pool must be at least n" in bad.output
