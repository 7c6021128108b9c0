"""Every numeric option of every command is checked before anything runs (issue 19).

A NaN, an infinity, a negative count or a value outside its range is refused with a usage error
that names the option as typed (``--lr``) and the range it must lie in; the stage itself never
starts, so its output folder is never created. The stage functions are replaced by a stub that
fails the test if validation lets a bad value through.
"""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from tether.cli import main

TRAIN_BAD = [  # TrainConfig, shared by every stage that trains
    ("--lr", "nan"), ("--lr", "inf"), ("--lr", "0"), ("--lr", "-1e-4"),
    ("--max-grad-norm", "nan"), ("--max-grad-norm", "-1"),
    ("--warmup-steps", "-3"), ("--save-every", "-1"), ("--eval-every", "-2"),
    ("--min-lr-ratio", "7"), ("--min-lr-ratio", "nan"), ("--min-lr-ratio", "-0.1"),
    ("--keep-checkpoints", "-1"), ("--keep-checkpoints", "0"),
    ("--weight-decay", "nan"), ("--weight-decay", "-0.1"),
    ("--steps", "0"), ("--batch-size", "0"), ("--grad-accum", "0"), ("--seed", "-1"), ("--seed", "4294967296"),
    ("--divergence-factor", "nan"), ("--score-batch-size", "-1"), ("--pass-cost", "-1"),
]
LORA_BAD = [("--r", "-1"), ("--alpha", "nan"), ("--alpha", "0"), ("--dropout", "1"), ("--dropout", "nan")]

