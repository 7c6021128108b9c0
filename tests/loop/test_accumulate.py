"""Gradient accumulation by sums and counts (tether.loop.accumulate): the gradient of a step does not depend on
how its rows are split into micro-batches (or ranks: tests/test_distributed.py runs SFT at world size 2 with
other splits), with rows of unequal length — for SFT, RPO and PPO-ptx, the losses whose mean runs over tokens."""

from __future__ import annotations

import json

import pytest
import torch

from tether.data import load_preferences, load_sft
from tether.data.collate import encode_pairs, encode_sft, pad, pad_pairs_labelled
from tether.loop import accumulate
from tether.models import load_model, load_tokenizer
from tether.rollout import SamplingConfig
from tether.trainers.dpo import DPOConfig, dpo_step, pair_count
from tether.models.value import ActorCritic
from tether.rollout import rollout
from tether.scoring import Reference
from tether.trainers.ppo import PPOConfig, ppo_update, score_rollout
from tether.trainers.ptx import ptx_rows, ptx_stream
from tether.trainers.sft import lm_count, lm_loss
from tests.toy import PROMPTS, FakeRun

SPLITS = [[4], [2, 2], [1, 1, 1, 1], [3, 1], [1, 3]]  # micro-batch sizes of one step of 4 rows


def _grad(model, batches, count, loss_fn):
    model.zero_grad(set_to_none=True)
    accumulate(model, batches, count, loss_fn)
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def _cut(rows, sizes):
    out, i = [], 0
    for n in sizes:
        out.append(rows[i : i + n])
        i += n
    return out


def _sft_rows(tiny_folder):
    """Four examples whose responses have very different numbers of labelled tokens."""
    tokenizer = load_tokenizer(tiny_folder)
    completions = [" 1 plus 1 is 2." * 6, " 2.", " 3 plus 4 is 7. So the sum is 7." * 2, " no."]
    records = load_sft([{"prompt": "\n\nHuman: What is it?\n\nAssistant:", "completion": c} for c in completions],
                       tokenizer=tokenizer)
    rows, _ = encode_sft(records, tokenizer, 128)
    labelled = [sum(label != -100 for label in r.labels[1:]) for r in rows]
    assert max(labelled) > 5 * min(labelled)  # unequal rows: the case the old per-micro-batch mean got wrong
    return tokenizer, rows


def test_sft_gradient_is_the_same_for_any_micro_batch_split(tiny_folder):
    tokenizer, rows = _sft_rows(tiny_folder)
    model = load_model(tiny_folder).eval()
    grads = [_grad(model, [pad(part, tokenizer.pad_token_id) for part in _cut(rows, sizes)], lm_count,
                   lambda b: lm_loss(model, b)) for sizes in SPLITS]
    # the gradient of the mean NLL over every labelled token of the step, in one batch
    model.zero_grad(set_to_none=True)
    whole = pad(rows, tokenizer.pad_token_id)
    logits = model(input_ids=whole["input_ids"], attention_mask=whole["attention_mask"]).logits
    from tether.losses import sft_nll

    sft_nll(logits, whole["labels"]).mean().backward()
    direct = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    for g in grads:
        assert torch.allclose(g, direct, atol=1e-6, rtol=1e-4)
    # what tether did before (each micro-batch's own token mean, averaged) with the two long rows in one
    # micro-batch and the two short ones in the other: a short row's tokens weigh ~8x a long row's
    naive = sum(_grad(model, [pad(part, tokenizer.pad_token_id)], lm_count, lambda b: lm_loss(model, b))
                for part in ([rows[0], rows[2]], [rows[1], rows[3]])) / 2
    assert torch.nn.functional.cosine_similarity(naive, direct, dim=0) < 0.95


def test_rpo_gradient_is_the_same_for_any_micro_batch_split(tiny_folder):
    """RPO has two terms with two units: pairs (the DPO loss) and the chosen responses' tokens (the NLL)."""
    tokenizer = load_tokenizer(tiny_folder)
    chosen = [" 2 plus 2 is 4. Four. " * 5, " 4.", " It is 9, since 4 plus 5 is 9." * 2, " 7."]
    records = load_preferences([{"prompt": f"\n\nHuman: Sum {i}?\n\nAssistant:", "chosen": c, "rejected": " no idea."}
                                for i, c in enumerate(chosen)], tokenizer=tokenizer)
    pairs, _ = encode_pairs(records, tokenizer, 128)
    model = load_model(tiny_folder).eval()
    cfg = DPOConfig(model="m", data="d", rpo_alpha=1.0)

    def batch_of(part):
        return {**pad_pairs_labelled(part, tokenizer.pad_token_id),
                "ref_chosen": torch.full((len(part),), -20.0), "ref_rejected": torch.full((len(part),), -20.0)}

    grads = [_grad(model, [batch_of(part) for part in _cut(pairs, sizes)], pair_count,
                   lambda b: dpo_step(model, b, cfg)) for sizes in SPLITS]
    for g in grads[1:]:
        assert torch.allclose(g, grads[0], atol=1e-6, rtol=1e-4)


