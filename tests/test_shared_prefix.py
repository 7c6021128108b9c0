"""Rows that share a prompt (a GRPO group, DPO's chosen and rejected) run it once: the same log-probs, entropies and
gradients as the plain pass (tether.scoring.shared_prefix_hidden)."""

from __future__ import annotations

import pytest
import torch

import tether.scoring as scoring
from tether.losses.lm import IGNORE_INDEX
from tether.models import load_model


def _rows(vocab: int, seed: int = 0):
    """A group of 4 rows on one 12-token prompt, 2 rows on a 7-token prompt, 1 row on its own; responses of 3 to 9
    tokens, right-padded."""
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(3, vocab, (12,), generator=g), torch.randint(3, vocab, (7,), generator=g),
               torch.randint(3, vocab, (10,), generator=g)]
    spec = [(0, 9), (0, 3), (0, 6), (0, 5), (1, 8), (1, 4), (2, 6)]
    width = max(len(prompts[p]) + n for p, n in spec)
    ids = torch.ones(len(spec), width, dtype=torch.long)
    mask, labels = torch.zeros_like(ids), torch.full_like(ids, IGNORE_INDEX)
    for r, (p, n) in enumerate(spec):
        row = torch.cat([prompts[p], torch.randint(3, vocab, (n,), generator=g)])
        ids[r, : len(row)], mask[r, : len(row)] = row, 1
        labels[r, len(prompts[p]) : len(row)] = row[len(prompts[p]):]
    return ids, mask, labels


def _forced(monkeypatch, params, shared: bool) -> list:
    """Shared prompts forced on (any saving pays) or off, gradients cleared; returns the list that records what
    each call of shared_prefix_hidden returned (None: the plain pass ran)."""
    monkeypatch.setattr(scoring, "SHARED_PREFIX_MIN_TOKENS", 0 if shared else 10**9)
    calls = []
    real = scoring.shared_prefix_hidden
    monkeypatch.setattr(scoring, "shared_prefix_hidden", lambda *a: calls.append(r := real(*a)) or r)
    for p in params:
        p.grad = None
    return calls


def _pass(model, params, ids, mask, labels, shared: bool, monkeypatch, summed=False):
    calls = _forced(monkeypatch, params, shared)
    entropy = torch.zeros(ids.shape[0], ids.shape[1] - 1)
    logp, kept, _ = scoring.labelled_pass(model, ids, mask, labels, 0.9, entropy=entropy, summed=summed)
    (logp.sum() if summed else (logp * torch.linspace(0.5, 1.5, logp.shape[1])).sum()).backward()
    assert (calls[0] is not None) == shared  # the path asked for is the one taken
    return logp.detach(), kept, entropy, [p.grad.clone() for p in params]


