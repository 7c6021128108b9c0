"""tether: RLHF you can measure.

The InstructGPT pipeline (pretrain -> SFT -> reward model -> PPO with a KL penalty to the SFT
policy), its variants, and the instruments that tell whether a run worked.

The Python API mirrors the command line: one config dataclass and one ``run_*`` function a stage,
importable from here (``from tether import DPOConfig, run_dpo``). Each ``run_*`` returns the
output folder, whose ``tether.json`` holds the final metrics. The names load on first use, so
``import tether`` alone stays cheap (it does not import torch).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# public name -> the module that defines it (imported on first access; PEP 562)
_EXPORTS = {
    # stages: a config and the function that runs it
    "PretrainConfig": "tether.trainers.pretrain", "run_pretrain": "tether.trainers.pretrain",
    "SFTConfig": "tether.trainers.sft", "run_sft": "tether.trainers.sft",
    "RMConfig": "tether.trainers.reward", "run_rm": "tether.trainers.reward",
    "DPOConfig": "tether.trainers.dpo", "run_dpo": "tether.trainers.dpo",
    "KTOConfig": "tether.trainers.kto", "run_kto": "tether.trainers.kto",
    "PPOConfig": "tether.trainers.ppo", "run_ppo": "tether.trainers.ppo",
    "GRPOConfig": "tether.trainers.grpo", "run_grpo": "tether.trainers.grpo",
    "RLOOConfig": "tether.trainers.rloo", "run_rloo": "tether.trainers.rloo",
    "BoNConfig": "tether.trainers.bon", "run_bon": "tether.trainers.bon",
    "LabelConfig": "tether.rlaif.label", "run_label": "tether.rlaif.label",
    "ReviseConfig": "tether.rlaif.revise", "run_revise": "tether.rlaif.revise",
    # the groups the stage configs share
    "TrainConfig": "tether.loop", "LoraConfig": "tether.models", "SamplingConfig": "tether.rollout",
    # rewards and instruments
    "load_reward": "tether.rewards",
    "EvalConfig": "tether.instruments.evaluate", "run_eval": "tether.instruments.evaluate",
    "diagnose": "tether.instruments.diagnose", "format_diagnosis": "tether.instruments.diagnose",
    # the errors a caller may catch (each also a ValueError, OSError or RuntimeError)
    "TetherError": "tether.errors", "ConfigError": "tether.errors", "ModelError": "tether.errors",
    "CheckpointError": "tether.errors", "OutputError": "tether.errors", "DataError": "tether.data.records",
    "TrainingDiverged": "tether.loop", "ConstitutionError": "tether.rlaif.constitution",
    "HTTPError": "tether.rlaif.http",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'tether' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # what type checkers and editors see; nothing here runs
    from tether.data.records import DataError
    from tether.errors import CheckpointError, ConfigError, ModelError, OutputError, TetherError
    from tether.instruments.diagnose import diagnose, format_diagnosis
    from tether.instruments.evaluate import EvalConfig, run_eval
    from tether.loop import TrainConfig, TrainingDiverged
    from tether.models import LoraConfig
    from tether.rewards import load_reward
    from tether.rlaif.constitution import ConstitutionError
    from tether.rlaif.http import HTTPError
    from tether.rlaif.label import LabelConfig, run_label
    from tether.rlaif.revise import ReviseConfig, run_revise
    from tether.rollout import SamplingConfig
    from tether.trainers.bon import BoNConfig, run_bon
    from tether.trainers.dpo import DPOConfig, run_dpo
    from tether.trainers.grpo import GRPOConfig, run_grpo
    from tether.trainers.kto import KTOConfig, run_kto
    from tether.trainers.ppo import PPOConfig, run_ppo
    from tether.trainers.pretrain import PretrainConfig, run_pretrain
    from tether.trainers.reward import RMConfig, run_rm
    from tether.trainers.rloo import RLOOConfig, run_rloo
    from tether.trainers.sft import SFTConfig, run_sft
