"""What the RL tests share: a toy reward a freshly initialised tiny model can climb."""

from __future__ import annotations


def digits(prompts, responses) -> list[float]:
    """A dense toy reward: the share of the response's characters that are digits."""
    return [sum(c.isdigit() for c in r) / max(len(r), 1) for r in responses]
