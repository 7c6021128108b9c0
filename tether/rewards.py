"""One reward interface for every stage: ``reward(prompts, responses) -> Tensor (N,)``.

Interchangeable by a config string or an object:

    "gold"                 the gold world's true reward (tether.world.gold_reward)
    "PATH" or "rm:PATH"    a reward model folder written by `tether rm` (an ensemble folder too)
    any callable           (prompts, responses) -> sequence of floats or a tensor
    "exact_match"          1 if the final answer equals the prompt's reference answer (tether.verifiable)
    "format"               1 if the response states a final answer ("#### N" / "The answer is N")
    "overlong(max=L,cache=C)"  DAPO's overlong length shaping over the last C of L tokens
    "a:w1,b:w2,..."        a weighted sum of any of the above, e.g. "exact_match:1.0,format:0.2"

A weighted sum can also be given as a list of (spec, weight) pairs, which lets callables and
paths holding "," or ":" join in. ``exact_match`` needs ``answers`` (a prompt → reference answer
map, see tether.verifiable.answer_map); ``overlong`` needs a ``tokenizer`` to count tokens, and
takes L from ``max_new_tokens`` when ``max=`` is not given (C defaults to L/5, DAPO's ratio).
Learned rewards are normalised (gain and bias stored in the model) unless asked otherwise.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch

from tether.data.collate import Encoded, pad, prompt_ids, response_ids
from tether.errors import ConfigError, ModelError

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
    raise ConfigError(f"aggregation must be one of {AGGREGATIONS}, got {how!r}")


class LearnedReward:
    """A reward model as a reward function (batched, no gradients)."""

    def __init__(self, model, tokenizer, *, normalise: bool = True, batch_size: int = 32, max_len: int | None = None):
        self.model, self.tokenizer = model.eval(), tokenizer
        self.normalise, self.batch_size = normalise, batch_size
        self.max_len = max_len or getattr(model.config, "max_position_embeddings", 2048)

    @classmethod
    def from_folder(cls, folder: str | Path, *, device: str = "cpu", **kwargs) -> LearnedReward:
        """The reward model in ``folder``; one without a trained head (a language model) is a ModelError."""
        from tether.models import load_tokenizer
        from tether.models.reward import load_reward_model

        tokenizer = load_tokenizer(folder)
        return cls(load_reward_model(folder, tokenizer, device=device, require_head=True), tokenizer, **kwargs)

    @torch.no_grad()
    def __call__(self, prompts: Sequence[str], responses: Sequence[str]) -> torch.Tensor:
        from tether.models.reward import normalised, raw_scores

        device = next(self.model.parameters()).device
        heads = [prompt_ids(self.tokenizer, p) for p in prompts]
        rows = [(h + response_ids(self.tokenizer, r))[: self.max_len] for h, r in zip(heads, responses)]
        out = []
        for i in range(0, len(rows), self.batch_size):
            batch = pad([Encoded(ids, ids) for ids in rows[i : i + self.batch_size]], self.tokenizer.pad_token_id)
            scores = raw_scores(self.model, batch["input_ids"].to(device), batch["attention_mask"].to(device),
                                [len(h) for h in heads[i : i + self.batch_size]])  # samples of one prompt share it
            out.append(normalised(self.model, scores) if self.normalise else scores)
        return torch.cat(out).cpu() if out else torch.zeros(0)


class EnsembleReward:
    """K reward models served as one, with ``mean``, ``min`` or ``uwo`` aggregation."""

    def __init__(self, members: Sequence[RewardFn], aggregation: str = "mean", uwo_lambda: float = 1.0):
        if aggregation not in AGGREGATIONS:
            raise ConfigError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
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


def _ensemble_meta(folder: str | Path) -> dict:
    """``tether.json`` of a reward folder ({} when there is none); an unreadable one is a ModelError."""
    meta_path = Path(folder) / "tether.json"
    if not meta_path.is_file():
        return {}
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (ValueError, OSError) as e:
        raise ModelError(f"{meta_path}: not readable as JSON ({type(e).__name__}); expected the tether.json a "
                         "tether stage wrote") from None
    if not isinstance(meta, dict):
        raise ModelError(f"{meta_path}: expected a JSON object, got {type(meta).__name__}")
    return meta


def ensemble_members(folder: str | Path) -> list[Path]:
    """Member folders of an ensemble written by ``tether rm --ensemble K`` ([] for a single RM).

    Each member must be a folder; a malformed ``tether.json`` or a missing member is a ModelError.
    """
    members = _ensemble_meta(folder).get("members") or []
    if not isinstance(members, list) or not all(isinstance(m, str) for m in members):
        raise ModelError(f"{Path(folder) / 'tether.json'}: \"members\" must be a list of folder names, got {members!r:.80}")
    paths = [Path(folder) / m for m in members]
    for p in paths:
        if not p.is_dir():
            raise ModelError(f"{p}: ensemble member named in {Path(folder) / 'tether.json'} is missing; expected "
                             "a reward-model folder")
    return paths


def reward_model_folders(spec) -> list[Path]:
    """Every reward-model folder a reward spec reads, in order, an ensemble as its members ([] for none).

    Terms that are not folders (gold, verifiable terms, callables) are passed over; nothing is loaded.
    """
    if callable(spec):
        return []
    if isinstance(spec, (list, tuple)):
        return [f for s, _ in spec for f in reward_model_folders(s)]
    out = []
    for term, _ in parse_reward_spec(str(spec)):
        if term == "gold" or term.split("(", 1)[0].strip() in VERIFIABLE:
            continue
        folder = Path(term.removeprefix("rm:"))
        if folder.is_dir():
            out.extend(ensemble_members(folder) or [folder])
    return out


class ExactMatchReward:
    """tether.verifiable.exact_match_rewards against the reference answer of each prompt."""

    def __init__(self, answers: Mapping[str, str]):
        self.answers = dict(answers)

    def __call__(self, prompts: Sequence[str], responses: Sequence[str]) -> torch.Tensor:
        from tether.verifiable import exact_match_rewards

        missing = [p for p in prompts if p not in self.answers]
        if missing:
            raise KeyError(f"exact_match: no reference answer for {len(missing)} prompt(s), e.g. {missing[0]!r}; "
                           "give every prompt an \"answer\" field")
        return torch.tensor(exact_match_rewards(responses, [self.answers[p] for p in prompts]), dtype=torch.float32)


class FormatReward:
    """tether.verifiable.format_rewards: 1 for a stated final answer."""

    def __call__(self, prompts: Sequence[str], responses: Sequence[str]) -> torch.Tensor:
        from tether.verifiable import format_rewards

        return torch.tensor(format_rewards(responses), dtype=torch.float32)


class OverlongReward:
    """tether.verifiable.overlong_penalty of each response's length in tokens.

    The length is that of the response text re-tokenised (no special tokens), so an EOS the
    model emitted does not count; a tokenizer whose round trip is not exact may differ by a token.
    """

    def __init__(self, tokenizer, max_tokens: int, cache_tokens: int):
        from tether.verifiable import overlong_penalty

        overlong_penalty(0, max_tokens, cache_tokens)  # checks the sizes now, not at the first call
        self.tokenizer, self.max_tokens, self.cache_tokens = tokenizer, max_tokens, cache_tokens

    def __call__(self, prompts: Sequence[str], responses: Sequence[str]) -> torch.Tensor:
        from tether.verifiable import overlong_penalty

        lengths = [len(ids) for ids in self.tokenizer(list(responses), add_special_tokens=False)["input_ids"]]
        return torch.tensor([overlong_penalty(n, self.max_tokens, self.cache_tokens) for n in lengths],
                            dtype=torch.float32)


class CombinedReward:
    """A weighted sum of named reward terms, R = Σ_k w_k R_k (tether.verifiable.combine)."""

    def __init__(self, terms: Sequence[tuple[str, RewardFn, float]]):
        if not terms:
            raise ValueError("a combined reward needs at least one term")
        self.terms = list(terms)

    def components(self, prompts: Sequence[str], responses: Sequence[str]) -> dict[str, torch.Tensor]:
        """Each term's unweighted reward, keyed by its name. Shape: each (N,)."""
        return {name: torch.as_tensor(fn(prompts, responses), dtype=torch.float32) for name, fn, _ in self.terms}

    def with_components(self, prompts: Sequence[str], responses: Sequence[str]) -> tuple[torch.Tensor, dict]:
        """The weighted sum (N,) and each term's reward, every term scored once."""
        from tether.verifiable import combine

        parts = self.components(prompts, responses)
        total = combine([parts[name].tolist() for name, _, _ in self.terms], [w for _, _, w in self.terms])
        return torch.tensor(total, dtype=torch.float32), parts

    def __call__(self, prompts: Sequence[str], responses: Sequence[str]) -> torch.Tensor:
        return self.with_components(prompts, responses)[0]


