"""tether.scoring: every log-prob against a direct computation, chunking, eval mode, and the reference kinds."""

from __future__ import annotations

import pytest
import torch

from tether.data.collate import Encoded
from tether.losses.lm import IGNORE_INDEX
from tether.models import LoraConfig, apply_lora, load_model, load_tokenizer
from tether.scoring import (
    Reference,
    eval_mode,
    labelled_rows,
    next_token_logprobs,
    reference_for,
    response_logprobs,
    sequence_logprobs,
    token_nll,
)

PROMPTS = ["\n\nHuman: What is 3 plus 4?\n\nAssistant:", "\n\nHuman: Hi\n\nAssistant:",
           "\n\nHuman: What is 11 plus 10? Say it twice.\n\nAssistant:", "\n\nHuman: 2?\n\nAssistant:"]
ANSWERS = [" 3 plus 4 is 7. #### 7", " Hello", " 21", " 2 plus 2 is 4, and that is all. #### 4"]


@pytest.fixture(scope="module")
def tiny(tiny_folder):
    torch.manual_seed(0)
    return load_model(tiny_folder), load_tokenizer(tiny_folder)


def _rows(tok) -> list[Encoded]:
    pairs = [(tok(p)["input_ids"], tok(a, add_special_tokens=False)["input_ids"] + [tok.eos_token_id])
             for p, a in zip(PROMPTS, ANSWERS)]
    return labelled_rows(pairs)


def _alone(model, row: Encoded, temperature: float = 1.0) -> torch.Tensor:
    """log π of each labelled token of one row, with no padding at all: the direct computation."""
    with torch.no_grad():
        logits = model(torch.tensor([row.input_ids])).logits[0, :-1].float() / temperature  # (T-1, V)
    logp = torch.log_softmax(logits, -1)
    return torch.tensor([logp[t, y].item() for t, y in enumerate(row.labels[1:]) if y != IGNORE_INDEX])


def test_response_logprobs_match_each_row_alone_and_chunks_match_the_whole(tiny):
    from tether.data.collate import pad

    model, tok = tiny
    rows = _rows(tok)
    batch = pad(rows, tok.pad_token_id)
    with torch.no_grad():
        whole = response_logprobs(model, batch, 0.7)  # (B, T-1)
        chunked = response_logprobs(model, batch, 0.7, batch_size=3)
    assert whole.shape == (len(rows), batch["input_ids"].shape[1] - 1)
    assert torch.allclose(whole, chunked, atol=1e-6)
    for b, row in enumerate(rows):
        mask = batch["labels"][b, 1:] != IGNORE_INDEX
        assert torch.allclose(whole[b][mask], _alone(model, row, 0.7), atol=1e-5)
        assert (whole[b][~mask] == 0).all()


def test_response_logprobs_carry_gradient_outside_no_grad(tiny):
    from tether.data.collate import pad

    model, tok = tiny
    logp = response_logprobs(model, pad(_rows(tok), tok.pad_token_id), batch_size=2)
    assert logp.requires_grad
    logp.sum().backward()
    assert any(p.grad is not None for p in model.parameters())
    model.zero_grad(set_to_none=True)


def test_sequence_logprobs_and_token_nll_match_direct_sums(tiny):
    model, tok = tiny
    rows = _rows(tok)
    direct = torch.stack([_alone(model, r).sum() for r in rows])
    one = sequence_logprobs(model, rows, tok.pad_token_id, batch_size=1)
    many = sequence_logprobs(model, rows, tok.pad_token_id, batch_size=3)
    assert one.shape == (len(rows),) and torch.allclose(one, direct, atol=1e-5)
    assert torch.allclose(one, many, atol=1e-6)
    counts = torch.tensor([len(_alone(model, r)) for r in rows])
    avg = sequence_logprobs(model, rows, tok.pad_token_id, batch_size=2, average=True)
    assert torch.allclose(avg, direct / counts, atol=1e-5)
    total, count = token_nll(model, rows, tok.pad_token_id, batch_size=2)
    assert count == int(counts.sum()) and total == pytest.approx(-direct.sum().item(), abs=1e-4)
    assert sequence_logprobs(model, [], tok.pad_token_id, batch_size=2).shape == (0,)


