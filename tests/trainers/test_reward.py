"""Reward models: metrics against hand computations, aggregation, and the stage end to end."""

from __future__ import annotations

import json
import math

import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForSequenceClassification

from tether.cli import main
from tether.instruments.rm_eval import accuracy, expected_calibration_error, length_breakdown, rm_report, spearman
from tether.losses import bradley_terry_loss, reward_centering
from tether.rewards import EnsembleReward, GoldReward, LearnedReward, aggregate, load_reward
from tether.world import format_prompt


def test_bradley_terry_and_centring_closed_forms():
    # Δ = 0 gives −log σ(0) = log 2; a margin of 1 on Δ = 1 gives log 2 again
    assert bradley_terry_loss(torch.tensor([0.3]), torch.tensor([0.3])).loss.item() == pytest.approx(math.log(2))
    assert bradley_terry_loss(torch.tensor([2.0]), torch.tensor([1.0]), torch.tensor([1.0])).loss.item() == pytest.approx(math.log(2))
    assert reward_centering(torch.tensor([1.0, 2.0]), torch.tensor([1.0, -4.0])).item() == pytest.approx((4 + 4) / 2)


def test_aggregations_by_hand():
    scores = torch.tensor([[1.0, 0.0], [2.0, 0.0], [6.0, 3.0]])  # 3 members, 2 responses
    assert aggregate(scores, "mean").tolist() == [3.0, 1.0]
    assert aggregate(scores, "min").tolist() == [1.0, 0.0]
    # uwo: mean − λ·Var with Var = mean of squared deviations: ((−2)² + (−1)² + 3²)/3 = 14/3 and (1 + 1 + 4)/3 = 2
    assert aggregate(scores, "uwo", uwo_lambda=0.5).tolist() == pytest.approx([3 - 7 / 3, 1 - 1])
    with pytest.raises(ValueError, match="aggregation"):
        aggregate(scores, "median")
    ens = EnsembleReward([lambda p, r: [1.0, 5.0], lambda p, r: [3.0, 1.0]], "min")
    assert ens(["a", "b"], ["x", "y"]).tolist() == [1.0, 1.0]


def test_rm_metrics_by_hand():
    rc, rr = torch.tensor([1.0, 0.0, 2.0, 0.5]), torch.tensor([0.0, 0.0, 3.0, 0.0])
    assert accuracy(rc, rr) == pytest.approx((1 + 0.5 + 0 + 1) / 4)  # the tie counts half
    # one pair, Δ = log 3: p = 0.75, so confidence 0.75 and correct → ECE = |1 − 0.75|
    assert expected_calibration_error(torch.tensor([math.log(3)]), torch.tensor([0.0])) == pytest.approx(0.25)
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    lb = length_breakdown(torch.tensor([1.0, 1.0]), torch.tensor([0.0, 0.0]), [10, 2], [2, 10], [True, True])
    assert lb["rm_prefers_longer"] == 0.5 and lb["labels_prefer_longer"] == 0.5 and lb["accuracy_chosen_longer"] == 1.0
    report = rm_report(rc, rr, [3, 3, 3, 3], [3, 3, 3, 3], [1.0, 0.0, 0.0, 1.0], [0.0, 1.0, 1.0, 0.0])
    assert report["rm/gold_accuracy"] == pytest.approx((1 + 0.5 + 1 + 1) / 4)


def test_gold_reward_through_the_interface():
    reward = load_reward("gold")
    assert isinstance(reward, GoldReward)
    prompt = format_prompt("What is 2 plus 3?")
    assert reward([prompt, prompt], [" 2 plus 3 is 5. #### 5", " 2 plus 3 is 6. #### 6"]).tolist() == [1.5, -1.0]
    assert load_reward(lambda p, r: [len(x) for x in r])(["a"], ["xyz"]).tolist() == [3.0]
    with pytest.raises(FileNotFoundError, match="reward-model folder"):
        load_reward("no/such/rm")


@pytest.fixture
def prefs_file(tmp_path):
    rows = []
    for a in range(12):
        for b in range(12):
            right, wrong = a + b, a + b + 1 + (a % 3)
            rows.append({"prompt": format_prompt(f"What is {a} plus {b}?"), "chosen": f" {a} plus {b} is {right}. #### {right}",
                         "rejected": f" {a} plus {b} is {wrong}. #### {wrong}", "gold_chosen": 1.5, "gold_rejected": -1.0,
                         "margin": 0.5})
    path = tmp_path / "prefs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.slow