VERIFIABLE = ("exact_match", "format", "overlong")


def _split_top(spec: str) -> list[str]:
    """Split on commas outside parentheses: "a:1,b(x=1,y=2):2" -> ["a:1", "b(x=1,y=2):2"]."""
    parts, depth, cur = [], 0, ""
    for ch in spec:
        depth += (ch == "(") - (ch == ")")
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    return parts + [cur]


def parse_reward_spec(spec: str) -> list[tuple[str, float]]:
    """"name[(k=v,...)][:weight],..." -> [(term, weight)]; a term without ":weight" weighs 1.

    The weight is the text after the last ":" when it is a number, so "rm:PATH" stays one term.
    """
    out = []
    for part in _split_top(spec):
        term, weight = part.strip(), 1.0
        head, sep, tail = term.rpartition(":")
        if sep:
            try:
                term, weight = head.strip(), float(tail)
            except ValueError:
                pass
        if not term:
            raise ConfigError(f"reward spec {spec!r}: an empty term")
        out.append((term, weight))
    return out


def _params(term: str) -> tuple[str, dict[str, str]]:
    """"overlong(max=64,cache=16)" -> ("overlong", {"max": "64", "cache": "16"})."""
    if "(" not in term:
        return term, {}
    if not term.endswith(")"):
        raise ConfigError(f"reward term {term!r}: expected name(key=value,...)")
    name, inner = term[:-1].split("(", 1)
    params = {}
    for item in filter(None, (x.strip() for x in inner.split(","))):
        key, eq, value = item.partition("=")
        if not eq:
            raise ConfigError(f"reward term {term!r}: expected key=value, got {item!r}")
        params[key.strip()] = value.strip()
    return name.strip(), params


