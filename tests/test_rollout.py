"""Generation: left padding gives the same continuation as an unpadded prompt; seeds reproduce."""

from __future__ import annotations

import torch

from tether.models import load_model, load_tokenizer
from tether.rollout import generate


def test_batched_left_padded_greedy_equals_one_at_a_time(tiny_folder):
    model, tok = load_model(tiny_folder), load_tokenizer(tiny_folder)
    prompts = ["\n\nHuman: What is 3 plus 4?\n\nAssistant:", "\n\nHuman: Hi\n\nAssistant:"]
    batched = generate(model, tok, prompts, max_new_tokens=8, greedy=True)
    alone = [generate(model, tok, [p], max_new_tokens=8, greedy=True)[0] for p in prompts]
    assert batched == alone
    # greedy means argmax of the model's next-token distribution
    ids = tok(prompts[1], return_tensors="pt").input_ids
    with torch.no_grad():
        first = model(ids).logits[0, -1].argmax().item()
    assert batched[1].startswith(tok.decode([first], skip_special_tokens=True))
    assert first != tok.eos_token_id or batched[1] == ""
    assert tok.padding_side == "right" and model.training is False


def test_sampling_is_reproducible_by_seed_and_leaves_global_rng_alone(tiny_folder):
    model, tok = load_model(tiny_folder), load_tokenizer(tiny_folder)
    prompts = ["\n\nHuman: What is 1 plus 1?\n\nAssistant:"] * 4
    torch.manual_seed(7)
    state = torch.get_rng_state()
    a = generate(model, tok, prompts, max_new_tokens=6, seed=1)
    assert torch.equal(torch.get_rng_state(), state)
    assert a == generate(model, tok, prompts, max_new_tokens=6, seed=1)
    assert a != generate(model, tok, prompts, max_new_tokens=6, seed=2)
