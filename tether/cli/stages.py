"""The pipeline's stages as commands: ``tether pretrain``, ``sft``, ``rm``, ``ppo``, ``dpo``, ``kto``, ``demo``."""

from __future__ import annotations

import logging

import click

from tether.config import options
from tether.demo import DemoConfig, format_report, run_demo
from tether.trainers.dpo import DPOConfig, run_dpo
from tether.trainers.kto import KTOConfig, run_kto
from tether.trainers.ppo import PPOConfig, run_ppo
from tether.trainers.pretrain import PretrainConfig, run_pretrain
from tether.trainers.reward import RMConfig, run_rm
from tether.trainers.sft import SFTConfig, run_sft


def _setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("transformers", "datasets", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _run(fn, cfg):
    """Run a stage with logging set up (an error becomes one line at the command group: tether.cli)."""
    from tether import distributed

    _setup_logging()
    if hasattr(cfg, "train"):  # under torchrun: join the world with the backend of the configured device
        distributed.setup(cfg.train.device)
        if not distributed.env().main:  # one rank speaks
            logging.getLogger().setLevel(logging.WARNING)
    return fn(cfg)


def _say(text: str) -> None:
    """Print a command's result: under torchrun rank 0 alone speaks."""
    from tether import distributed

    if distributed.env().main:
        click.echo(text)


@click.command()
@options(PretrainConfig)
def pretrain(cfg: PretrainConfig) -> None:
    """Stage 0: causal-LM pretraining (builds the tiny default with --model tiny)."""
    _say(f"pretrained model in {_run(run_pretrain, cfg)}")


@click.command()
@options(SFTConfig)
def sft(cfg: SFTConfig) -> None:
    """Stage 1: supervised fine-tuning on demonstrations (prompt tokens masked)."""
    _say(f"SFT model in {_run(run_sft, cfg)}")


@click.command()
@options(RMConfig)
def rm(cfg: RMConfig) -> None:
    """Stage 2: a Bradley–Terry reward model on preference pairs (an ensemble with --ensemble K)."""
    import json

    out = _run(run_rm, cfg)
    metrics = json.loads((out / "tether.json").read_text())["metrics"]
    shown = {k: v for k, v in metrics.items() if k.startswith(("eval/", "rm/norm")) and isinstance(v, float)}
    if shown:
        _say("held-out evaluation (also in tether.json):")
        for key, value in shown.items():
            _say(f"  {key:<40}{value:>10.4f}")
    _say(f"reward model in {out}")


@click.command()
@options(PPOConfig)
def ppo(cfg: PPOConfig) -> None:
    """Stage 3: PPO with a KL penalty to the SFT policy (--steps counts iterations of rollout + update)."""
    _say(f"PPO policy in {_run(run_ppo, cfg)}")


@click.command()
@options(DPOConfig)
def dpo(cfg: DPOConfig) -> None:
    """Direct preference optimisation: DPO / cDPO / robust / IPO / hinge / SimPO (--loss) on preference pairs."""
    _say(f"DPO policy in {_run(run_dpo, cfg)}")


@click.command()
@options(KTOConfig)
def kto(cfg: KTOConfig) -> None:
    """Kahneman–Tversky optimisation on unpaired (desirable / undesirable) feedback."""
    _say(f"KTO policy in {_run(run_kto, cfg)}")


@click.command()
@options(DemoConfig)
def demo(cfg: DemoConfig) -> None:
    """The whole pipeline on the embedded gold world, with a report at the end."""
    _say(format_report(_run(run_demo, cfg)))


COMMANDS = [pretrain, sft, rm, ppo, dpo, kto, demo]
