"""GRPO and RLOO: the trainer's gathering code against hand computations, and runs end to end on a tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from tether.cli import main
from tether.generation import make_backend
from tether.losses import kl_estimate
from tether.models import load_model, load_tokenizer
from tether.scoring import Reference, response_logprobs
from tether.trainers.grpo import CriticFree, GRPOConfig, run_grpo
from tether.trainers.rl import Inputs
from tether.trainers.rloo import RLOO, RLOOConfig, run_rloo
from tests.toy import PROMPTS, FakeRun, digits, digits_failing_at



def _cfg(kind, tiny_folder, prompt_file, out, **kw):
    cfg = (GRPOConfig if kind == "grpo" else RLOOConfig)(model=str(tiny_folder), prompts=str(prompt_file),
                                                        out=str(out), group_size=4, prompts_per_step=4, **kw)
    cfg.sampling.max_new_tokens = 8
    cfg.train.lr, cfg.train.batch_size, cfg.train.grad_accum = 1e-2, 16, 1
    return cfg


def _stage(kind, tiny_folder, cfg, rewards=None, reference=None):
    """The stage on PROMPTS[:4] (its first rollout holds each once), with the starting policy (or
    ``reference``) as π_ref."""
    model, tok = load_model(tiny_folder).eval(), load_tokenizer(tiny_folder)
    reward_fn = (lambda p, r: torch.tensor(rewards)) if rewards is not None else digits
    reference = Reference.frozen(reference if reference is not None else load_model(tiny_folder).eval())
    inputs = Inputs(tok, [], [], PROMPTS[:4], [], reward_fn, cfg)
    return (CriticFree if kind == "grpo" else RLOO)(cfg, inputs, model, model, reference,
                                                     make_backend("tether", model, tok), Path(cfg.out),
                                                     torch.device("cpu"))


def _scored(kind, tiny_folder, prompt_file, tmp_path, rewards=None, reference=None, **kw):
    cfg = _cfg(kind, tiny_folder, prompt_file, tmp_path / "unused", **kw)
    stage = _stage(kind, tiny_folder, cfg, rewards, reference)
    batch = stage.rollout(0)
    scored, metrics, finite = stage.score(batch)
    assert finite
    return stage, batch, scored, metrics


def _noisy(tiny_folder):
    """A reference that differs from the policy, so that the KL is not 0."""
    ref = load_model(tiny_folder).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return ref


def test_a_group_is_g_contiguous_samples_of_one_prompt(tiny_folder, prompt_file, tmp_path):
    stage, batch, scored, _ = _scored("grpo", tiny_folder, prompt_file, tmp_path)
    groups = [batch.prompts[i : i + 4] for i in range(0, 16, 4)]
    assert all(len(set(g)) == 1 for g in groups) and {g[0] for g in groups} == set(PROMPTS[:4])
    assert scored.rewards.shape == (16,) and scored.advantages.shape == (16,)
    # GRPO advantages by hand for the first group: (r − mean) / (unbiased std + 1e-6)
    r = scored.rewards[:4]
    assert torch.allclose(scored.advantages[:4], (r - r.mean()) / (r.std() + 1e-6), atol=1e-5)
    # one inner step: log π_old is the update's own first pass (needs_old_logp), not a pass of its own
    assert scored.old_logp is None and scored.kl is None
    # the reference is the starting policy: KL 0 exactly before any update
    assert torch.equal(response_logprobs(stage.model, batch, batch_size=16), scored.ref_logp)


def test_rloo_puts_beta_times_the_summed_per_token_kl_into_the_reward(tiny_folder, prompt_file, tmp_path):
    rewards = [1.0, 0.0, 2.0, 0.0, 0.0, 0.0, 0.0, 4.0, 1.0, 1.0, 0.0, 0.0, 3.0, 0.0, 0.0, 0.0]
    _, batch, scored, _ = _scored("rloo", tiny_folder, prompt_file, tmp_path, rewards, _noisy(tiny_folder), beta=0.5,
                                  kl_estimator="k3")
    # by hand, row by row: r' = r − β Σ_t k3_t, then r'_i − mean of the other three in its group
    penalised = []
    for i in range(16):
        m = batch.mask[i].bool()
        penalised.append(rewards[i] - 0.5 * kl_estimate(scored.old_logp[i][m], scored.ref_logp[i][m], "k3").sum().item())
    expected = []
    for i in range(16):
        group = penalised[i // 4 * 4 : i // 4 * 4 + 4]
        expected.append(penalised[i] - (sum(group) - penalised[i]) / 3)
    assert scored.advantages.tolist() == pytest.approx(expected, abs=1e-5)
    assert scored.kl.min() != 0  # the logged sequence KL is k1 summed over the response
    assert torch.allclose(scored.kl, ((scored.old_logp - scored.ref_logp) * batch.mask).sum(-1))


def test_dynamic_sampling_keeps_only_groups_with_different_rewards(tiny_folder, prompt_file, tmp_path):
    rewards = [1.0] * 4 + [0.0, 1.0, 0.0, 0.0] + [0.5] * 4 + [0.0, 0.0, 0.0, 2.0]
    _, _, scored, _ = _scored("grpo", tiny_folder, prompt_file, tmp_path, rewards, dynamic_sampling=True)
    assert scored.keep.nonzero().squeeze(-1).tolist() == [4, 5, 6, 7, 12, 13, 14, 15]
    _, _, every, _ = _scored("grpo", tiny_folder, prompt_file, tmp_path, rewards)
    assert bool(every.keep.all())


def test_beta_zero_loads_a_reference_only_to_measure_the_held_out_kl(tiny_folder, prompt_file, tmp_path, monkeypatch):
    import tether.trainers.grpo as grpo

    real, loaded = grpo.reference_for, []
    monkeypatch.setattr(grpo, "reference_for", lambda *a, **k: loaded.append(1) or real(*a, **k))
    cfg = _cfg("grpo", tiny_folder, prompt_file, tmp_path / "none", beta=0.0)
    cfg.train.steps = 1
    run_grpo(cfg, digits)
    assert not loaded  # no KL term and no held-out prompts: no reference
    cfg = _cfg("grpo", tiny_folder, prompt_file, tmp_path / "eval", beta=0.0, eval_prompts=str(prompt_file))
    cfg.train.steps = 1
    out = run_grpo(cfg, digits)
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert loaded and lines[0]["eval/kl"] == 0.0 and lines[-1]["eval/kl"] > 0 and "kl/k1" not in lines[-1]


def test_without_the_old_logp_pass_the_step_and_the_logged_kl_are_the_same(tiny_folder, prompt_file, tmp_path):
    stage, batch, skipped, _ = _scored("grpo", tiny_folder, prompt_file, tmp_path, reference=_noisy(tiny_folder),
                                       beta=0.3)
    assert skipped.old_logp is None and skipped.kl is None
    old = response_logprobs(stage.model, batch, batch_size=16).detach()  # the pass that is skipped, made by hand
    forced = skipped._replace(old_logp=old, kl=((old - skipped.ref_logp) * batch.mask).sum(-1))
    a, b = FakeRun(stage.model), FakeRun(stage.model)
    got, want = stage.update(batch, skipped, a), stage.update(batch, forced, b)
    for x, y in zip(a.grads[0], b.grads[0]):
        assert torch.equal(x, y)
    assert got["loss/policy"] == want["loss/policy"] and got["policy/kl_k3"] == want["policy/kl_k3"] != 0
    logged = stage.kl_metrics(forced.rewards, forced.kl)  # the KL a separate pass would have logged
    assert got["kl/k1"] == pytest.approx(logged["kl/k1"], abs=1e-6) and logged["kl/k1"] != 0
    assert got["objective/reward_minus_kl"] == pytest.approx(logged["objective/reward_minus_kl"], abs=1e-6)


@pytest.mark.parametrize("aggregation", ["sequence", "token", "constant"])
def test_any_micro_batch_split_gives_the_gradient_of_the_whole_batch(tiny_folder, prompt_file, tmp_path, aggregation):
    grads, losses = [], []
    # one optimiser step of 16 rows, split four ways, and in passes of like-length rows (pass_cost 1)
    for size, accum, cost in ((16, 1, 0), (1, 16, 0), (4, 4, 0), (2, 8, 0), (16, 1, 1)):
        stage, batch, scored, _ = _scored("grpo", tiny_folder, prompt_file, tmp_path, aggregation=aggregation)
        stage.cfg.train.batch_size, stage.cfg.train.grad_accum, stage.cfg.train.pass_cost = size, accum, cost
        run = FakeRun(stage.model)
        losses.append(stage.update(batch, scored, run)["loss/policy"])
        assert len(run.grads) == 1
        grads.append(run.grads[0])
    for other in grads[1:]:
        for a, b in zip(grads[0], other):
            assert torch.allclose(a, b, atol=1e-6)
    assert losses[1:] == pytest.approx([losses[0]] * 4, abs=1e-6)


def test_a_smaller_optimiser_step_takes_several_steps_a_pass(tiny_folder, prompt_file, tmp_path):
    stage, batch, scored, _ = _scored("grpo", tiny_folder, prompt_file, tmp_path)
    stage.cfg.train.batch_size, stage.cfg.train.grad_accum = 4, 1
    assert stage.needs_old_logp()  # the ratio moves after the first step
    run = FakeRun(stage.model)
    assert stage.update(batch, stage.score(batch)[0], run)["policy/updates"] == 4 == len(run.grads)


def test_first_inner_step_has_ratio_one_so_the_loss_is_minus_the_aggregated_advantage(tiny_folder, prompt_file, tmp_path):
    stage, batch, scored, _ = _scored("grpo", tiny_folder, prompt_file, tmp_path, aggregation="token")
    metrics = stage.update(batch, scored, FakeRun(stage.model))
    lengths = batch.mask.sum(-1).float()  # (B,)
    # ρ = 1 and KL = 0 at the first step: L = −Σ_i Â_i |o_i| / Σ_i |o_i|  (DAPO's token mean)
    expected = -(scored.advantages * lengths).sum() / lengths.sum()
    assert metrics["loss/policy"] == pytest.approx(expected.item(), abs=1e-6)
    assert metrics["policy/clip_fraction"] == 0.0 and metrics["policy/kl_k3"] == 0.0


def test_inner_iterations_move_the_ratio_and_the_clip_engages(tiny_folder, prompt_file, tmp_path):
    stage, batch, scored, _ = _scored("grpo", tiny_folder, prompt_file, tmp_path, inner_iters=4, clip_eps=0.01)
    metrics = stage.update(batch, scored, FakeRun(stage.model, torch.optim.SGD(stage.model.parameters(), lr=1.0)))
    assert metrics["policy/clip_fraction"] > 0  # after the first step π ≠ π_old and small ε clips
    assert metrics["policy/kl_k3"] > 0


@pytest.mark.parametrize("kind, run", [("grpo", run_grpo), ("rloo", run_rloo)])
def test_trains_end_to_end_parameters_change_and_the_reward_rises(tiny_folder, prompt_file, tmp_path, kind, run):
    cfg = _cfg(kind, tiny_folder, prompt_file, tmp_path / kind, eval_prompts=str(prompt_file))
    cfg.train.steps, cfg.train.eval_every = 12, 12
    out = run(cfg, digits)
    before, after = load_file(str(tiny_folder / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert any(not torch.equal(before[k], after[k]) for k in before)
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == list(range(13))  # step 0: the evaluation before training
    first, last = lines[0]["eval/reward"], lines[-1]["eval/reward"]
    assert last > first + 0.05, (first, last)
    train_rewards = [line["reward/mean"] for line in lines[1:]]
    assert sum(train_rewards[-4:]) / 4 > sum(train_rewards[:4]) / 4
    assert lines[-1]["kl/k1"] > 0
    meta = json.loads((out / "tether.json").read_text())
    assert meta["stage"] == kind and meta["config"]["reward"] == "<function digits>"
    assert meta["data"]["prompts"]["records"] == 16


@pytest.mark.parametrize("kind, run", [("grpo", run_grpo), ("rloo", run_rloo)])
def test_resume_from_a_checkpoint_equals_an_uninterrupted_run(tiny_folder, prompt_file, tmp_path, kind, run):
    def cfg_for(out, **kw):
        c = _cfg(kind, tiny_folder, prompt_file, tmp_path / out, inner_iters=2, **kw)
        c.train.steps, c.train.save_every, c.train.batch_size, c.train.grad_accum = 4, 2, 4, 2
        c.train.schedule, c.train.warmup_steps = "cosine", 1
        return c

    whole = run(cfg_for("whole"), digits)
    with pytest.raises(RuntimeError, match="killed"):
        run(cfg_for("part"), digits_failing_at(3, RuntimeError("killed")))  # checkpoint at 2, then dies while scoring iteration 3
    resumed_calls = []
    part = run(cfg_for("part", resume=True), lambda p, r: resumed_calls.append(1) or digits(p, r))
    assert len(resumed_calls) == 2  # iterations 3 and 4 only: it continued from the checkpoint
    a, b = load_file(str(whole / "model.safetensors")), load_file(str(part / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)

    def lines(folder):  # timings aside, the logs agree line by line
        return [{k: v for k, v in json.loads(line).items() if not k.startswith(("time/", "perf/"))}
                for line in (folder / "metrics.jsonl").read_text().splitlines()]

    assert lines(whole) == lines(part) and [x["step"] for x in lines(part)] == [1, 2, 3, 4]


class CopyEngine:
    """Stands in for the vLLM backend (not installed here): an engine with its own copy of the weights, loaded
    from the starting policy as vLLM loads ``cfg.model``, that samples only from that copy and changes it only
    when ``sync`` is called; it records the weights each rollout was sampled from."""

    def __init__(self, model, tokenizer, **kwargs):
        import copy

        self.engine, self.tokenizer, self.sampled_from = copy.deepcopy(model), tokenizer, []

    def sample(self, prompts, **kwargs):
        from tether.rollout import sample

        self.sampled_from.append({k: v.clone() for k, v in self.engine.state_dict().items()})
        return sample(self.engine, self.tokenizer, prompts, **kwargs)

    def sync(self, model):
        self.engine.load_state_dict(model.state_dict())


@pytest.mark.parametrize("kind, run", [("grpo", run_grpo), ("rloo", run_rloo)])
def test_an_engine_with_its_own_weights_samples_the_checkpoint_after_resume(tiny_folder, prompt_file, tmp_path,
                                                                            monkeypatch, kind, run):
    """Issue 19, item 10: with the vLLM backend the first iteration after --resume sampled from the initial
    weights, because the engine was synced only after an update."""
    engines = []
    monkeypatch.setattr("tether.trainers.grpo.make_backend",
                        lambda name, model, tokenizer, **kw: engines.append(CopyEngine(model, tokenizer)) or engines[-1])

    def cfg_for(out, **kw):
        c = _cfg(kind, tiny_folder, prompt_file, tmp_path / out, **kw)
        c.train.steps, c.train.save_every = 3, 1
        return c

    whole = run(cfg_for("whole"), digits)
    with pytest.raises(RuntimeError, match="killed"):
        run(cfg_for("part"), digits_failing_at(3, RuntimeError("killed")))  # checkpoint at 2, then dies while scoring iteration 3
    checkpoint = load_file(str(tmp_path / "part" / "checkpoints" / "step-000002" / "model.safetensors"))
    part = run(cfg_for("part", resume=True), digits)
    first_after_resume = engines[-1].sampled_from[0]
    assert len(engines[-1].sampled_from) == 1 and set(checkpoint) <= set(first_after_resume)
    assert all(torch.equal(first_after_resume[k], checkpoint[k]) for k in checkpoint)  # not the initial weights
    a, b = load_file(str(whole / "model.safetensors")), load_file(str(part / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_iterations_without_a_learning_signal_warn_then_stop_and_say_why(tiny_folder, prompt_file, tmp_path, caplog):
    """Issue 20: a GRPO run went 45 minutes with every reward 0 and a zero gradient, and said nothing."""
    import logging

    from tether.loop.rl import NoLearningSignal

    cfg = _cfg("rloo", tiny_folder, prompt_file, tmp_path / "flat", no_signal_stop=4)
    cfg.train.steps = 10
    with caplog.at_level(logging.WARNING, logger="tether.rl"), pytest.raises(NoLearningSignal) as stopped:
        run_rloo(cfg, lambda prompts, responses: [0.0] * len(responses))
    message = str(stopped.value)
    assert message.startswith("RLOO: 4 iterations in a row carried no learning signal (--no-signal-stop 4): every "
                              "group's 4 rewards were equal (reward 0 on average)")
    assert "of the samples ended" in message and "(--max-new-tokens 8)" in message
    assert any("3 iterations in a row without a learning signal" in r.getMessage() for r in caplog.records)
    assert len((tmp_path / "flat" / "metrics.jsonl").read_text().splitlines()) == 3  # it stopped scoring the 4th
    cfg = _cfg("grpo", tiny_folder, prompt_file, tmp_path / "varied", no_signal_stop=1)
    cfg.train.steps = 3
    run_grpo(cfg, digits)  # rewards that differ within a group: a signal every iteration, no stop


def test_exact_match_reward_reads_answers_from_the_prompt_file(tiny_folder, prompt_file, tmp_path):
    cfg = _cfg("grpo", tiny_folder, prompt_file, tmp_path / "em", reward="exact_match:1.0,format:0.5")
    cfg.train.steps = 1
    out = run_grpo(cfg)
    line = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert {"reward/exact_match", "reward/format"} <= set(line)
    assert line["reward/mean"] == pytest.approx(line["reward/exact_match"] + 0.5 * line["reward/format"], abs=1e-6)
    no_answers = tmp_path / "bare.jsonl"
    no_answers.write_text(json.dumps({"prompt": PROMPTS[0]}) + "\n")
    cfg = _cfg("grpo", tiny_folder, no_answers, tmp_path / "em2", reward="exact_match")
    with pytest.raises(ValueError, match="1 prompt\\(s\\) have no \"answer\""):
        run_grpo(cfg)
    assert not (tmp_path / "em2").exists()  # nothing is written before the input validates


def test_lora_uses_the_policy_without_adapters_as_the_reference(tiny_folder, prompt_file, tmp_path, monkeypatch):
    cfg = _cfg("grpo", tiny_folder, prompt_file, tmp_path / "lora")
    cfg.lora.r, cfg.train.steps = 4, 2
    monkeypatch.setattr("tether.models.load_model", lambda *a, **k: pytest.fail("a second model was loaded"))
    out = run_grpo(cfg, digits)  # the policy comes through tether.trainers.rl; the reference would not
    assert (out / "adapter").is_dir() and (out / "model.safetensors").exists()


@pytest.mark.parametrize("args, message", [
    (["--scale", "std"], "scale must be one of"),
    (["--aggregation", "mean"], "aggregation must be one of"),
    (["--group-size", "1"], "--group-size must be an integer >= 2"),
    (["--clip-eps", "0"], "--clip-eps must be a number in (0, 1), got 0.0"),
    (["--beta", "-1"], "--beta must be a number >= 0"),
    (["--grad-accum", "3"], "must be a multiple of an optimiser step's rows, batch_size x grad_accum (48)"),
    (["--inner-iters", "0"], "--inner-iters must be an integer >= 1"),
])
def test_bad_grpo_options_are_errors(args, message):
    result = CliRunner().invoke(main, ["grpo", "--model", "m", "--prompts", "p", *args])
    assert result.exit_code != 0 and message in result.output


def test_rloo_rejects_an_unknown_kl_estimator():
    result = CliRunner().invoke(main, ["rloo", "--model", "m", "--prompts", "p", "--kl-estimator", "k4"])
    assert result.exit_code != 0 and "kl_estimator must be one of" in result.output


def test_cli_grpo_runs_with_a_verifiable_reward(tiny_folder, prompt_file, tmp_path):
    out = tmp_path / "cli"
    result = CliRunner().invoke(main, ["grpo", "--model", str(tiny_folder), "--prompts", str(prompt_file),
                                       "--reward", "format:1.0,overlong(cache=4):1.0", "--group-size", "2",
                                       "--prompts-per-step", "2", "--max-new-tokens", "6", "--steps", "1",
                                       "--beta", "0", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "GRPO policy in" in result.output
    line = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert "reward/overlong" in line and "kl/k1" not in line
