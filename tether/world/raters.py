"""Simulated raters: noisy, optionally biased judges of which of two answers is better.

    P(a ≻ b) = σ( (g(a) − g(b)) / τ  +  length_bias · (words(a) − words(b)) / 10
                 + phrase_bias · (has_phrase(a) − has_phrase(b))
                 + sycophancy_bias · (agrees(a) − agrees(b))  +  refusal_bias · (refuses(a) − refuses(b)) )

g is the gold reward. The default τ makes two independent unbiased raters agree on 73% of the
world's preference pairs — InstructGPT's inter-labeller agreement was 72.6 ± 1.5% (Ouyang et al.
2022) — so a reward model trained on rater labels faces label noise of a realistic size. A
biased rater is how reward hacking is produced on purpose: an RM trained on its labels learns the
bias, and a policy optimised against that RM exploits it while the gold reward falls.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from tether.world.gold import gold_reward, is_refusal, parse_question, question_of

# Measured on the default world's preference pairs (tests/world/test_world.py checks 73% ± 3%):
# calibrate_tau on the default world's 3,000 training pairs gives 0.841 (agreement 0.730 at 0.84).
DEFAULT_TAU = 0.84


@dataclass
class Rater:
    """A simulated labeller; every bias is 0 (off) by default, and a strength when on."""

    tau: float = DEFAULT_TAU
    length_bias: float = 0.0
    phrase_bias: float = 0.0
    phrases: tuple[str, ...] = ("delve", "intricate", "tapestry")
    sycophancy_bias: float = 0.0
    refusal_bias: float = 0.0
    seed: int = 0
    _rng: random.Random = field(default=None, init=False, repr=False, compare=False)

    def logit(self, prompt: str, a: str, b: str) -> float:
        """log-odds that a is preferred to b."""
        z = (gold_reward(prompt, a) - gold_reward(prompt, b)) / self.tau
        if self.length_bias:
            z += self.length_bias * (len(a.split()) - len(b.split())) / 10
        if self.phrase_bias:
            z += self.phrase_bias * (self._has_phrase(a) - self._has_phrase(b))
        if self.sycophancy_bias:
            belief = parse_question(question_of(prompt))[1].get("belief")
            if belief:
                z += self.sycophancy_bias * (_names(a, belief) - _names(b, belief))
        if self.refusal_bias:
            z += self.refusal_bias * (is_refusal(a) - is_refusal(b))
        return z

    def prob(self, prompt: str, a: str, b: str) -> float:
        """P(a ≻ b) for this rater."""
        return 1 / (1 + math.exp(-self.logit(prompt, a, b)))

    def label(self, prompt: str, a: str, b: str) -> bool:
        """One sampled judgement: True if a is preferred (the rater's own seeded randomness)."""
        if self._rng is None:
            self._rng = random.Random(self.seed)
        return self._rng.random() < self.prob(prompt, a, b)

    def _has_phrase(self, text: str) -> int:
        low = text.lower()
        return int(any(p in low for p in self.phrases))


def _names(text: str, word: str) -> int:
    return int(word in re.findall(r"[a-z]+", text.lower()))


def agreement(rater: Rater, pairs: Sequence[tuple[str, str, str]]) -> float:
    """Expected agreement of two independent copies of ``rater``: mean of p² + (1 − p)² over pairs."""
    ps = [rater.prob(*pair) for pair in pairs]
    return sum(p * p + (1 - p) * (1 - p) for p in ps) / len(ps)


def calibrate_tau(pairs: Sequence[tuple[str, str, str]], target: float = 0.73) -> float:
    """The τ at which two unbiased raters agree on ``target`` of ``pairs`` (bisection on log τ)."""
    lo, hi = math.log(0.01), math.log(100.0)
    for _ in range(50):
        mid = (lo + hi) / 2
        if agreement(Rater(tau=math.exp(mid)), pairs) > target:
            lo = mid  # raters agree too much: more noise
        else:
            hi = mid
    return math.exp((lo + hi) / 2)