@pytest.mark.parametrize("summed", [False, True])
def test_shared_prompts_give_the_plain_pass_log_probs_and_gradients(tiny_folder, monkeypatch, summed):
    model = load_model(tiny_folder).eval()
    params = [p for p in model.parameters() if p.requires_grad]
    ids, mask, labels = _rows(model.config.vocab_size)
    plain = _pass(model, params, ids, mask, labels, False, monkeypatch, summed)
    shared = _pass(model, params, ids, mask, labels, True, monkeypatch, summed)
    torch.testing.assert_close(shared[0], plain[0], rtol=1e-5, atol=1e-5)
    assert torch.equal(shared[1], plain[1])
    torch.testing.assert_close(shared[2], plain[2], rtol=1e-5, atol=1e-5)
    for a, b in zip(shared[3], plain[3]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("family", ["qwen3", "gpt2", "lora"])
def test_grouped_query_attention_learned_positions_and_lora_share_prompts_exactly(tiny_folder, monkeypatch, family):
    from transformers import AutoConfig, AutoModelForCausalLM

    if family == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(load_model(tiny_folder).eval(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                                           init_lora_weights=False))
    else:  # query/key norms and grouped-query attention; learned positions, as long as the rows (22 tokens)
        config = AutoConfig.for_model(family, vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                      max_position_embeddings=128, pad_token_id=1) if family == "qwen3" else \
            AutoConfig.for_model(family, vocab_size=300, n_embd=32, n_layer=2, n_head=4, n_positions=22, pad_token_id=1)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config).eval()
    params = [p for p in model.parameters() if p.requires_grad]
    ids, mask, labels = _rows(300)
    plain = _pass(model, params, ids, mask, labels, False, monkeypatch)
    shared = _pass(model, params, ids, mask, labels, True, monkeypatch)
    torch.testing.assert_close(shared[0], plain[0], rtol=1e-5, atol=1e-5)
    for a, b in zip(shared[3], plain[3]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_prompts_are_shared_only_where_it_pays_and_can_be_done(tiny_folder):
    model = load_model(tiny_folder).eval()
    ids, mask, labels = _rows(model.config.vocab_size)
    hf = model
    starts = scoring.prompt_lengths(labels)
    assert starts == [12, 12, 12, 12, 7, 7, 10]
    assert scoring.shared_prefix_hidden(model, hf, ids, mask, starts) is None  # 7·21 − 3·12 − 7·9 = 48 tokens spared
    long_ids = torch.cat([ids[:, :1].expand(-1, 300), ids], 1)  # the same 300 tokens before every prompt
    long_mask, long_labels = torch.cat([mask[:, :1].expand(-1, 300), mask], 1), \
        torch.cat([torch.full((len(ids), 300), IGNORE_INDEX), labels], 1)
    long_starts = scoring.prompt_lengths(long_labels)
    assert scoring.shared_prefix_hidden(model, hf, long_ids, long_mask, long_starts) is not None
    whole = [int(m.sum()) for m in long_mask]  # a "prompt" that is the whole row leaves nothing to run after it
    assert scoring.shared_prefix_hidden(model, hf, long_ids, long_mask, whole) is None
    model.gradient_checkpointing_enable()
    assert scoring.shared_prefix_hidden(model, hf, long_ids, long_mask, long_starts) is None


@pytest.mark.parametrize("family", ["llama", "lora"])
def test_a_reward_model_scores_pairs_the_same_with_their_prompt_run_once(tiny_folder, monkeypatch, family):
    from tether.models import load_tokenizer
    from tether.models.reward import load_reward_model, raw_scores

    tokenizer = load_tokenizer(tiny_folder)
    torch.manual_seed(0)
    model = load_reward_model(tiny_folder, tokenizer)
    if family == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], modules_to_save=["score"],
                                                 init_lora_weights=False))
    model.config.pad_token_id = tokenizer.eos_token_id  # hub-style: rows ending in EOS = pad are read there all the same
    ids, mask, labels = _rows(model.config.vocab_size)
    ends = mask.sum(1) - 1
    ids[torch.arange(len(ids))[::2], ends[::2]] = tokenizer.eos_token_id
    ids[mask == 0] = tokenizer.eos_token_id
    starts = scoring.prompt_lengths(labels)
    params = [p for p in model.parameters() if p.requires_grad]

    def scores(shared: bool):
        calls = _forced(monkeypatch, params, shared)
        r = raw_scores(model, ids, mask, starts)
        (r * torch.linspace(-1, 1, len(r))).sum().backward()
        assert (calls[0] is not None) == shared
        return r.detach(), [p.grad.clone() for p in params]

    plain, shared = scores(False), scores(True)
    torch.testing.assert_close(shared[0], plain[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(plain[0], raw_scores(model, ids, mask).detach(), rtol=0, atol=0)  # no lengths: plain
    for a, b in zip(shared[1], plain[1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_a_long_prompt_beside_a_long_response_stays_inside_a_learned_position_table(monkeypatch):
    """The response pass is as wide as the longest response; a row with a long prompt and a short response pads
    past the table's end (GPT-2: 18 positions, rows of 18 tokens) and must still run, with the plain pass's states."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("gpt2", vocab_size=300, n_embd=32, n_layer=2, n_head=4, n_positions=18,
                                  pad_token_id=1, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    short, long = torch.randint(3, 300, (3,)), torch.randint(3, 300, (15,))
    ids = torch.stack([torch.cat([short, torch.randint(3, 300, (15,))]) for _ in range(2)]
                      + [torch.cat([long, torch.randint(3, 300, (3,))]) for _ in range(10)])
    monkeypatch.setattr(scoring, "SHARED_PREFIX_MIN_TOKENS", 0)
    hidden = scoring.shared_prefix_hidden(model, model, ids, torch.ones_like(ids), [3] * 2 + [15] * 10)
    assert hidden is not None
    torch.testing.assert_close(hidden, model.transformer(input_ids=ids).last_hidden_state, rtol=1e-5, atol=1e-5)
