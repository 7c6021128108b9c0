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


def test_rollout_rows_score_the_sampled_tokens_exactly(tiny_folder):
    """The packed rows hold the sampled tokens, and their log-probs (right-padded, re-scored)
    equal the generator's own at the sampling temperature."""
    from tether.rollout import rollout, sample
    from tether.scoring import response_logprobs

    model, tok = load_model(tiny_folder), load_tokenizer(tiny_folder)
    prompts = ["\n\nHuman: What is 3 plus 4?\n\nAssistant:", "\n\nHuman: Hi\n\nAssistant:"]
    batch = rollout(model, tok, prompts, max_new_tokens=8, temperature=0.7, seed=3)
    pairs = sample(model, tok, prompts, max_new_tokens=8, temperature=0.7, seed=3)
    for b, (p, r) in enumerate(pairs):
        assert batch.mask[b].sum().item() == len(r)
        assert batch.input_ids[b, : len(p) + len(r)].tolist() == p + r
        assert batch.ended[b].item() == (bool(r) and r[-1] == tok.eos_token_id)
    with torch.no_grad():
        logp = response_logprobs(model, batch, temperature=0.7)  # (B, T-1)
        for b, (p, r) in enumerate(pairs):  # one row at a time, no padding at all
            logits = model(torch.tensor([p + r])).logits[0, len(p) - 1 : -1] / 0.7
            alone = torch.log_softmax(logits, -1).gather(1, torch.tensor(r)[:, None]).squeeze(1)
            assert torch.allclose(logp[b][batch.mask[b].bool()], alone, atol=1e-5)


def test_stop_strings_cut_the_response_and_count_as_ended(tiny_folder):
    from tether.rollout import _cut_at_stop

    tok = load_tokenizer(tiny_folder)
    ids = tok(" 3 plus 4 is 7. #### 7", add_special_tokens=False)["input_ids"]
    cut, stopped = _cut_at_stop(tok, ids, ["####"])
    assert stopped and tok.decode(cut).endswith("####") and len(cut) < len(ids)
    assert _cut_at_stop(tok, ids, ["never"]) == (ids, False)


def test_sampling_ignores_the_models_own_generation_config(tiny_folder):
    """A hub model ships a generation_config (repetition penalty, top-k, ...); transformers fills every option a
    call leaves unset from it, which would bias every KL estimate. tether samples with its own settings only."""
    from transformers import GenerationConfig

    from tether.rollout import sample

    model, tok = load_model(tiny_folder), load_tokenizer(tiny_folder)
    prompts = ["\n\nHuman: What is 1 plus 2?\n\nAssistant:", "\n\nHuman: What is 3 plus 3?\n\nAssistant:"]
    plain = sample(model, tok, prompts, max_new_tokens=10, seed=4)
    hub = GenerationConfig(repetition_penalty=3.0, top_k=2, min_p=0.3, no_repeat_ngram_size=1, do_sample=False)
    model.generation_config = hub
    assert sample(model, tok, prompts, max_new_tokens=10, seed=4) == plain
    assert model.generation_config is hub  # left as it was

    def generate_with(config):  # transformers itself, with the model's generation_config set to ``config``
        model.generation_config = config
        torch.manual_seed(4)
        with torch.no_grad():
            return model.generate(**enc, max_new_tokens=10, do_sample=True, pad_token_id=tok.pad_token_id)

    tok.padding_side = "left"
    enc = tok(prompts, return_tensors="pt", padding=True)
    assert not torch.equal(generate_with(hub), generate_with(GenerationConfig()))  # so the check above bites