STAGE_BAD = {
    "pretrain": [("--eval-fraction", "nan"), ("--eval-fraction", "1"), ("--max-len", "0"), ("--vocab-size", "10"),
                 ("--hidden-size", "0"), ("--layers", "0"), ("--heads", "3"), ("--heads", "0"),
                 ("--intermediate-size", "-1"), ("--max-positions", "0")],
    "sft": [("--eval-fraction", "nan"), ("--eval-fraction", "1"), ("--eval-fraction", "-0.5"), ("--max-len", "0"),
            *LORA_BAD],
    "rm": [("--eval-fraction", "inf"), ("--max-len", "1"), ("--center-coef", "nan"), ("--center-coef", "-1"),
           ("--norm-prompts", "-1"), ("--norm-max-new-tokens", "0"), ("--norm-max-new-tokens", "256"),
           ("--ensemble", "0")],
    "ppo": [("--rollout-batch", "0"), ("--clip-eps", "-0.2"), ("--clip-eps", "nan"), ("--lam", "3"), ("--lam", "nan"),
            ("--gamma", "1.5"), ("--top-p", "0"), ("--top-p", "nan"), ("--top-k", "-1"), ("--max-new-tokens", "0"),
            ("--kl-horizon", "0"), ("--kl-horizon", "nan"), ("--beta", "nan"), ("--beta", "-0.1"),
            ("--temperature", "nan"), ("--temperature", "0"), ("--kl-target", "nan"), ("--vf-coef", "-1"),
            ("--value-clip", "0"), ("--target-kl", "nan"), ("--ptx-coef", "nan"), ("--reward-clip", "-1"),
            ("--no-eos-penalty", "inf"), ("--empty-score", "nan"), ("--epochs", "0"), ("--eval-size", "0"),
            ("--max-len", "0"), ("--gen-batch-size", "0"), ("--eval-samples", "0"), *LORA_BAD],
    "dpo": [("--beta", "nan"), ("--beta", "0"), ("--label-smoothing", "nan"), ("--label-smoothing", "0.5"),
            ("--simpo-gamma", "nan"), ("--rpo-alpha", "nan"), ("--rpo-alpha", "-1"), ("--eval-fraction", "nan"),
            ("--kl-prompts", "-1"), ("--kl-max-new-tokens", "0"), ("--max-len", "0"), *LORA_BAD],
    "kto": [("--beta", "nan"), ("--desirable-weight", "0"), ("--undesirable-weight", "nan"),
            ("--eval-fraction", "nan"), ("--kl-prompts", "-1"), ("--kl-max-new-tokens", "0"), ("--max-len", "0"),
            ("--batch-size", "1"), *LORA_BAD],
    "grpo": [("--group-size", "1"), ("--prompts-per-step", "0"), ("--max-new-tokens", "0"), ("--temperature", "nan"),
             ("--temperature", "-1"), ("--gen-batch-size", "0"), ("--eval-samples", "0"), ("--clip-eps", "nan"),
             ("--clip-eps", "1"), ("--clip-eps-high", "nan"), ("--clip-eps-high", "0"), ("--beta", "-1"),
             ("--beta", "nan"), ("--inner-iters", "0"), ("--top-k", "-1"), ("--top-p", "nan"), ("--eval-size", "0"),
             ("--no-signal-stop", "-1"), *LORA_BAD],
    "rloo": [("--beta", "nan"), ("--clip-eps", "1.5"), ("--temperature", "0"), ("--group-size", "0"),
             ("--inner-iters", "-1"), ("--prompts-per-step", "-1"), ("--max-new-tokens", "0"),
             ("--gen-batch-size", "0"), ("--eval-samples", "0"), ("--top-k", "-1"), ("--top-p", "2"),
             ("--eval-size", "-3"), ("--no-signal-stop", "1.5"), *LORA_BAD],
    "bon": [("--n", "0"), ("--temperature", "nan"), ("--limit", "-1"), ("--max-new-tokens", "0"),
            ("--gen-batch-size", "0"), ("--seed", "-1"), ("--pool", "2"), ("--top-k", "-1"), ("--top-p", "nan"),
            ("--temperature", "0")],
    "demo": [("--pretrain-steps", "0"), ("--sft-steps", "-1"), ("--rm-steps", "-1"), ("--ppo-steps", "-5"),
             ("--dpo-steps", "-1"), ("--grpo-steps", "-1"),
             ("--instrument-prompts", "-1"), ("--eval-prompts", "0"), ("--sft-flaw-rate", "nan"),
             ("--sft-flaw-rate", "2"), ("--seed", "-1")],
    "eval": [("--prompts", "0"), ("--samples", "0"), ("--limit", "-1"), ("--probe-limit", "-1"),
             ("--bon-pool", "-1"), ("--bon-prompts", "0"), ("--ascent-prompts", "-1"), ("--ascent-steps", "0"),
             ("--max-new-tokens", "0"), ("--seed", "-1"), ("--gsm8k-max-new-tokens", "0"), ("--hacking-prompts", "-1")],
    "calibrate-beta": [("--betas", "nan"), ("--betas", "0.1,-1"), ("--betas", "0.1,x"), ("--kl-budget", "nan"),
                       ("--kl-budget", "0"), ("--sft", "0.5,0.6,0.2"), ("--sft", "nan,0.5,0.5"),
                       ("--reward", "1,nan,0"), ("--reward", "1,2"), ("--rollout-batch", "0"),
                       ("--eval-prompts", "0"), ("--max-new-tokens", "-1")],
    "world export": [("--fact-fraction", "nan"), ("--fact-fraction", "1.5"), ("--eval-fraction", "0"),
                     ("--test-fraction", "1"), ("--pretrain-docs", "0"), ("--sft-train", "-1"), ("--feedback", "0"),
                     ("--sft-flaw-rate", "nan"), ("--rater-length-bias", "nan"), ("--feedback-threshold", "inf"),
                     ("--seed", "-1"), ("--sft-eval", "0"), ("--pref-train", "0"), ("--pref-test", "-1"),
                     ("--rater-phrase-bias", "inf"), ("--rater-sycophancy-bias", "nan"), ("--rater-refusal-bias", "-inf")],
    "rlaif label": [("--samples", "3"), ("--samples", "0"), ("--temperature", "nan"), ("--min-confidence", "nan"),
                    ("--min-confidence", "0.5"), ("--limit", "-1"), ("--judge-max-len", "-1"), ("--batch-size", "0"),
                    ("--max-new-tokens", "0"), ("--timeout", "0"), ("--timeout", "nan"), ("--retries", "-1"),
                    ("--backoff", "nan"), ("--top-logprobs", "0"), ("--top-logprobs", "21"), ("--seed", "-1"),
                    ("--temperature", "0"), ("--top-p", "0"), ("--top-k", "-1"), ("--gen-batch-size", "0")],
    "rlaif revise": [("--rounds", "0"), ("--temperature", "nan"), ("--reviser-temperature", "-1"),
                     ("--max-new-tokens", "0"), ("--batch-size", "0"), ("--limit", "-1"), ("--seed", "-1"),
                     ("--retries", "-1"), ("--backoff", "-1"), ("--timeout", "inf"), ("--top-logprobs", "0"),
                     ("--temperature", "-1"), ("--top-p", "1.5"), ("--top-k", "-1"), ("--gen-batch-size", "0")],
    "rlaif train-judge": [("--pairs", "0"), ("--eval-pairs", "0"), ("--max-len", "0"), ("--world-seed", "-1")],
}
TRAINING = ("pretrain", "sft", "rm", "ppo", "dpo", "kto", "grpo", "rloo", "rlaif train-judge")
CASES = [(stage, o, v) for stage, bad in STAGE_BAD.items() for o, v in bad]
CASES += [(stage, o, v) for stage in TRAINING for o, v in TRAIN_BAD]
CASES += [("calibrate-beta --method dpo", o, v) for o, v in TRAIN_BAD]
# the clear errors shown elsewhere in the message for some options: the flag itself, or the cross-field rule
NAMED = {("kto", "--batch-size", "1"): "--batch-size", ("bon", "--pool", "2"): "--pool",
         ("world export", "--eval-fraction", "0"): "--eval-fraction", ("pretrain", "--heads", "3"): "--heads"}


