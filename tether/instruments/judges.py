"""Pairwise judges: which of two responses to a prompt is better?

A judge returns, per prompt, the outcome for response a against response b: 1 (a wins), ½ (tie)
or 0 (b wins). Spec strings (``tether eval --judge``):

    gold                 the gold world's true reward (a pointwise score; ties when equal)
    rm:DIR               a reward model or ensemble folder written by `tether rm` (tether.rewards)
    ensemble:DIR,DIR,... reward models served as one ensemble, mean of members (tether.rewards.EnsembleReward)
    llm:DIR              a causal language model asked which answer is better, in both orders
                         (tether.rlaif.judge.LMJudge, the same judge RLAIF labels with)

A pointwise score cannot prefer a position, so it is asked once. A language-model judge can
(judges favour the first answer shown; Zheng et al. 2023, "Judging LLM-as-a-Judge"), so it is
asked twice with the answers swapped: a wins a prompt when it wins in both orders, loses when it
loses in both, and a split verdict is a tie (½). The share of verdicts that picked the first
position is reported as the judge's position bias (½: none).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import torch

from tether.errors import ConfigError, ModelError

JUDGE_TEMPLATE = ("\n\nHuman: Which answer to the question is better? Reply with A or B.\n"
                  "Question: {question}\nAnswer A: {first}\nAnswer B: {second}\n\nAssistant: The better answer is")


class Judged(NamedTuple):
    """Outcome (N,) for a against b (1, ½ or 0); the share of verdicts that chose the first position (NaN for
    pointwise judges); scores (N,) of a and b where the judge is pointwise (else None)."""

    outcome: torch.Tensor
    first_position_rate: float
    scores_a: torch.Tensor | None = None
    scores_b: torch.Tensor | None = None


def outcome_from_scores(scores_a: torch.Tensor, scores_b: torch.Tensor) -> torch.Tensor:
    """1[s_a > s_b] + ½·1[s_a = s_b]. Shape: (N,), (N,) -> (N,)."""
    a, b = torch.as_tensor(scores_a, dtype=torch.float64), torch.as_tensor(scores_b, dtype=torch.float64)
    return (a > b).double() + 0.5 * (a == b).double()


def both_orders(first_wins_ab: torch.Tensor, first_wins_ba: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Combine verdicts asked in both orders: outcome for a = ½·(v_ab + 1 − v_ba), v = 1 if the judge chose the
    first answer shown (½ for a judge's own tie). Returns the outcome (N,) and the first-position rate."""
    ab, ba = first_wins_ab.double(), first_wins_ba.double()
    return 0.5 * (ab + 1 - ba), torch.cat([ab, ba]).mean().item()


class ScoreJudge:
    """A reward function (prompts, responses) -> scores used as a pairwise judge."""

    def __init__(self, reward_fn, name: str):
        self.reward_fn, self.name = reward_fn, name

    def __call__(self, prompts: Sequence[str], ya: Sequence[str], yb: Sequence[str]) -> Judged:
        sa = torch.as_tensor(self.reward_fn(list(prompts), list(ya)), dtype=torch.float64)
        sb = torch.as_tensor(self.reward_fn(list(prompts), list(yb)), dtype=torch.float64)
        return Judged(outcome_from_scores(sa, sb), float("nan"), sa, sb)


def option_margin(model, tokenizer, texts: Sequence[str], options: tuple[str, str], batch_size: int = 16) -> torch.Tensor:
    """log π(options[0] | text) − log π(options[1] | text) for each text, each option scored over all its tokens
    (tether.scoring.next_token_logprobs). Shape: N texts -> (N,). The two options must tokenise differently.
    """
    from tether.scoring import next_token_logprobs

    ids = [tokenizer(o, add_special_tokens=False)["input_ids"] for o in options]
    if not ids[0] or not ids[1] or ids[0] == ids[1]:
        raise ModelError(f"the judge's tokenizer cannot tell {options[0]!r} from {options[1]!r}")
    ll = next_token_logprobs(model, tokenizer, texts, ids, batch_size=batch_size)  # (N, 2)
    return ll[:, 0] - ll[:, 1]


def load_judge(spec: str, device: str = "cpu"):
    """A judge from its spec string (module docstring)."""
    from tether.rewards import EnsembleReward, LearnedReward, load_reward

    if spec == "gold":
        return ScoreJudge(load_reward("gold"), "gold")
    if spec.startswith("rm:"):
        return ScoreJudge(load_reward(spec, device=device), spec)
    if spec.startswith("ensemble:"):
        folders = [Path(x) for x in spec.removeprefix("ensemble:").split(",") if x]
        missing = [str(f) for f in folders if not f.exists()]
        if len(folders) < 2 or missing:
            raise ConfigError(f"judge {spec!r}: expected ensemble:DIR,DIR,... of at least two reward-model folders"
                             + (f"; missing {missing}" if missing else ""))
        return ScoreJudge(EnsembleReward([LearnedReward.from_folder(f, device=device) for f in folders]), spec)
    if spec.startswith("llm:"):
        from tether.models import load_model, load_tokenizer
        from tether.rlaif.judge import LMJudge

        folder = Path(spec.removeprefix("llm:"))
        if not folder.exists():
            raise FileNotFoundError(f"judge {spec!r}: {folder} does not exist")
        return LMJudge(load_model(folder, device=device), load_tokenizer(folder), batch_size=16, name=spec)
    raise ConfigError(f"judge {spec!r}: expected gold, rm:DIR, ensemble:DIR,DIR,... or llm:DIR")