def test_ppo_ptx_gradient_is_the_same_for_any_micro_batch_split(tmp_path, tiny_folder):
    """One PPO mini-batch of 4 rows with the ptx term, run as 1 x 4, 2 x 2 and 4 x 1 micro-batches, and with each
    micro-batch cut into passes of like-length rows (pass_cost 1): the same gradient (the ptx mean runs over the
    labelled tokens of all of the mini-batch's ptx rows, of unequal length)."""
    ptx_file = tmp_path / "ptx.jsonl"
    ptx_file.write_text("".join(json.dumps({"prompt": "\n\nHuman: Count.\n\nAssistant:", "completion": c}) + "\n"
                                for c in [" 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16", " 1.", " 1 2 3 4 5 6 7 8", " 0."]))
    tokenizer, model = load_tokenizer(tiny_folder), load_model(tiny_folder).eval()
    ac = ActorCritic(model)  # a value head on the policy
    cfg = PPOConfig(model=str(tiny_folder), prompts="p", rollout_batch=4, epochs=1, value="head", ptx_coef=5.0,
                    ptx_data=str(ptx_file), sampling=SamplingConfig(max_new_tokens=8))
    prompts = PROMPTS[:2] + ["\n\nHuman: What is 1 plus 2? Say it in words, please, and then in digits.\n\nAssistant:"] * 2
    batch = rollout(model, tokenizer, prompts, max_new_tokens=8, seed=0)
    scored, _ = score_rollout(ac, Reference.frozen(load_model(tiny_folder).eval()), batch,
                              torch.tensor([1.0, 0.0, 0.5, -1.0]), cfg, beta=0.05)
    rows = ptx_rows(cfg, tokenizer)
    assert len(set(batch.attention_mask.sum(1).tolist())) > 1  # rollout rows of unequal length too
    grads, widths = [], []
    for size, accum, cost in ((4, 1, 0), (2, 2, 0), (1, 4, 0), (4, 1, 1)):
        cfg.train.batch_size, cfg.train.grad_accum, cfg.train.pass_cost = size, accum, cost
        run, seen = FakeRun(ac), []
        forward = ac.forward
        ac.forward = lambda ids, mask, *a, **k: seen.append(ids.shape) or forward(ids, mask, *a, **k)
        metrics = ppo_update(ac, run, batch, scored, cfg, 0, ptx_stream(cfg, rows, tokenizer.pad_token_id, 0))
        del ac.forward
        assert len(run.grads) == 1 and metrics["loss/ptx"] > 0
        grads.append(torch.cat([g.flatten() for g in run.grads[0]]))
        widths.append(seen)
    assert len(widths[3]) > 1 and sum(r * w for r, w in widths[3]) < 4 * batch.input_ids.shape[1]  # less padding
    for g in grads[1:]:
        assert torch.allclose(g, grads[0], atol=1e-6, rtol=1e-4)


def test_terms_with_no_unit_in_the_step_add_nothing():
    """A term whose count is 0 over the whole step (no ptx rows, an empty response) is left out, not 0/0."""
    model = torch.nn.Linear(2, 1)
    batch = {"x": torch.ones(3, 2)}

    def loss_fn(b):
        y = model(b["x"]).sum()
        return {"rows": y, "tokens": y * 0}, {}

    out = accumulate(model, [batch], lambda b: {"rows": 3.0, "tokens": 0.0}, loss_fn)
    assert out.nonfinite is None and out.loss == pytest.approx(model(batch["x"]).sum().item() / 3, rel=1e-6)


def test_each_terms_step_mean_is_reported_and_they_add_up_to_the_loss():
    """terms[k] = Σ S_k / N_k over the step's micro-batches (PPO logs loss/ptx from it); their sum is the loss."""
    model = torch.nn.Linear(2, 1, bias=False)
    torch.nn.init.ones_(model.weight)
    batches = [{"x": torch.ones(1, 2), "n": 1.0}, {"x": 2 * torch.ones(3, 2), "n": 3.0}]  # rows 2 and 4 each

    def loss_fn(b):
        y = model(b["x"]).sum()
        return {"rows": y, "other": 10 * y}, {}

    out = accumulate(model, batches, lambda b: {"rows": b["n"], "other": 2.0}, loss_fn)
    assert out.terms["rows"] == pytest.approx((2 + 12) / 4) and out.terms["other"] == pytest.approx(140 / 4)
    assert out.loss == pytest.approx(sum(out.terms.values()))
