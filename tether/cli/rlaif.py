"""RLAIF and Constitutional AI as commands: ``tether rlaif label``, ``revise``, ``train-judge``, ``constitution``."""

from __future__ import annotations

import json

import click

from tether.cli import stages
from tether.config import options
from tether.rlaif.label import LabelConfig, run_label
from tether.rlaif.revise import ReviseConfig, run_revise
from tether.rlaif.train_judge import JudgeTrainConfig, run_train_judge


def _run(fn, cfg):
    """A stage's run (a malformed constitution or a failed endpoint is a TetherError: one line at tether.cli)."""
    return stages._run(fn, cfg)


def _summary(path) -> dict:
    return json.loads(path.with_name(path.name.removesuffix(".jsonl") + ".summary.json").read_text())


@click.group()
def rlaif() -> None:
    """AI feedback from a written constitution: label preferences, revise responses, train a judge."""


@rlaif.command("label")
@options(LabelConfig)
def label(cfg: LabelConfig) -> None:
    """Sample response pairs from a policy, ask the judge (both orders), write soft-labelled preferences.

    The file is ready for `tether rm` (soft labels with --label-field label_prob) and `tether dpo`.
    Under torchrun sampling and judging are split over ranks and rank 0 writes the file.
    """
    from tether import distributed

    out = _run(run_label, cfg)
    if not distributed.env().main:  # under torchrun: rank 0 wrote the file and speaks
        return
    s = _summary(out)
    click.echo(f"  pairs {s['pairs']}  (left out: {s['left_out'] or 'none'})")
    click.echo(f"  mean soft label {s['mean_label_prob']:.3f}  flip rate when the order is swapped {s['flip_rate']:.3f}")
    if "gold_agreement" in s:
        click.echo(f"  agreement with gold {s['gold_agreement']:.3f} on {s['gold_pairs']} pairs gold does not tie")
    click.echo(f"preferences in {out}")


@rlaif.command("revise")
@options(ReviseConfig)
def revise(cfg: ReviseConfig) -> None:
    """Constitutional AI's supervised stage: critique, then revise, each response; write the revisions as SFT data."""
    out = _run(run_revise, cfg)
    s = _summary(out)
    click.echo(f"  rows {s['rows']} of {s['prompts']} prompts, {s['changed']} changed by revision "
               f"(left out: {s['left_out'] or 'none'})")
    click.echo(f"SFT data in {out}")


@rlaif.command("train-judge")
@options(JudgeTrainConfig)
def train_judge(cfg: JudgeTrainConfig) -> None:
    """Train a small judge in the gold world from gold-labelled comparisons; report its held-out agreement and position bias."""
    out = _run(run_train_judge, cfg)
    metrics = json.loads((out / "judge_eval.json").read_text())
    for key, value in metrics.items():
        click.echo(f"  {key:<40}{value:>10.4f}")
    click.echo(f"judge in {out}")


@rlaif.command("constitution")
@click.argument("path", default="default")
def constitution(path: str) -> None:
    """Check a constitution file (or show the default) and list its principles."""
    from tether.rlaif.constitution import load_constitution

    c = load_constitution(path)
    click.echo(f"{c.name or c.source}: {len(c.principles)} principles (fingerprint {c.fingerprint()})")
    for p in c.principles:
        click.echo(f"  {p.id:<12} w={p.weight:g}  {p.question}" + ("" if p.critique and p.revision else "  [no revise requests]"))


COMMANDS = [rlaif]
