"""Preference pairs over a policy's own samples, labelled by a simulated rater.

This is how InstructGPT (Ouyang et al. 2022, Sec. 3.5) and the DPO paper (Rafailov et al. 2023,
Sec. 6.1) collect comparisons: responses sampled from the SFT policy, a labeller picks one. The
world's exported preferences (tether.world.build) compare answers from a fixed generator of graded
quality instead, which is model-free but off-policy; on-policy pairs show the policy's own mistakes.

For each prompt, ``samples`` responses are drawn (temperature 1) and split into consecutive
pairs (1st vs 2nd, 3rd vs 4th, ...); a pair of identical responses carries no preference, and an
empty response is not valid preference data (tether.data rejects it): such pairs are left out and
counted in the log. Each row is in tether's preference format with the gold rewards of both
sides, so a reward model or DPO run on it reports agreement with gold as well.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from tether.world.gold import gold_reward
from tether.world.raters import Rater

log = logging.getLogger("tether.world")


def policy_preferences(policy, tokenizer, rows: Sequence[dict], rater: Rater, *, samples: int = 2,
                       max_new_tokens: int = 64, seed: int = 0, batch_size: int = 32) -> list[dict]:
    """Rater-labelled pairs of ``policy``'s samples on prompt rows ({"prompt", optional "family"}), sampled
    ``batch_size`` rows at a time (the samples of a prompt share its prefill: tether.decoding).

    Returns rows {"prompt", "chosen", "rejected", "family", "gold_chosen", "gold_rejected"}:
    at most ``samples // 2`` pairs a prompt (fewer where two samples are identical).
    """
    from tether.rollout import generate

    if samples < 2 or samples % 2:
        raise ValueError(f"samples must be an even number of at least 2, got {samples}")
    prompts = [r["prompt"] for r in rows for _ in range(samples)]  # sample k of row i at i·samples + k
    responses = generate(policy, tokenizer, prompts, max_new_tokens=max_new_tokens, seed=seed, batch_size=batch_size)
    out, identical, empty = [], 0, 0
    for i, row in enumerate(rows):
        for k in range(0, samples, 2):
            a, b = responses[i * samples + k], responses[i * samples + k + 1]
            if a == b:
                identical += 1
                continue
            if not a.strip() or not b.strip():
                empty += 1
                continue
            prompt = row["prompt"]
            if not rater.label(prompt, a, b):
                a, b = b, a
            out.append({"prompt": prompt, "chosen": a, "rejected": b, "family": row.get("family", "other"),
                        "gold_chosen": gold_reward(prompt, a), "gold_rejected": gold_reward(prompt, b)})
    if identical or empty:
        log.info("of %d sampled pairs, %d were identical and %d had an empty side: left out",
                 len(rows) * (samples // 2), identical, empty)
    return out