def test_row_scorers_run_in_eval_mode_and_restore_every_module(tiny):
    model, tok = tiny
    seen = []
    hook = model.register_forward_pre_hook(lambda m, a: seen.append(m.training))
    try:
        model.train()
        first = next(iter(model.children()))
        first.eval()  # a submodule in its own mode comes back in it
        sequence_logprobs(model, _rows(tok), tok.pad_token_id, batch_size=2)
        assert seen and not any(seen)
        assert model.training and not first.training
        with eval_mode(model):
            assert not model.training
        assert model.training and not first.training
    finally:
        hook.remove()
        model.eval()


def test_next_token_logprobs_of_uneven_texts_equal_each_text_alone(tiny):
    model, tok = tiny
    cands = [tok(" A", add_special_tokens=False)["input_ids"][0], tok(" B", add_special_tokens=False)["input_ids"][0], 5]
    for side in ("left", "right"):  # the tokenizer's padding side plays no part
        tok.padding_side = side
        got = next_token_logprobs(model, tok, PROMPTS, cands, batch_size=3)
        assert got.shape == (len(PROMPTS), len(cands))
        for i, text in enumerate(PROMPTS):
            with torch.no_grad():
                last = model(torch.tensor([tok(text)["input_ids"]])).logits[0, -1].float()
            assert torch.allclose(got[i], torch.log_softmax(last, -1)[cands], atol=1e-5)
    tok.padding_side = "right"
    # multi-token candidates: each (text, candidate) a row; single-token ones agree with the fast path
    multi = [tok(" yes", add_special_tokens=False)["input_ids"], [cands[0]], [cands[1], cands[0]]]
    got = next_token_logprobs(model, tok, PROMPTS, multi, batch_size=2)
    for i, text in enumerate(PROMPTS):
        ids = tok(text)["input_ids"]
        direct = [_alone(model, Encoded(ids + c, [IGNORE_INDEX] * len(ids) + c)).sum().item() for c in multi]
        assert got[i].tolist() == pytest.approx(direct, abs=1e-5)
    fast = next_token_logprobs(model, tok, PROMPTS, [cands[0]], batch_size=4)
    assert torch.allclose(fast[:, 0], got[:, 1], atol=1e-5)
    # token ids in place of text (a caller that cut a long text)
    ids = [tok(t)["input_ids"] for t in PROMPTS]
    assert torch.allclose(next_token_logprobs(model, tok, ids, cands, batch_size=4),
                          next_token_logprobs(model, tok, PROMPTS, cands, batch_size=4), atol=1e-6)


def test_adapters_off_reference_is_the_base_model(tiny_folder):
    from tether.data.collate import pad

    tok = load_tokenizer(tiny_folder)
    base = load_model(tiny_folder).eval()
    policy = apply_lora(load_model(tiny_folder), LoraConfig(r=4))
    with torch.no_grad():  # move the adapters away from zero, so the policy differs from the base
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    rows = _rows(tok)
    ref = reference_for(policy, str(tiny_folder), "", 4, "cpu")
    assert ref.kind == "adapters_off"
    want = sequence_logprobs(base, rows, tok.pad_token_id, batch_size=4)
    assert torch.allclose(ref.sequence_logprobs(rows, tok.pad_token_id, batch_size=2), want, atol=1e-5)
    assert not torch.allclose(sequence_logprobs(policy, rows, tok.pad_token_id, batch_size=4), want, atol=1e-3)
    batch = pad(rows, tok.pad_token_id)
    policy.train()
    got = ref.response_logprobs(batch, 0.9, batch_size=3)
    assert policy.training and not got.requires_grad
    with torch.no_grad():
        assert torch.allclose(got, response_logprobs(base, batch, 0.9), atol=1e-5)
    # a different reference name, or no LoRA: a frozen model of its own
    frozen = reference_for(policy, str(tiny_folder), "", 0, "cpu")
    assert frozen.kind == "frozen" and not frozen.model.training
    assert not any(p.requires_grad for p in frozen.model.parameters())
    assert torch.allclose(frozen.sequence_logprobs(rows, tok.pad_token_id, batch_size=4), want, atol=1e-5)


