"""bench/compare_trl.py's shared set-up: what makes the tether and TRL runs see the same work."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("compare_trl", ROOT / "bench" / "compare_trl.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["compare_trl"] = module
    spec.loader.exec_module(module)
    return module


def test_the_word_tokenizer_gives_back_the_ids_the_text_was_made_of(bench, tmp_path):
    tok = bench.make_tokenizer(tmp_path)
    assert len(tok) == bench.VOCAB and tok.eos_token_id == 0 and tok.pad_token_id == 1
    assert tok("w2 w511 w7")["input_ids"] == [2, 511, 7]
    # prompt + completion tokenise the same together and apart, so TRL's prefix check and tether's
    # separate prompt / response encoding see the same ids
    assert tok("w5 w6" + " w7 w8")["input_ids"] == tok("w5 w6")["input_ids"] + tok(" w7 w8")["input_ids"]


def test_every_row_is_a_prompt_a_completion_and_eos_in_tethers_encoding(bench, tmp_path):
    from tether.data.collate import encode_pairs, encode_sft

    tok = bench.make_tokenizer(tmp_path)
    d = bench.make_data(6)
    assert d["label"] == [True, False] * 3
    rec = bench._Rec
    rows, count = encode_sft([rec(prompt=p, completion=c) for p, c in zip(d["prompt"], d["chosen"])], tok, 65)
    assert count.truncated == count.dropped == 0
    assert all(len(r.input_ids) == bench.PROMPT_LEN + bench.COMPLETION_LEN + 1 == 65 for r in rows)
    assert all(r.input_ids[-1] == tok.eos_token_id and r.labels[: bench.PROMPT_LEN] == [-100] * 16 for r in rows)
    pairs, _ = encode_pairs([rec(prompt=p, chosen=c, rejected=r) for p, c, r in
                             zip(d["prompt"], d["chosen"], d["rejected"])], tok, 65)
    assert all(p.prompt_len == 16 and len(p.chosen) == len(p.rejected) == 65 and p.chosen != p.rejected for p in pairs)


def test_model_flops_per_step_by_hand(bench):
    """6·N per trained token, 2·N per forward token; N = 1000 parameters, 8 rows of 65 tokens."""
    a = type("A", (), {"batch": 8, "rl_batch": 16, "new_tokens": 40})()
    n, lens = 1000, bench.make_data(2)["lens"]  # the lengths the data say: prompts of 16, rows of 65 tokens
    assert lens == {"prompt": 16, "row": 65, "max_len": 65}
    assert bench.flops_per_step("sft", n, a, lens) == 6 * 8 * 65 * n
    assert bench.flops_per_step("dpo", n, a, lens) == (6 + 2) * 2 * 8 * 65 * n  # train both sides + reference forward
    assert bench.flops_per_step("kto", n, a, lens) == (6 + 2 + 2 + 2) * 8 * 65 * n  # + the mismatched row through both
    assert bench.flops_per_step("grpo", n, a, lens) == (2 + 2 + 6) * 16 * (16 + 40) * n  # generate, reference, train
    assert bench.items_per_step("sft", a, lens) == 8 * 65 and bench.items_per_step("grpo", a, lens) == 16


def test_the_diversity_reward_is_the_share_of_distinct_words(bench):
    assert bench.diversity_reward([], ["w1 w1 w2 w3", "", "w4"]) == [0.75, 0.0, 1.0]


@pytest.mark.slow
def test_smollm2_rows_are_hh_chat_prompts_and_replies_of_one_length(bench, smollm2_folder):
    """The real-model data: chat-template prompts of HH_PROMPT tokens, replies of HH_COMPLETION tokens closed by the
    end of turn, so tether encodes every row whole (no truncation) at the data's max_len."""
    from tether.data.collate import encode_pairs, prompt_ids
    from tether.models import load_tokenizer

    tok = load_tokenizer(smollm2_folder)
    d = bench.make_hh_data(6, smollm2_folder)
    lo, hi = bench.HH_PROMPT
    assert all(p.startswith("<|im_start|>") and p.endswith("<|im_start|>assistant\n") for p in d["prompt"])
    assert all(lo <= len(prompt_ids(tok, p)) <= hi for p in d["prompt"])
    assert all(c.endswith(tok.eos_token) and c.count(tok.eos_token) == 1 for c in d["chosen"] + d["rejected"])
    pairs, count = encode_pairs([bench._Rec(prompt=p, chosen=c, rejected=r) for p, c, r in
                                 zip(d["prompt"], d["chosen"], d["rejected"])], tok, d["lens"]["max_len"])
    assert len(pairs) == 6 and count.truncated == count.dropped == 0
    assert all(abs(len(s) - p.prompt_len - 1 - bench.HH_COMPLETION) <= 2 for p in pairs for s in (p.chosen, p.rejected))
