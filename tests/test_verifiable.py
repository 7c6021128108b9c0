"""Verifiable rewards (tether.verifiable) and their reward-spec strings (tether.rewards) against hand computations."""

from __future__ import annotations

import pytest
import torch

from tether.data import load_prompts
from tether.rewards import CombinedReward, GoldReward, load_reward, parse_reward_spec
from tether.verifiable import answer_map, combine, exact_match_rewards, format_rewards, overlong_penalty


def test_exact_match_reads_the_last_final_answer_in_either_form():
    responses = ["3 plus 4 is 7. #### 7", "The answer is 7.", "#### 6 ... #### 7", "7", "#### 8", "The answer is 1,000"]
    answers = ["7", "7", "7", "7", "7", "1000"]
    # bare "7" states no final answer: 0; a GSM8K-style reference "... #### 7" works the same
    assert exact_match_rewards(responses, answers) == [1.0, 1.0, 1.0, 0.0, 0.0, 1.0]
    assert exact_match_rewards(["#### 72"], ["She has 72 in all. #### 72"]) == [1.0]
    with pytest.raises(ValueError, match="2 responses but 1 answers"):
        exact_match_rewards(["a", "b"], ["1"])


def test_format_pays_for_a_stated_answer_right_or_wrong():
    assert format_rewards(["#### 5", "The answer is -3", "it is 5", "", "the answer is 2"]) == [1.0, 1.0, 0.0, 0.0, 1.0]


@pytest.mark.parametrize("length, expected", [
    (0, 0.0), (48, 0.0),  # up to L_max − L_cache = 64 − 16 = 48: no penalty
    (52, -0.25),  # (48 − 52)/16
    (56, -0.5), (64, -1.0),  # at L_max: (48 − 64)/16 = −1
    (65, -1.0),  # beyond L_max
])
def test_overlong_penalty_is_dapo_eq_13(length, expected):
    assert overlong_penalty(length, 64, 16) == pytest.approx(expected)


def test_overlong_penalty_rejects_a_cache_larger_than_the_budget():
    with pytest.raises(ValueError, match="cache_tokens"):
        overlong_penalty(3, 8, 9)
    with pytest.raises(ValueError, match="cache_tokens"):
        overlong_penalty(3, 8, 0)


def test_combine_is_the_weighted_sum():
    # term 1: (1, 0, 1), term 2: (1, 1, 0); weights 1.0 and 0.2 -> (1.2, 0.2, 1.0)
    assert combine([[1, 0, 1], [1, 1, 0]], [1.0, 0.2]) == pytest.approx([1.2, 0.2, 1.0])
    with pytest.raises(ValueError, match="2 reward terms but 1 weights"):
        combine([[1], [1]], [1.0])
    with pytest.raises(ValueError, match="same responses"):
        combine([[1, 2], [1]], [1.0, 1.0])


def test_answer_map_from_prompt_records_and_dicts(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a", "answer": "3"}\n{"prompt": "b"}\n{"prompt": "c", "answer": 4}\n')
    assert answer_map(load_prompts(path)) == {"a": "3", "c": "4"}
    assert answer_map([{"prompt": "a", "answer": "3"}, {"prompt": "a", "answer": "3"}]) == {"a": "3"}
    with pytest.raises(ValueError, match="two different answers"):
        answer_map([{"prompt": "a", "answer": "3"}, {"prompt": "a", "answer": "4"}])


def test_reward_spec_strings_parse_weights_parameters_and_paths():
    assert parse_reward_spec("exact_match:1.0,format:0.2") == [("exact_match", 1.0), ("format", 0.2)]
    assert parse_reward_spec("gold") == [("gold", 1.0)]
    assert parse_reward_spec("rm:/runs/rm") == [("rm:/runs/rm", 1.0)]  # "/runs/rm" is no weight
    assert parse_reward_spec("rm:/runs/rm:0.5, overlong(max=64,cache=16):-1") == [
        ("rm:/runs/rm", 0.5), ("overlong(max=64,cache=16)", -1.0)]
    with pytest.raises(ValueError, match="empty term"):
        parse_reward_spec("gold,")


def test_load_reward_combines_verifiable_terms_with_weights():
    reward = load_reward("exact_match:1.0,format:0.2", answers={"p": "7", "q": "2"})
    assert isinstance(reward, CombinedReward)
    got = reward(["p", "p", "q", "q"], ["#### 7", "The answer is 8", "2", "#### 2"])
    assert got.tolist() == pytest.approx([1.2, 0.2, 0.0, 1.2])
    parts = reward.components(["p"], ["#### 7"])
    assert {k: v.tolist() for k, v in parts.items()} == {"exact_match": [1.0], "format": [1.0]}
    # a callable joins a weighted sum as a (spec, weight) pair
    mixed = load_reward([("format", 2.0), (lambda p, r: [len(x) for x in r], 0.5)])
    assert mixed(["x"], ["#### 1"]).tolist() == pytest.approx([2.0 + 0.5 * 6])
    assert isinstance(load_reward("gold"), GoldReward)  # a bare spec is not wrapped


def test_verifiable_rewards_fail_loudly_without_what_they_need():
    with pytest.raises(ValueError, match="needs reference answers"):
        load_reward("exact_match")
    with pytest.raises(KeyError, match="no reference answer"):
        load_reward("exact_match", answers={"p": "1"})(["other"], ["#### 1"])
    with pytest.raises(ValueError, match="tokenizer"):
        load_reward("overlong(max=8)")
    with pytest.raises(ValueError, match="takes"):
        load_reward("format(x=1)")
    with pytest.raises(FileNotFoundError, match="exact_match"):
        load_reward("exact_matc")


def test_overlong_reward_counts_tokens_and_takes_the_budget_from_the_stage(tiny_folder):
    from tether.models import load_tokenizer

    tok = load_tokenizer(tiny_folder)
    texts = [" 3 plus 4 is 7.", " 3 plus 4 is 7. #### 7 #### 7 #### 7"]
    lengths = [len(tok(t, add_special_tokens=False)["input_ids"]) for t in texts]
    budget = lengths[1]  # L_max = the longer one's length, L_cache = L_max // 5 by default
    cache = max(1, budget // 5)
    reward = load_reward("overlong", tokenizer=tok, max_new_tokens=budget)
    expected = [overlong_penalty(n, budget, cache) for n in lengths]
    assert reward(["p", "p"], texts).tolist() == pytest.approx(expected)
    assert expected[1] == pytest.approx(-1.0) and expected[0] == 0.0
    explicit = load_reward("overlong(max=100,cache=10)", tokenizer=tok)
    assert explicit(["p"], texts[:1]).tolist() == [0.0]
    assert torch.is_tensor(explicit(["p"], texts[:1]))