def test_cached_reference_reads_by_row_and_scores_nothing():
    ref = Reference.cache(torch.tensor([-1.0, -2.0, -3.0]))
    assert len(ref) == 3 and ref[1].item() == -2.0 and ref[[0, 2]].tolist() == [-1.0, -3.0]
    assert ref.cached.dtype == torch.float32
    with pytest.raises(TypeError, match="cannot compute"):
        ref.sequence_logprobs([], 0, batch_size=1)
    with pytest.raises(TypeError):
        Reference.frozen(torch.nn.Linear(1, 1))[0]
    with pytest.raises(TypeError, match="adapters"):
        Reference.adapters_off(torch.nn.Linear(1, 1))


# --- memory on a large vocabulary: the same numbers from less -------------------------------


def test_token_logprobs_is_log_softmax_at_the_label_with_temperature_and_gradient():
    from tether.losses.lm import sft_nll, token_logprobs

    torch.manual_seed(0)
    logits = torch.randn(3, 7, 50, requires_grad=True)
    labels = torch.randint(0, 50, (3, 7))
    labels[:, :3] = IGNORE_INDEX  # a prompt
    labels[1, 5:] = IGNORE_INDEX  # padding
    for temperature in (1.0, 0.7):
        direct = torch.log_softmax(logits[:, :-1] / temperature, -1).gather(2, labels[:, 1:].clamp(min=0)[..., None])
        direct = direct.squeeze(-1) * (labels[:, 1:] != IGNORE_INDEX)
        got = token_logprobs(logits, labels, temperature)
        torch.testing.assert_close(got, direct, rtol=1e-6, atol=1e-6)
        (g_direct,) = torch.autograd.grad(direct.sum(), logits)
        (g_got,) = torch.autograd.grad(got.sum(), logits)
        torch.testing.assert_close(g_got, g_direct, rtol=1e-6, atol=1e-7)
    expected = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 50), labels[:, 1:].reshape(-1),
                                                 ignore_index=IGNORE_INDEX, reduction="sum")
    torch.testing.assert_close(sft_nll(logits, labels).total, expected)


