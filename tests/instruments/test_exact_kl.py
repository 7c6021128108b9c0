"""The exact per-token KL against brute-force enumeration of every sequence of a tiny vocabulary."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from tether.instruments.exact_kl import sequence_kl, summarise

EOS, L, PROMPT = 2, 4, [1, 0]  # vocabulary {0, 1, EOS}; responses of at most L tokens


def _model(seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=3, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=2, max_position_embeddings=16, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # sharpen the random next-token distributions so the two models differ by a real KL
        model.lm_head.weight.mul_(40.0)
    return model


def _all_responses() -> list[list[int]]:
    """Every response the truncated process can produce: k non-EOS tokens then EOS (k < L), or L non-EOS tokens."""
    out = [list(body) + [EOS] for k in range(L) for body in itertools.product((0, 1), repeat=k)]
    return out + [list(body) for body in itertools.product((0, 1), repeat=L)]


@torch.no_grad()
def _seq_logprob(model, response: list[int]) -> float:
    ids = torch.tensor([PROMPT + response])
    logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)  # (T-1, V)
    return sum(logp[len(PROMPT) - 1 + t, tok].item() for t, tok in enumerate(response))


def test_exact_kl_equals_brute_force_enumeration():
    policy, ref = _model(0), _model(1)
    responses = _all_responses()
    assert len(responses) == 31
    logp = torch.tensor([_seq_logprob(policy, y) for y in responses], dtype=torch.float64)
    ref_logp = torch.tensor([_seq_logprob(ref, y) for y in responses], dtype=torch.float64)
    p = logp.exp()
    assert p.sum().item() == pytest.approx(1.0, abs=1e-5)  # the enumeration is complete
    brute = (p * (logp - ref_logp)).sum().item()  # KL(π ‖ π_ref) = Σ_y π(y) log π(y)/π_ref(y)
    assert brute > 0.3  # the two models really differ

    kl = sequence_kl(policy, ref, [(PROMPT, y) for y in responses], pad_id=0)
    # E_{y~π}[Σ_t KL_t] equals the sequence KL exactly (the chain rule), and so do E[k1] and E[k3]
    assert (p * kl.exact.double()).sum().item() == pytest.approx(brute, rel=1e-4)
    assert (p * kl.k1.double()).sum().item() == pytest.approx(brute, rel=1e-4)
    assert (p * kl.k3.double()).sum().item() == pytest.approx(brute, rel=1e-4)
    assert torch.all(kl.exact >= -1e-6) and torch.all(kl.k3 >= -1e-6)  # never negative, unlike k1
    assert (kl.k1 < 0).any()
    assert kl.tokens.tolist() == [len(y) for y in responses]

    # sampled responses: every unbiased estimate's mean lies within 4 standard errors of the truth
    g = torch.Generator().manual_seed(0)
    draws = torch.multinomial(p.float(), 3000, replacement=True, generator=g)
    sampled = sequence_kl(policy, ref, [(PROMPT, responses[i]) for i in draws.tolist()], pad_id=0, batch_size=512)
    s = summarise(sampled)
    for name in ("exact", "k1", "k3"):
        assert abs(s[f"kl/{name}"] - brute) < 4 * s[f"kl/{name}_stderr"], (name, s[f"kl/{name}"], brute)
    # the exact sum uses the whole distribution at each step: lower variance than k1
    assert s["kl/exact_std"] < s["kl/k1_std"]
    assert s["kl/responses"] == 3000


def test_identical_models_have_zero_kl_from_every_estimate():
    m = _model(0)
    kl = sequence_kl(m, m, [(PROMPT, y) for y in _all_responses()], pad_id=0)
    for name in ("exact", "k1", "k2", "k3"):
        assert torch.allclose(getattr(kl, name), torch.zeros(31), atol=1e-6)
    s = summarise(kl)
    assert math.isfinite(s["kl/exact_stderr"])