def _verifiable(term: str, *, answers, tokenizer, max_new_tokens) -> RewardFn:
    name, params = _params(term)
    allowed = {"exact_match": set(), "format": set(), "overlong": {"max", "cache"}}[name]
    if set(params) - allowed:
        raise ConfigError(f"reward {name!r} takes {sorted(allowed) or 'no parameters'}, got {sorted(params)}")
    if name == "exact_match":
        if answers is None:
            raise ConfigError("reward 'exact_match' needs reference answers: give load_reward answers= (a prompt → "
                             "answer map; the RL stages build it from the prompt file's \"answer\" field)")
        return ExactMatchReward(answers)
    if name == "format":
        return FormatReward()
    if tokenizer is None:
        raise ConfigError("reward 'overlong' counts tokens: give load_reward a tokenizer=")
    if "max" not in params and max_new_tokens is None:
        raise ConfigError("reward 'overlong' needs its L_max: overlong(max=N) or load_reward(max_new_tokens=N)")
    try:
        max_tokens = int(params.get("max", max_new_tokens))
        cache_tokens = int(params.get("cache", max(1, max_tokens // 5)))
    except ValueError:
        raise ConfigError(f"reward term {term!r}: max and cache must be whole numbers of tokens") from None
    try:
        return OverlongReward(tokenizer, max_tokens, cache_tokens)
    except ValueError as e:
        raise ConfigError(f"reward term {term!r}: {e}") from None


def load_reward(spec: str | Path | RewardFn | Sequence[tuple[str | Path | RewardFn, float]], *,
                aggregation: str | None = None, uwo_lambda: float = 1.0, normalise: bool = True, device: str = "cpu",
                answers: Mapping[str, str] | None = None, tokenizer=None,
                max_new_tokens: int | None = None) -> RewardFn:
    """Resolve a reward spec (see the module docstring) to a reward function ``(prompts, responses) -> (N,)``.

    ``answers``, ``tokenizer`` and ``max_new_tokens`` serve the verifiable terms; the other
    options the learned ones. A weighted sum is a :class:`CombinedReward` (its ``components``
    gives each term's reward).
    """
    def one(s) -> RewardFn:
        return load_reward(s, aggregation=aggregation, uwo_lambda=uwo_lambda, normalise=normalise, device=device,
                           answers=answers, tokenizer=tokenizer, max_new_tokens=max_new_tokens)

    if callable(spec):
        return lambda p, r: torch.as_tensor(spec(p, r), dtype=torch.float32)
    if isinstance(spec, (list, tuple)):
        return CombinedReward([(s if isinstance(s, str) else getattr(s, "__name__", repr(s)), one(s), float(w))
                               for s, w in spec])
    spec = str(spec)
    terms = parse_reward_spec(spec)
    if len(terms) > 1 or terms[0][1] != 1.0:
        return CombinedReward([(term, one(term), w) for term, w in terms])
    spec = terms[0][0]
    if spec.split("(", 1)[0].strip() in VERIFIABLE:
        return _verifiable(spec, answers=answers, tokenizer=tokenizer, max_new_tokens=max_new_tokens)
    if spec == "gold":
        return GoldReward()
    folder = Path(spec.removeprefix("rm:"))
    if not folder.exists():
        raise FileNotFoundError(f"reward {spec!r}: expected 'gold', one of {VERIFIABLE}, a callable, or a "
                                f"reward-model folder; {folder} does not exist")
    members = ensemble_members(folder)
    if members:
        saved = (_ensemble_meta(folder).get("config") or {}).get("aggregation", "mean")
        return EnsembleReward([LearnedReward.from_folder(m, normalise=normalise, device=device) for m in members],
                              aggregation or saved, uwo_lambda)
    if aggregation not in (None, "mean"):
        raise ConfigError(f"aggregation={aggregation!r} needs an ensemble; {folder} holds a single reward model")
    return LearnedReward.from_folder(folder, normalise=normalise, device=device)


def reward_for_prompts(spec: str, records: Sequence, *, tokenizer=None, max_new_tokens: int | None = None,
                       device: str = "cpu", aggregation: str | None = None) -> RewardFn:
    """:func:`load_reward` for a stage that samples from prompt records (``.prompt``, ``.extra``).

    The reference answers of ``exact_match`` come from the records' "answer" field
    (tether.verifiable.answer_map); a prompt without one is an error here, before any sampling.
    """
    from tether.verifiable import answer_map

    answers = answer_map(records)
    if any(_params(term)[0] == "exact_match" for term, _ in parse_reward_spec(str(spec))):
        missing = sum(r.prompt not in answers for r in records)
        if missing:
            raise ConfigError(f"reward exact_match: {missing} prompt(s) have no \"answer\" field")
    return load_reward(spec, answers=answers, tokenizer=tokenizer, max_new_tokens=max_new_tokens, device=device,
                       aggregation=aggregation)