def test_labelled_logprobs_score_the_same_without_the_logits(tiny):
    """labelled_logprobs runs the output layer from the first labelled position (logits_to_keep) and only at the
    labelled positions, a chunk at a time, never materialising the logits: the same log-probs and gradients."""
    from tether.data.collate import pad
    from tether.losses.lm import sequence_logprobs as of_logits
    from tether.losses.lm import sequence_sum
    from tether.scoring import labelled_logprobs

    model, tok = tiny
    batch = pad(_rows(tok), tok.pad_token_id)
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    seen = []
    hook = model.lm_head.register_forward_hook(lambda m, i, o: seen.append(tuple(o.shape)))
    with torch.no_grad():  # (with gradient the same positions go through the layer's weight, not its forward)
        logp, kept = labelled_logprobs(model, ids, mask, labels)
    hook.remove()
    first = int((labels[:, 1:] != IGNORE_INDEX).any(0).nonzero()[0])
    assert first > 0 and logp.shape[1] == kept.shape[1] - 1 == ids.shape[1] - first - 1  # the shortest prompt - 1
    assert seen == [(int((labels[:, 1:] != IGNORE_INDEX).sum()), model.config.vocab_size)]  # labelled positions only
    assert model.lm_head is model.get_output_embeddings() and type(model.lm_head) is torch.nn.Linear  # put back
    full = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(sequence_sum(logp, kept), of_logits(full, labels), rtol=1e-5, atol=1e-5)
    model.zero_grad()
    sequence_sum(*labelled_logprobs(model, ids, mask, labels, temperature=0.7)).sum().backward()
    chunked = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    from tether.losses.lm import token_logprobs
    token_logprobs(model(input_ids=ids, attention_mask=mask).logits, labels, 0.7).sum().backward()
    for a, p in zip(chunked, model.parameters()):
        torch.testing.assert_close(a, p.grad, rtol=1e-4, atol=1e-6)
    model.zero_grad()
    # response_logprobs keeps its (B, T - 1) shape: zeros before the first kept position
    per_token = response_logprobs(model, batch)
    assert per_token.shape == (ids.shape[0], ids.shape[1] - 1) and not per_token[:, :first].any()
    for i, row in enumerate(_rows(tok)):
        torch.testing.assert_close(per_token[i].sum(), _alone(model, row).sum(), rtol=1e-5, atol=1e-5)


def test_a_model_whose_logits_are_not_its_output_layers_is_scored_from_its_logits(tiny, monkeypatch):
    """Soft-capped or scaled logits (Gemma 2, Cohere), a compiled model: the logits path, same numbers."""
    from tether.data.collate import pad
    from tether.scoring import _output_layer, labelled_logprobs

    model, tok = tiny
    assert _output_layer(model) == (model, "lm_head", model.lm_head)
    batch = pad(_rows(tok), tok.pad_token_id)
    chunked, _ = labelled_logprobs(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
    monkeypatch.setattr(model.config, "final_logit_softcapping", 30.0, raising=False)
    assert _output_layer(model) is None
    monkeypatch.setattr(model.config, "final_logit_softcapping", None)
    monkeypatch.setattr(model.config, "logit_scale", 0.0625, raising=False)
    assert _output_layer(model) is None
    monkeypatch.setattr(model.config, "logit_scale", None)
    assert _output_layer(torch.compile(model)) is None
    seen = []
    hook = model.lm_head.register_forward_hook(lambda m, i, o: seen.append(tuple(o.shape)))
    monkeypatch.setattr("tether.scoring._output_layer", lambda m: None)
    plain, _ = labelled_logprobs(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
    hook.remove()
    assert len(seen[0]) == 3  # (B, K, V): the logits
    torch.testing.assert_close(plain, chunked, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_gradient_checkpointing_keeps_fewer_activations_and_changes_no_gradient(tiny_folder, mode):
    """The same gradient with --gradient-checkpointing, and far fewer tensors kept for the backward pass; an RL
    policy is in eval mode (no dropout), and checkpointing still acts there."""
    from tether.data.collate import pad
    from tether.loop.pieces import use_gradient_checkpointing
    from tether.rollout import sample

    tok = load_tokenizer(tiny_folder)
    batch = pad(_rows(tok), tok.pad_token_id)
    grads, kept = [], []
    for checkpointing in (False, True):
        model = load_model(tiny_folder)
        model.train() if mode == "train" else model.eval()
        if checkpointing:
            use_gradient_checkpointing(model)
        sample(model, tok, PROMPTS[:1], max_new_tokens=2)  # an RL iteration samples first: the blocks keep their flag
        saved = []  # what autograd keeps outside checkpointed blocks (inside, checkpoint's own hooks take over)
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
            loss = response_logprobs(model, batch).sum()
        loss.backward()
        grads.append([p.grad.clone() for p in model.parameters()])
        kept.append(sum(saved))
        assert model.model.layers[0].mlp.training == (mode == "train")  # dropout's flag is untouched
    assert kept[1] < 0.6 * kept[0]
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