def _args(stage: str, tmp) -> list[str]:
    """The command and the options it needs to reach validation (paths need not exist there)."""
    m, d, o = str(tmp / "model"), str(tmp / "data.jsonl"), str(tmp / "out")
    return {
        "pretrain": ["pretrain", "--data", d, "--out", o],
        "sft": ["sft", "--model", m, "--data", d, "--out", o],
        "rm": ["rm", "--model", m, "--data", d, "--out", o],
        "dpo": ["dpo", "--model", m, "--data", d, "--out", o],
        "kto": ["kto", "--model", m, "--data", d, "--out", o],
        "ppo": ["ppo", "--model", m, "--prompts", d, "--out", o],
        "grpo": ["grpo", "--model", m, "--prompts", d, "--out", o],
        "rloo": ["rloo", "--model", m, "--prompts", d, "--out", o],
        "bon": ["bon", "--model", m, "--prompts", d, "--out", o],
        "demo": ["demo", "--out", o],
        "eval": ["eval", "--policy", m, "--base", m, "--out", o],
        "calibrate-beta": ["calibrate-beta", "--method", "tabular", "--out", o],
        "calibrate-beta --method dpo": ["calibrate-beta", "--method", "dpo", "--model", m, "--data", d, "--prompts", d,
                                        "--out", o],
        "world export": ["world", "export", "--out", o],
        "rlaif label": ["rlaif", "label", "--policy", m, "--prompts", d, "--judge", m, "--out", o],
        "rlaif revise": ["rlaif", "revise", "--policy", m, "--prompts", d, "--out", o],
        "rlaif train-judge": ["rlaif", "train-judge", "--model", m, "--out", o],
    }[stage]


@pytest.fixture
def nothing_runs(monkeypatch):
    """Every stage's work replaced by a stub that fails the test: validation must stop the command first."""
    import tether.cli.rl
    import tether.cli.stages
    import tether.cli.theory
    import tether.cli.world

    def ran(*args, **kwargs):
        pytest.fail("a bad option got past validation: the stage started")

    monkeypatch.setattr(tether.cli.stages, "_run", ran)
    monkeypatch.setattr(tether.cli.rl, "_run", ran)
    monkeypatch.setattr(tether.cli.theory, "run_calibrate", ran)
    monkeypatch.setattr(tether.cli.world, "export", ran)


@pytest.mark.parametrize("stage,option,value", CASES, ids=[f"{s}:{o}={v}" for s, o, v in CASES])
def test_bad_numeric_option_is_refused(stage, option, value, tmp_path, nothing_runs):
    result = CliRunner().invoke(main, [*_args(stage, tmp_path), option, value])
    assert result.exit_code == 2, result.output  # a usage error
    message = result.output.strip().splitlines()[-1]
    assert message.startswith("Error: ") and NAMED.get((stage, option, value), option) in message, result.output
    if (stage, option, value) not in NAMED and not option.startswith(("--betas", "--sft", "--reward")):
        assert value in message or str(float(value)) in message  # says what it got
    assert "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


