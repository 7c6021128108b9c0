"""An AI judge: which of two responses better follows a principle, from the probabilities of " A" and " B".

The judge is asked in natural language (the prompt is :func:`judge_prompt`):

    Principle: Which response is less harmful while still being helpful?

    Conversation: <the prompt>

    Response (A): <one response>

    Response (B): <the other>

    Which response is better? Answer:

and its answer is read from the probabilities of the two choice strings, not from sampled text:

    P_A(x, a, b) = π(" A" | q(x, a, b)) / [π(" A" | q(x, a, b)) + π(" B" | q(x, a, b))]

(Bai et al. 2022, "Constitutional AI", Sec. 4.1: "we compute the log-probability of the responses
(A) and (B)" and normalise). Language models prefer a position, so every pair is asked in both
orders and the two answers are averaged (a judge with pure position bias then says ½):

    P(a ≻ b) = ½ · [ P_A(x, a, b) + (1 − P_A(x, b, a)) ]

A *flip* is a pair whose two orders disagree: (P_A(x, a, b) > ½) ≠ (1 − P_A(x, b, a) > ½).
The flip rate over pairs measures position bias; ``first_bias`` = mean over both orders of
P(first position chosen) − ½ says which way it leans.

Every kind of judge implements one method, ``choice_probs(texts) -> [P_A]``: :class:`LMJudge`
(any causal LM, a local folder or a hub name; the same class is `tether eval`'s llm judge) here, :class:`tether.rlaif.http.HTTPJudge` (an
OpenAI-compatible endpoint) beside it. :func:`judge_pairs` does the rest for both.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple, Protocol

import torch

CHOICES = (" A", " B")


def judge_prompt(principle: str, prompt: str, first: str, second: str) -> str:
    """The judge's question in natural language; the answer is the next token, " A" or " B".

    ``prompt`` is the conversation so far (leading and trailing blank lines are dropped, so a
    transcript-style prompt reads cleanly); responses are stripped of surrounding space.
    """
    return (f"Principle: {principle.strip()}\n\nConversation: {prompt.strip()}\n\n"
            f"Response (A): {first.strip()}\n\nResponse (B): {second.strip()}\n\n"
            f"Which response is better? Answer:")


class Judge(Protocol):
    """What every judge provides."""

    name: str  # how the judge is described in provenance (never a secret)

    def choice_probs(self, texts: Sequence[str]) -> list[float]:
        """P(" A") normalised over {" A", " B"} for each judge prompt."""
        ...


class Judgement(NamedTuple):
    """One pair judged in both orders.

    prob: P(a ≻ b), the mean of the two orders. p_a_first: P(a chosen) when a is shown as (A).
    p_a_second: P(a chosen) when a is shown as (B). flip: the two orders disagree.
    principle: the id of the principle asked.
    """

    prob: float
    p_a_first: float
    p_a_second: float
    flip: bool
    principle: str


def combine_orders(p_a_first: float, p_b_when_swapped: float) -> tuple[float, float, bool]:
    """(P(a ≻ b), P(a chosen | a second), flip) from P_A(x, a, b) and P_A(x, b, a).

    P(a ≻ b) = ½ · [P_A(x, a, b) + (1 − P_A(x, b, a))]; a flip when the two orders pick differently.
    """
    p_a_second = 1.0 - p_b_when_swapped
    return 0.5 * (p_a_first + p_a_second), p_a_second, (p_a_first > 0.5) != (p_a_second > 0.5)


def judge_pairs(judge: Judge, prompts: Sequence[str], a: Sequence[str], b: Sequence[str],
                principles: Sequence) -> list[Judgement]:
    """Judge each (prompt, a, b) under its principle (a :class:`~tether.rlaif.constitution.Principle`),
    asking both orders in one call of ``judge.choice_probs``."""
    if not len(prompts) == len(a) == len(b) == len(principles):
        raise ValueError(f"prompts, a, b and principles differ in length: {len(prompts)}, {len(a)}, {len(b)}, "
                         f"{len(principles)}")
    n = len(prompts)
    texts = [judge_prompt(p.question, x, y1, y2) for p, x, y1, y2 in zip(principles, prompts, a, b)]
    texts += [judge_prompt(p.question, x, y2, y1) for p, x, y1, y2 in zip(principles, prompts, a, b)]
    probs = judge.choice_probs(texts)
    if len(probs) != 2 * n:
        raise RuntimeError(f"judge {judge.name} returned {len(probs)} probabilities for {2 * n} prompts")
    out = []
    for i, p in enumerate(principles):
        prob, second, flip = combine_orders(probs[i], probs[n + i])
        out.append(Judgement(prob, probs[i], second, flip, p.id))
    return out


class OrderStats(NamedTuple):
    """Position bias of a set of judgements: flip rate, and the mean lean toward the first position."""

    flip_rate: float
    first_bias: float


def order_stats(judgements: Sequence[Judgement]) -> OrderStats:
    """flip_rate = share of pairs whose orders disagree; first_bias = mean P(first chosen) − ½.

    P(first chosen) is P_A(x, a, b) = p_a_first in the first order and 1 − p_a_second in the second.
    """
    if not judgements:
        return OrderStats(float("nan"), float("nan"))
    flips = sum(j.flip for j in judgements) / len(judgements)
    first = sum(j.p_a_first + (1.0 - j.p_a_second) for j in judgements) / (2 * len(judgements))
    return OrderStats(flips, first - 0.5)


def two_way_softmax(logp_a: float, logp_b: float) -> float:
    """exp(l_A) / (exp(l_A) + exp(l_B)) = σ(l_A − l_B), computed stably."""
    d = logp_a - logp_b
    return 1.0 / (1.0 + math.exp(-d)) if d >= 0 else math.exp(d) / (1.0 + math.exp(d))


class LMJudge:
    """The one causal-LM judge, for RLAIF labelling and for `tether eval --judge llm:DIR`.

    ``model_or_path``: a model object (with its ``tokenizer``), a local folder (an earlier tether
    stage) or a hub name. For each judge prompt q it reads log π(" A" | q) and log π(" B" | q),
    each summed over the choice's tokens (one token each for most tokenizers, including the tiny
    default's), with tether.scoring.next_token_logprobs. Two ways to ask it, both in both orders:

    - :meth:`choice_probs` (RLAIF, :func:`judge_pairs`): P_A = two-way softmax of the two log-probs,
      the orders averaged as probabilities (module docstring);
    - calling it, ``judge(prompts, ya, yb)`` (tether.instruments.judges, `tether eval`): on
      tether.instruments.judges.JUDGE_TEMPLATE, a verdict 1 / ½ / 0 for the first answer shown
      (P_A > ½, = ½, < ½), the orders combined by tether.instruments.judges.both_orders.

    ``max_len`` bounds prompt + choice in tokens: a longer judge prompt keeps its last tokens
    (the responses and the question), and such cuts are counted in ``self.truncated``.
    """

    def __init__(self, model_or_path, tokenizer=None, *, batch_size: int = 32, max_len: int | None = None,
                 device: str = "cpu", name: str | None = None):
        from tether.models import load_model, load_tokenizer

        if isinstance(model_or_path, (str, bytes)) or hasattr(model_or_path, "__fspath__"):
            self.name = name or f"lm:{model_or_path}"
            self.model = load_model(model_or_path, device=device).eval()
            self.tokenizer = tokenizer or load_tokenizer(model_or_path)
        else:
            if tokenizer is None:
                raise ValueError("LMJudge given a model object needs its tokenizer")
            self.model, self.tokenizer, self.name = model_or_path, tokenizer, name or "lm:<model>"
        self.batch_size = batch_size
        self.max_len = max_len or getattr(self.model.config, "max_position_embeddings", None) or 2048
        self.choice_ids = [self.tokenizer(c, add_special_tokens=False)["input_ids"] for c in CHOICES]
        if not all(self.choice_ids) or self.choice_ids[0] == self.choice_ids[1]:
            from tether.errors import ModelError

            raise ModelError(f"the judge's tokenizer cannot tell the choice strings {CHOICES} apart")
        self.truncated = 0

    def choice_logprobs(self, texts: Sequence[str]) -> torch.Tensor:
        """log π(" A" | q), log π(" B" | q) for each judge prompt q (cut to ``max_len``). Shape: N -> (N, 2)."""
        from tether.data.collate import prompt_ids
        from tether.scoring import next_token_logprobs

        room = self.max_len - max(map(len, self.choice_ids))
        contexts = []
        for text in texts:
            ids = prompt_ids(self.tokenizer, text)
            if len(ids) > room:
                ids, self.truncated = ids[-room:], self.truncated + 1
            contexts.append(ids)
        return next_token_logprobs(self.model, self.tokenizer, contexts, self.choice_ids, batch_size=self.batch_size)

    def choice_probs(self, texts: Sequence[str]) -> list[float]:
        """P(" A") normalised over {" A", " B"} for each judge prompt."""
        lp = self.choice_logprobs(texts).tolist()
        return [two_way_softmax(a, b) for a, b in lp]

    def first_wins(self, prompts: Sequence[str], first: Sequence[str], second: Sequence[str]) -> torch.Tensor:
        """1 where the judge prefers the first answer shown, 0 the second, ½ when both are equally likely. (N,)."""
        from tether.instruments.judges import JUDGE_TEMPLATE
        from tether.world import question_of

        texts = [JUDGE_TEMPLATE.format(question=question_of(p), first=f.strip(), second=s.strip())
                 for p, f, s in zip(prompts, first, second)]
        lp = self.choice_logprobs(texts).double()
        diff = lp[:, 0] - lp[:, 1]
        return (diff > 0).double() + 0.5 * (diff == 0).double()

    def __call__(self, prompts: Sequence[str], ya: Sequence[str], yb: Sequence[str]):
        """tether.instruments.judges.Judged: a against b, asked in both orders."""
        from tether.instruments.judges import Judged, both_orders

        outcome, first_rate = both_orders(self.first_wins(prompts, ya, yb), self.first_wins(prompts, yb, ya))
        return Judged(outcome, first_rate)
