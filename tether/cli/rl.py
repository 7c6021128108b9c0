"""Critic-free RL and best-of-N as commands: ``tether grpo``, ``rloo``, ``bon``."""

from __future__ import annotations

import json

import click

from tether import distributed
from tether.cli.stages import _run, _say
from tether.config import options
from tether.trainers.bon import BoNConfig, run_bon
from tether.trainers.grpo import GRPOConfig, run_grpo
from tether.trainers.rloo import RLOOConfig, run_rloo


def _show(out, prefixes: tuple[str, ...]) -> bool:
    """Print the run's final metrics with these prefixes; under torchrun rank 0 alone speaks (returns whether it did)."""
    if not distributed.env().main:
        return False
    metrics = json.loads((out / "tether.json").read_text())["metrics"]
    for key, value in metrics.items():
        if key.startswith(prefixes) and isinstance(value, float):
            click.echo(f"  {key:<32}{value:>10.4f}")
    return True


@click.command()
@options(GRPOConfig)
def grpo(cfg: GRPOConfig) -> None:
    """GRPO: G samples a prompt, group-relative advantages, clipped loss with β·KL to the reference (k3).

    --scale none --aggregation constant gives Dr. GRPO; --aggregation token --clip-eps-high 0.28
    --dynamic-sampling --beta 0 gives DAPO's choices. Rewards: --reward gold, an RM folder, or
    verifiable terms such as "exact_match:1.0,format:0.2" (answers from the prompt file's "answer").
    """
    out = _run(run_grpo, cfg)
    _show(out, ("reward/", "kl/", "eval/", "objective/"))
    _say(f"GRPO policy in {out}")


@click.command()
@options(RLOOConfig)
def rloo(cfg: RLOOConfig) -> None:
    """RLOO: k samples a prompt, leave-one-out baseline, −β·KL per token summed into the reward (k1)."""
    out = _run(run_rloo, cfg)
    _show(out, ("reward/", "kl/", "eval/", "objective/"))
    _say(f"RLOO policy in {out}")


@click.command()
@options(BoNConfig)
def bon(cfg: BoNConfig) -> None:
    """Best-of-N sampling against a reward; reports the measured KL beside log N − (N − 1)/N."""
    out = _run(run_bon, cfg)
    if _show(out, ("bon/", "base/")):
        click.echo(f"best-of-{cfg.n} responses in {out / 'responses.jsonl'}")


COMMANDS = [grpo, rloo, bon]
