"""What the RL tests share: a toy reward a freshly initialised tiny model can climb."""

from __future__ import annotations


def digits(prompts, responses) -> list[float]:
    """A dense toy reward: the share of the response's characters that are digits."""
    return [sum(c.isdigit() for c in r) / max(len(r), 1) for r in responses]


def digits_failing_at(call: int, error: Exception):
    """``digits``, except that its ``call``-th call raises ``error``: a run killed while scoring that iteration."""
    calls = []

    def reward(prompts, responses) -> list[float]:
        calls.append(1)
        if len(calls) == call:
            raise error
        return digits(prompts, responses)

    return reward
