"""--compile: the same training, through torch.compile's fused kernels.

Each test runs a stage once eagerly and once compiled from the same seed and checks that the
trained weights agree to float tolerance (fusion reorders floating-point sums, so not bitwise).
Slow: inductor compiles each graph with a C++ compiler, tens of seconds on two cores.
"""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

from tether.rollout import SamplingConfig
from tether.loop import TrainConfig
from tether.trainers.grpo import GRPOConfig, run_grpo
from tether.trainers.ppo import PPOConfig, run_ppo
from tether.trainers.sft import SFTConfig, run_sft
from tests.toy import PROMPTS
from tests.toy import digits

pytestmark = pytest.mark.slow


@pytest.fixture
def compiles(monkeypatch) -> list:
    """Every torch.compile call from here on (tether's and transformers'), forwarded to the real one."""
    calls, real = [], torch.compile

    def spy(*args, **kwargs):
        calls.append(args[0] if args else kwargs.get("model"))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "compile", spy)
    return calls


def assert_same_weights(eager, compiled):
    """Equal up to the order of sums: the compiled backbone fuses its kernels, and Adam divides by √v, so an element
    whose gradient is ~0 can move a few 1e-5 more on one side (the RL tests step at lr 1e-2)."""
    a, b = load_file(str(eager / "model.safetensors")), load_file(str(compiled / "model.safetensors"))
    assert a.keys() == b.keys()  # the compiled wrapper leaves no trace in the saved names
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=5e-5)


def test_compiled_sft_trains_the_same_weights(tiny_folder, sft_file, tmp_path, compiles):
    runs = {}
    for name, flag in (("eager", False), ("compiled", True)):
        train = TrainConfig(steps=3, batch_size=4, lr=1e-3, warmup_steps=0, eval_every=0, save_every=0, compile=flag)
        before = len(compiles)
        runs[name] = run_sft(SFTConfig(model=str(tiny_folder), data=str(sft_file), out=str(tmp_path / name),
                                       train=train))
    assert before == 0 < len(compiles)  # only the compiled run went through torch.compile
    assert_same_weights(runs["eager"], runs["compiled"])
    start = load_file(str(tiny_folder / "model.safetensors"))
    trained = load_file(str(runs["compiled"] / "model.safetensors"))
    assert any(not torch.equal(start[k], trained[k]) for k in start)  # it did train


@pytest.mark.parametrize("lora", [0, 4])
def test_compiled_grpo_iteration_is_the_same_update(tiny_folder, prompt_file, tmp_path, lora, compiles):
    runs = {}
    for name, flag in (("eager", False), ("compiled", True)):
        cfg = GRPOConfig(model=str(tiny_folder), prompts=str(prompt_file), out=str(tmp_path / name), inner_iters=2)
        cfg.lora.r = lora  # LoRA: the reference is the policy with its adapters off
        cfg.group_size, cfg.prompts_per_step, cfg.sampling.max_new_tokens = 4, 4, 8
        cfg.train = replace(cfg.train, steps=1, lr=1e-2, batch_size=8, compile=flag)
        before = len(compiles)
        runs[name] = run_grpo(cfg, digits)
    assert before == 0 < len(compiles)  # only the compiled run went through torch.compile
    assert_same_weights(runs["eager"], runs["compiled"])


def test_compiled_ppo_iteration_is_the_same_update(tiny_folder, prompt_file, tmp_path, compiles):
    runs = {}
    for name, flag in (("eager", False), ("compiled", True)):
        train = TrainConfig(steps=1, batch_size=4, lr=3e-3, warmup_steps=0, schedule="constant", eval_every=0,
                            save_every=0, compile=flag)
        cfg = PPOConfig(model=str(tiny_folder), prompts=str(prompt_file), out=str(tmp_path / name),
                        sampling=SamplingConfig(max_new_tokens=8, gen_batch_size=32), rollout_batch=8, epochs=2,
                        beta=0.05, value="head", train=train)
        before = len(compiles)
        runs[name] = run_ppo(cfg, reward=digits)
    assert before == 0 < len(compiles)  # only the compiled run went through torch.compile
    assert_same_weights(runs["eager"], runs["compiled"])
    losses = [json.loads((runs[n] / "metrics.jsonl").read_text().splitlines()[-1])["loss/policy"] for n in runs]
    assert losses[0] == pytest.approx(losses[1], rel=1e-3, abs=1e-6)


def test_compiled_decoding_samples_the_same_tokens(tiny_folder, compiles):
    from tether.models import load_model, load_tokenizer
    from tether.rollout import sample

    model, tok = load_model(tiny_folder), load_tokenizer(tiny_folder)
    prompts = PROMPTS[:6] + ["\n\nHuman: Hi\n\nAssistant:"]  # different widths: left padding
    eager = sample(model, tok, prompts, max_new_tokens=12, seed=3)
    assert not compiles
    assert sample(model, tok, prompts, max_new_tokens=12, seed=3, compile=True) == eager
    assert compiles and hasattr(model, "_compiled_call")  # transformers compiled its decoding call


def test_compiled_scoring_keeps_the_output_layer_out_of_the_graph(tiny_folder, compiles):
    """Only the backbone is compiled: the scoring pass still stands the output layer in for the chunked one (no
    B × T × V logits), with the eager pass's log-probs and gradients, and the model is left as it was."""
    from tether.loop import compiled
    from tether.models import load_model
    from tether.scoring import _output_layer, labelled_logprobs

    model = load_model(tiny_folder)
    fast = compiled(model, TrainConfig(compile=True))
    assert [type(m).__name__ for m in compiles] == ["LlamaModel"]  # the decoder stack, not the causal LM
    assert _output_layer(fast) is not None and fast.config is model.config
    ids = torch.randint(3, model.config.vocab_size, (3, 10), generator=torch.Generator().manual_seed(0))
    mask, labels = torch.ones_like(ids), ids.clone()
    labels[:, :4] = -100
    results = []
    for m in (model, fast):
        model.zero_grad()
        logp, _ = labelled_logprobs(m, ids, mask, labels)
        logp.sum().backward()
        results.append((logp.detach(), model.model.layers[0].mlp.up_proj.weight.grad.clone(), model.lm_head.weight.grad.clone()))
    for a, b in zip(*results):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
    assert type(model.model).__name__ == "LlamaModel"  # the swap is undone after the pass