def test_rm_stage_learns_saves_a_plain_transformers_model_and_serves_normalised_rewards(tmp_path, tiny_folder, prefs_file):
    out = tmp_path / "rm"
    r = CliRunner().invoke(main, ["rm", "--model", str(tiny_folder), "--data", str(prefs_file), "--out", str(out),
                                  "--steps", "60", "--batch-size", "16", "--lr", "3e-3", "--warmup-steps", "5",
                                  "--eval-every", "0", "--save-every", "0", "--norm-prompts", "16",
                                  "--margin-field", "margin"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    meta = json.loads((out / "tether.json").read_text())
    m = meta["metrics"]
    assert meta["stage"] == "rm" and m["eval/rm/accuracy"] > 0.7 and m["eval/rm/gold_accuracy"] == m["eval/rm/accuracy"]
    assert {"eval/rm/ece", "eval/rm/rm_prefers_longer", "eval/rm/gold_spearman", "rm/norm_gain"} <= set(m)
    # plain transformers loads it and gives the raw score; tether's interface applies gain and bias
    plain = AutoModelForSequenceClassification.from_pretrained(out)
    reward = load_reward(out)
    assert isinstance(reward, LearnedReward)
    prompt, response = format_prompt("What is 1 plus 1?"), " 1 plus 1 is 2. #### 2"
    ids = reward.tokenizer(prompt, return_tensors="pt").input_ids.tolist()[0] + \
        reward.tokenizer(response, add_special_tokens=False).input_ids + [reward.tokenizer.eos_token_id]
    with torch.no_grad():
        raw = plain(input_ids=torch.tensor([ids])).logits[0, 0].item()
    gain, bias = plain.config.reward_gain, plain.config.reward_bias
    assert reward([prompt], [response]).item() == pytest.approx(gain * raw + bias, abs=1e-4)
    assert load_reward(out, normalise=False)([prompt], [response]).item() == pytest.approx(raw, abs=1e-4)


@pytest.mark.slow
def test_an_ensemble_of_three_trains_and_serves_as_one_reward(tmp_path, tiny_folder, prefs_file):
    out = tmp_path / "ens"
    r = CliRunner().invoke(main, ["rm", "--model", str(tiny_folder), "--data", str(prefs_file), "--out", str(out),
                                  "--ensemble", "3", "--bootstrap", "--aggregation", "uwo", "--steps", "10",
                                  "--batch-size", "8", "--eval-every", "0", "--save-every", "0", "--norm-prompts", "8"],
                           catch_exceptions=False)
    assert r.exit_code == 0, r.output
    meta = json.loads((out / "tether.json").read_text())
    assert meta["stage"] == "rm-ensemble" and meta["members"] == ["member-0", "member-1", "member-2"]
    assert {"eval/ensemble_mean_accuracy", "eval/ensemble_min_accuracy", "eval/ensemble_uwo_accuracy"} <= set(meta["metrics"])
    reward = load_reward(out)
    assert isinstance(reward, EnsembleReward) and reward.aggregation == "uwo" and len(reward.members) == 3
    prompts, responses = [format_prompt("What is 1 plus 1?")] * 2, [" 1 plus 1 is 2. #### 2", " 1 plus 1 is 3. #### 3"]
    members = reward.member_scores(prompts, responses)
    assert members.shape == (3, 2) and not torch.allclose(members[0], members[1])  # seeds differ
    assert torch.allclose(reward(prompts, responses), members.mean(0) - members.var(0, unbiased=False))
    assert torch.allclose(load_reward(out, aggregation="min")(prompts, responses), members.min(0).values)


def test_empty_responses_are_an_error_or_a_counted_skip():
    from tether.data import DataError, load_preferences
    from tether.trainers.reward import nonempty_responses

    records = load_preferences([{"chosen": "\n\nHuman: hi\n\nAssistant: ", "rejected": "\n\nHuman: hi\n\nAssistant: Go"},
                                {"prompt": "P", "chosen": " a", "rejected": " b"}])
    with pytest.raises(DataError, match=r"<memory>:row 1: field 'chosen': empty response.*--skip-invalid"):
        nonempty_responses(records, skip=False)
    assert [r.chosen for r in nonempty_responses(records, skip=True)] == [" a"]


def test_normalisation_passes_over_prompts_with_no_room_for_a_whole_sample(tiny_folder):
    from tether.models import load_tokenizer
    from tether.trainers.reward import RMConfig, normalisation_prompts

    tokenizer = load_tokenizer(tiny_folder)
    short = [format_prompt(f"What is {a} plus 1?") for a in range(5)]
    long = format_prompt(" ".join(f"What is {a} plus {a}?" for a in range(12)))
    n_short, n_long = len(tokenizer(short[0]).input_ids), len(tokenizer(long).input_ids)
    cfg = RMConfig(model="m", data="d", max_len=n_long + 8, norm_max_new_tokens=16, norm_prompts=3)
    assert n_short <= cfg.max_len - 16 < n_long  # the long prompt leaves less than 16 tokens for the sample
    assert normalisation_prompts([long, *short], tokenizer, cfg) == short[:3]
    assert normalisation_prompts([long, *short], tokenizer, RMConfig(model="m", data="d", norm_prompts=0)) == []
    with pytest.raises(ValueError, match="norm_max_new_tokens"):
        normalisation_prompts([long], tokenizer, cfg)
