"""One reward interface for every stage: ``reward(prompts, responses) -> Tensor (N,)``.

Interchangeable by a config string or an object:

    "gold"                 the gold world's true reward (tether.world.gold_reward)
    "PATH" or "rm:PATH"    a reward model folder written by `tether rm` (an ensemble folder too)
    any callable           (prompts, responses) -> sequence of floats or a tensor

Learned rewards are normalised (gain and bias stored in the model) unless asked otherwise.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from tether.data.collate import Encoded, pad, prompt_ids, response_ids

RewardFn = Callable[[Sequence[str], Sequence[str]], torch.Tensor]
AGGREGATIONS = ("mean", "min", "uwo")


def aggregate(scores: torch.Tensor, how: str = "mean", uwo_lambda: float = 1.0) -> torch.Tensor:
    """Combine ensemble members' rewards (Coste et al. 2023). Shape: (K, N) -> (N,).

    mean: (1/K) Σ_k r_k;  min: min_k r_k (worst case);
    uwo:  mean − λ · Var_k(r_k), uncertainty-weighted, with the population variance (divide by K).
    """
    if how == "mean":
        return scores.mean(0)
    if how == "min":
        return scores.min(0).values
    if how == "uwo":
        return scores.mean(0) - uwo_lambda * scores.var(0, unbiased=False)
    raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {how!r}")


class LearnedReward:
    """A reward model as a reward function (batched, no gradients)."""

    def __init__(self, model, tokenizer, *, normalise: bool = True, batch_size: int = 32, max_len: int | None = None):
        self.model, self.tokenizer = model.eval(), tokenizer
        self.normalise, self.batch_size = normalise, batch_size
        self.max_len = max_len or getattr(model.config, "max_position_embeddings", 2048)

    @classmethod
    def from_folder(cls, folder: str | Path, *, device: str = "cpu", **kwargs) -> LearnedReward:
        from tether.models import load_tokenizer
        from tether.models.reward import load_reward_model

        tokenizer = load_tokenizer(folder)
        return cls(load_reward_model(folder, tokenizer, device=device), tokenizer, **kwargs)

    @torch.no_grad()
    def __call__(self, prompts: Sequence[str], responses: Sequence[str]) -> torch.Tensor:
        from tether.models.reward import normalised, raw_scores

        device = next(self.model.parameters()).device
        rows = [(prompt_ids(self.tokenizer, p) + response_ids(self.tokenizer, r))[: self.max_len]
                for p, r in zip(prompts, responses)]
        out = []
        for i in range(0, len(rows), self.batch_size):
            batch = pad([Encoded(ids, ids) for ids in rows[i : i + self.batch_size]], self.tokenizer.pad_token_id)
            scores = raw_scores(self.model, batch["input_ids"].to(device), batch["attention_mask"].to(device))
            out.append(normalised(self.model, scores) if self.normalise else scores)
        return torch.cat(out).cpu() if out else torch.zeros(0)


class EnsembleReward:
    """K reward models served as one, with ``mean``, ``min`` or ``uwo`` aggregation."""

    def __init__(self, members: Sequence[RewardFn], aggregation: str = "mean", uwo_lambda: float = 1.0):
        if aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
        self.members, self.aggregation, self.uwo_lambda = list(members), aggregation, uwo_lambda

    def member_scores(self, prompts: Sequence[str], responses: Sequence[str]) -> torch.Tensor:
        """Every member's reward. Shape: (K, N)."""
        return torch.stack([torch.as_tensor(m(prompts, responses), dtype=torch.float32) for m in self.members])

    def __call__(self, prompts: Sequence[str], responses: Sequence[str]) -> torch.Tensor:
        return aggregate(self.member_scores(prompts, responses), self.aggregation, self.uwo_lambda)


class GoldReward:
    """The gold world's true reward as a reward function."""

    def __call__(self, prompts: Sequence[str], responses: Sequence[str]) -> torch.Tensor:
        from tether.world import gold_rewards

        return torch.tensor(gold_rewards(list(prompts), list(responses)), dtype=torch.float32)


def ensemble_members(folder: str | Path) -> list[Path]:
    """Member folders of an ensemble written by ``tether rm --ensemble K`` ([] for a single RM)."""
    meta_path = Path(folder) / "tether.json"
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    return [Path(folder) / m for m in meta.get("members", [])]


def load_reward(spec: str | Path | RewardFn, *, aggregation: str | None = None, uwo_lambda: float = 1.0,
                normalise: bool = True, device: str = "cpu") -> RewardFn:
    """Resolve a reward spec (see the module docstring) to a reward function."""
    if callable(spec):
        return lambda p, r: torch.as_tensor(spec(p, r), dtype=torch.float32)
    spec = str(spec)
    if spec == "gold":
        return GoldReward()
    folder = Path(spec.removeprefix("rm:"))
    if not folder.exists():
        raise FileNotFoundError(f"reward {spec!r}: expected 'gold', a callable, or a reward-model folder; {folder} does not exist")
    members = ensemble_members(folder)
    if members:
        return EnsembleReward([LearnedReward.from_folder(m, normalise=normalise, device=device) for m in members],
                              aggregation or json.loads((folder / "tether.json").read_text())["config"]["aggregation"],
                              uwo_lambda)
    if aggregation not in (None, "mean"):
        raise ValueError(f"aggregation={aggregation!r} needs an ensemble; {folder} holds a single reward model")
    return LearnedReward.from_folder(folder, normalise=normalise, device=device)
