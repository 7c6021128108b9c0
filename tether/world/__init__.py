"""The gold world: a small instruction-following domain whose true reward is known.

Task families (tasks.py), the gold reward (gold.py), simulated raters (raters.py), and the data
built from a seed (build.py), and rater-labelled pairs of a policy's own samples (sampled.py). See docs/world.md for the formulas and the measured figures.
"""

from tether.world.build import World, WorldConfig, build_world, export
from tether.world.gold import (
    exact_match,
    extract_answer,
    format_prompt,
    gold_reward,
    gold_rewards,
    is_refusal,
    parse_question,
    question_of,
)
from tether.world.raters import DEFAULT_TAU, Rater, agreement, calibrate_tau
from tether.world.sampled import policy_preferences
from tether.world.tasks import candidates

__all__ = [
    "DEFAULT_TAU",
    "Rater",
    "World",
    "WorldConfig",
    "agreement",
    "build_world",
    "calibrate_tau",
    "candidates",
    "exact_match",
    "export",
    "extract_answer",
    "format_prompt",
    "gold_reward",
    "gold_rewards",
    "is_refusal",
    "parse_question",
    "policy_preferences",
    "question_of",
]
