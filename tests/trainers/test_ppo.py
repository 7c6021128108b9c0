"""PPO: the shaping and control formulas by hand, and the stage end to end on a tiny model.

The losses themselves (gae, ppo_policy_loss, ppo_value_loss, kl_estimate) are tested against hand
computations in test_losses.py and against π* on the tabular problem in test_tabular.py.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from tether.rollout import SamplingConfig
from tether.losses import adaptive_kl_coef
from tether.losses import explained_variance, last_token, shaped_rewards
from tether.trainers.ppo import PPOConfig, run_ppo, sequence_scores
from tether.loop import TrainConfig
from tests.conftest import CORPUS
from tests.toy import digits, digits_failing_at

T = torch.tensor


def test_shaped_rewards_put_the_score_on_the_last_response_token():
    # row 0: response tokens at 1, 2; row 1: at 0, 1, 2
    mask = T([[0.0, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 0.0]])
    kl = T([[9.0, 0.5, -0.2, 9.0], [0.1, 0.2, 0.3, 9.0]])
    out = shaped_rewards(T([2.0, -1.0]), kl, mask, beta=0.1)
    # −β·kl on response tokens, + score on the last one: 2 − 0.1·(−0.2) = 2.02;  −1 − 0.1·0.3 = −1.03
    expected = T([[0.0, -0.05, 2.02, 0.0], [-0.01, -0.02, -1.03, 0.0]])
    assert torch.allclose(out, expected)
    assert last_token(mask).tolist() == [2, 2]


def test_sequence_scores_replace_empty_penalise_unended_then_normalise_and_clip():
    raw = T([2.5, 0.5, -0.5, 1.0])
    empty, ended = T([True, False, False, False]), T([True, True, False, True])
    cfg = PPOConfig(empty_score=-1.0, no_eos_penalty=1.0)
    reward, score = sequence_scores(raw, empty, ended, cfg)
    assert reward.tolist() == [-1.0, 0.5, -0.5, 1.0]  # the RM's +2.5 for an empty answer is not trusted
    assert score.tolist() == [-1.0, 0.5, -1.5, 1.0]
    cfg.reward_norm, cfg.reward_clip = "batch", 1.0
    _, score = sequence_scores(raw, empty, ended, cfg)
    z = (T([-1.0, 0.5, -1.5, 1.0]) - (-0.25)) / T([-1.0, 0.5, -1.5, 1.0]).std()
    assert torch.allclose(score, z.clamp(-1, 1), atol=1e-6)


def test_adaptive_kl_controller_by_hand():
    # KL 9 against target 6: error 0.5 clipped to 0.2; K = 64/10000; β = 0.1·(1 + 0.2·0.0064) = 0.100128
    assert adaptive_kl_coef(0.1, 9.0, 6.0, 10000, 64) == pytest.approx(0.100128)
    # KL 5.4 against 6: error −0.1; β = 0.1·(1 − 0.1·0.5) = 0.095
    assert adaptive_kl_coef(0.1, 5.4, 6.0, 100, 50) == pytest.approx(0.095)
    assert adaptive_kl_coef(0.1, 6.0, 6.0, 100, 50) == pytest.approx(0.1)


def test_explained_variance_by_hand():
    mask = T([[1.0, 1.0, 1.0, 0.0]])
    returns = T([[1.0, 2.0, 3.0, 7.0]])
    assert explained_variance(returns.clone(), returns, mask) == pytest.approx(1.0)
    # constant values: the residual has the returns' own variance
    assert explained_variance(T([[5.0, 5.0, 5.0, 0.0]]), returns, mask) == pytest.approx(0.0)
    # V = (1, 1, 1): residual (0, 1, 2) has variance 2/3, returns too: 0
    assert explained_variance(T([[1.0, 1.0, 1.0, 0.0]]), returns, mask) == pytest.approx(0.0, abs=1e-6)


# --- end to end on a tiny model -----------------------------------------------------------


@pytest.fixture
def prompts_file(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": t.split(" plus")[0] + " plus 1?\n\nAssistant:"}) + "\n"
                            for t in CORPUS[::12]))
    return path


def _cfg(tmp_path, tiny_folder, prompts_file, name="ppo", **kw) -> PPOConfig:
    train = TrainConfig(steps=kw.pop("steps", 4), batch_size=4, lr=kw.pop("lr", 3e-3), warmup_steps=0,
                        schedule="constant", eval_every=0, save_every=kw.pop("save_every", 0), seed=0)
    kw = {"rollout_batch": 8, "epochs": 2, **kw}
    return PPOConfig(model=str(tiny_folder), prompts=str(prompts_file), out=str(tmp_path / name),
                     sampling=SamplingConfig(max_new_tokens=12, gen_batch_size=32),
                     beta=0.05, no_eos_penalty=0.0, train=train, **kw)


def test_ppo_raises_the_reward_and_writes_a_loadable_policy(tmp_path, tiny_folder, prompts_file):
    cfg = _cfg(tmp_path, tiny_folder, prompts_file, steps=20, lr=1e-2, rollout_batch=32, epochs=4,
               eval_prompts=str(prompts_file), eval_size=8)
    out = run_ppo(cfg, reward=digits)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(21))  # step 0: the starting policy's evaluation
    assert rows[0]["eval/kl"] == pytest.approx(0.0, abs=1e-5)
    rows = rows[1:]
    first, last = rows[0], rows[-1]
    assert first["kl/k1"] == pytest.approx(0.0, abs=1e-5)  # π = π_ref before any update
    # the share of digits roughly doubles (≈ 0.1 → 0.25 on this seed)
    assert sum(r["reward/mean"] for r in rows[-3:]) / 3 > sum(r["reward/mean"] for r in rows[:3]) / 3 + 0.06
    assert last["kl/k1"] > 0
    for key in ("kl/k2", "kl/k3", "objective/entropy", "policy/clip_fraction", "loss/value",
                "value/explained_variance", "policy/approx_kl", "rollout/length", "kl/beta", "eval/kl"):
        assert key in last
    from transformers import AutoModelForCausalLM

    before = AutoModelForCausalLM.from_pretrained(tiny_folder)
    after = AutoModelForCausalLM.from_pretrained(out)
    assert any(not torch.equal(a, b) for a, b in zip(before.parameters(), after.parameters()))
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 16 and {"step", "prompt", "response", "reward", "kl"} <= set(samples[0])
    meta = json.loads((out / "tether.json").read_text())
    assert meta["stage"] == "ppo" and "reward/mean" in meta["metrics"]


class Crash(RuntimeError):
    pass


def test_an_interrupted_run_resumes_to_the_same_weights(tmp_path, tiny_folder, prompts_file):
    full = run_ppo(_cfg(tmp_path, tiny_folder, prompts_file, "full", steps=4, save_every=1, kl_target=1.0),
                   reward=digits)

    cfg = _cfg(tmp_path, tiny_folder, prompts_file, "resumed", steps=4, save_every=1, kl_target=1.0)
    with pytest.raises(Crash):
        run_ppo(cfg, reward=digits_failing_at(3, Crash()))
    cfg.resume = True
    resumed = run_ppo(cfg, reward=digits)
    a, b = load_file(str(full / "model.safetensors")), load_file(str(resumed / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    beta = [json.loads(line)["kl/beta"] for line in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert len(beta) == 4 and len(set(beta)) > 1  # the adaptive β moved, and was restored on resume


def test_ppo_ptx_resumes_exactly_when_early_stopping_cut_an_update_short(tmp_path, tiny_folder, prompts_file,
                                                                         sft_file):
    """Issue 19, item 9: the ptx stream restarted at iteration × a full update's share, though an update that
    stopped early on target_kl had taken fewer micro-batches; its position is now part of the checkpoint."""
    kw = dict(steps=4, save_every=1, ptx_data=str(sft_file), ptx_coef=0.5, target_kl=1e-4)
    full = run_ppo(_cfg(tmp_path, tiny_folder, prompts_file, "full", **kw), reward=digits)
    rows = [json.loads(line) for line in (full / "metrics.jsonl").read_text().splitlines()]
    updates = [r["policy/updates"] for r in rows]
    assert any(r["policy/early_stop"] for r in rows[:2]) and min(updates[:2]) < 4  # 4: two epochs x two mini-batches

    cfg = _cfg(tmp_path, tiny_folder, prompts_file, "resumed", **kw)
    with pytest.raises(Crash):
        run_ppo(cfg, reward=digits_failing_at(3, Crash()))
    cfg.resume = True
    resumed = run_ppo(cfg, reward=digits)
    a, b = load_file(str(full / "model.safetensors")), load_file(str(resumed / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    again = [json.loads(line) for line in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss/ptx"] for r in again] == [r["loss/ptx"] for r in rows]  # the same ptx batches


def test_value_head_lora_and_ptx_variants_run(tmp_path, tiny_folder, prompts_file, sft_file):
    out = run_ppo(_cfg(tmp_path, tiny_folder, prompts_file, "head", steps=2, value="head", ptx_data=str(sft_file),
                       ptx_coef=0.5), reward=digits)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["loss/ptx"] > 0
    assert rows[0]["kl/k1"] == pytest.approx(0.0, abs=1e-5) and rows[-1]["kl/k1"] != 0
    cfg = _cfg(tmp_path, tiny_folder, prompts_file, "lora", steps=2)
    cfg.lora.r = 4
    out = run_ppo(cfg, reward=digits)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    # the reference is the policy with its adapters off: exactly the policy before any update, not after
    assert rows[0]["kl/k1"] == pytest.approx(0.0, abs=1e-5) and rows[-1]["kl/k1"] != 0
    assert (out / "adapter").is_dir() and (out / "model.safetensors").exists()


def test_bad_config_is_an_error_before_anything_is_written(tmp_path, tiny_folder, prompts_file):
    cfg = _cfg(tmp_path, tiny_folder, prompts_file, "bad")
    cfg.rollout_batch = 6  # not a multiple of the mini-batch (4)
    with pytest.raises(ValueError, match="rollout_batch"):
        run_ppo(cfg, reward=digits)
    cfg.rollout_batch, cfg.kl_estimator = 8, "k4"
    with pytest.raises(ValueError, match="kl_estimator"):
        run_ppo(cfg, reward=digits)
    cfg.kl_estimator, cfg.ptx_coef = "k1", 1.0
    cfg.ptx_data = str(tmp_path / "ptx.jsonl")
    (tmp_path / "ptx.jsonl").write_text('{"prompt": "x", "completion": 3}\n')  # not a string
    with pytest.raises(ValueError, match="ptx.jsonl"):
        run_ppo(cfg, reward=digits)
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("value", ["critic", "head"])
def test_the_actor_critic_scores_labelled_tokens_without_logits_as_from_its_logits(tiny_folder, value):
    """PPO's passes ask for log-probs and entropies of the response tokens, not B x T x V logits: the same numbers,
    the same values, and the same gradient as token_logprobs of the logits."""
    from tether.losses.lm import IGNORE_INDEX, token_entropy, token_logprobs
    from tether.models import load_model
    from tether.models.value import ActorCritic, ValueModel

    policy = load_model(tiny_folder)
    ac = ActorCritic(policy, ValueModel(load_model(tiny_folder).model) if value == "critic" else None)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, policy.config.vocab_size, (3, 9), generator=g)
    mask = torch.ones_like(ids)
    labels = ids.clone()
    labels[:, :4] = IGNORE_INDEX  # prompts
    labels[1, 7:] = IGNORE_INDEX  # a shorter response
    entropies = torch.zeros(3, 8)
    logp, values = ac(ids, mask, labels, 0.8, entropies)
    logits, values_from_logits = ac(ids, mask)
    response = labels[:, 1:] != IGNORE_INDEX
    torch.testing.assert_close(logp, token_logprobs(logits, labels, 0.8), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(entropies, token_entropy(logits[:, :-1], 0.8) * response, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(values, values_from_logits)
    logp.sum().backward()
    chunked = [p.grad.clone() for p in policy.parameters()]
    policy.zero_grad()
    token_logprobs(ac(ids, mask)[0], labels, 0.8).sum().backward()
    for a, p in zip(chunked, policy.parameters()):
        torch.testing.assert_close(a, p.grad, rtol=1e-4, atol=1e-6)