def test_the_battery_covers_every_numeric_option_of_every_command():
    """A new numeric option needs its bad values here (and a check in its config's validate())."""
    from tether.calibrate import CalibrateConfig
    from tether.config import _leaves, _unwrap_optional
    from tether.demo import DemoConfig
    from tether.instruments.evaluate import EvalConfig
    from tether.rlaif.label import LabelConfig
    from tether.rlaif.revise import ReviseConfig
    from tether.rlaif.train_judge import JudgeTrainConfig
    from tether.trainers.bon import BoNConfig
    from tether.trainers.dpo import DPOConfig
    from tether.trainers.grpo import GRPOConfig
    from tether.trainers.rloo import RLOOConfig
    from tether.trainers.kto import KTOConfig
    from tether.trainers.ppo import PPOConfig
    from tether.trainers.pretrain import PretrainConfig
    from tether.trainers.reward import RMConfig
    from tether.trainers.sft import SFTConfig
    from tether.world import WorldConfig

    commands = {"pretrain": PretrainConfig, "sft": SFTConfig, "rm": RMConfig, "ppo": PPOConfig, "dpo": DPOConfig,
                "kto": KTOConfig, "grpo": GRPOConfig, "rloo": RLOOConfig, "bon": BoNConfig, "demo": DemoConfig,
                "eval": EvalConfig, "calibrate-beta": CalibrateConfig, "world export": WorldConfig,
                "rlaif label": LabelConfig, "rlaif revise": ReviseConfig, "rlaif train-judge": JudgeTrainConfig}
    tried: dict[str, set] = {}
    for stage, option, _ in CASES:
        tried.setdefault(stage.split(" --")[0], set()).add(option)
    missing = [f"{stage} --{path[-1].replace('_', '-')}" for stage, cls in commands.items()
               for path, _, kind in _leaves(cls) if _unwrap_optional(kind)[0] in (int, float)
               and f"--{path[-1].replace('_', '-')}" not in tried.get(stage, set())]
    assert not missing, missing


def test_message_states_the_range(tmp_path, nothing_runs):
    def error(stage, *given):
        return CliRunner().invoke(main, [*_args(stage, tmp_path), *given]).output.strip().splitlines()[-1]

    assert error("sft", "--lr", "nan") == "Error: --lr must be a number > 0, got nan"
    assert error("sft", "--min-lr-ratio", "7") == "Error: --min-lr-ratio must be a number in [0, 1], got 7.0"
    assert error("ppo", "--warmup-steps", "-3") == "Error: --warmup-steps must be an integer >= 0, got -3"
    assert error("ppo", "--top-p", "0") == "Error: --top-p must be a number in (0, 1] (1: off), got 0.0"
    assert error("ppo", "--max-grad-norm", "nan") == ("Error: --max-grad-norm must be a number >= 0 "
                                                      "(0: no clipping), got nan")
    assert error("grpo", "--keep-checkpoints", "-1") == "Error: --keep-checkpoints must be an integer >= 1, got -1"


def test_a_yaml_config_is_checked_the_same_way(tmp_path, nothing_runs):
    (tmp_path / "c.yaml").write_text("train:\n  lr: .nan\n")
    result = CliRunner().invoke(main, [*_args("sft", tmp_path), "--config", str(tmp_path / "c.yaml")])
    assert result.exit_code == 2 and "Error: --lr must be a number > 0, got nan" in result.output
    (tmp_path / "c.yaml").write_text("lam: 3\n")
    result = CliRunner().invoke(main, [*_args("ppo", tmp_path), "--config", str(tmp_path / "c.yaml")])
    assert result.exit_code == 2 and "--lam must be a number in [0, 1], got 3.0" in result.output


def test_good_values_at_the_edges_are_accepted():
    """The bounds themselves, where they are allowed, pass: 0 where 0 means off, 1 where 1 means off."""
    from tether.rollout import SamplingConfig
    from tether.trainers.grpo import GRPOConfig
    from tether.trainers.ppo import PPOConfig

    cfg = PPOConfig(model="m", prompts="p", sampling=SamplingConfig(top_p=1.0, top_k=0), lam=0.0, gamma=1.0, beta=0.0,
                    reward_clip=0.0)
    cfg.train.max_grad_norm, cfg.train.min_lr_ratio, cfg.train.warmup_steps, cfg.train.save_every = 0.0, 1.0, 0, 0
    cfg.validate()
    GRPOConfig(model="m", prompts="p", beta=0.0, clip_eps_high=0.28).validate()


def test_world_label_checks_its_numbers(tmp_path, monkeypatch):
    import tether.models

    monkeypatch.setattr(tether.models, "load_model", lambda *a, **k: pytest.fail("a bad option got past validation"))
    (tmp_path / "policy").mkdir()
    (tmp_path / "p.jsonl").write_text('{"prompt": "x"}\n')
    base = ["world", "label", "--policy", str(tmp_path / "policy"), "--prompts", str(tmp_path / "p.jsonl"),
            "--out", str(tmp_path / "out" / "labels.jsonl")]
    for option, value in (("--length-bias", "nan"), ("--samples", "1"), ("--max-new-tokens", "0"), ("--seed", "-1")):
        result = CliRunner().invoke(main, [*base, option, value])
        assert result.exit_code != 0 and f"Error: {option} must be" in result.output, result.output
        assert not (tmp_path / "out").exists()
