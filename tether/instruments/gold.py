"""Score a policy against the gold world's true reward on held-out prompts.

Only possible inside the gold world, where the true reward is known: mean gold reward overall
and per task family, exact-match accuracy on arithmetic, and mean response length.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

from tether.rollout import generate
from tether.world import exact_match, gold_rewards


def gold_eval(model, tokenizer, rows: Sequence[dict], *, max_new_tokens: int = 64, seed: int = 0,
              greedy: bool = False) -> dict[str, float]:
    """Generate for each prompt row ({"prompt", "family", optional "answer"}) and score with the gold reward."""
    prompts = [r["prompt"] for r in rows]
    responses = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, seed=seed, greedy=greedy)
    rewards = gold_rewards(prompts, responses)
    by_family: dict[str, list[float]] = defaultdict(list)
    for r, g in zip(rows, rewards):
        by_family[r.get("family", "all")].append(g)
    metrics = {"gold/reward": sum(rewards) / len(rewards),
               "gold/length_words": sum(len(x.split()) for x in responses) / len(responses)}
    metrics.update({f"gold/reward_{fam}": sum(v) / len(v) for fam, v in sorted(by_family.items())})
    arith = [(r, x) for r, x in zip(rows, responses) if r.get("family") == "arithmetic" and "answer" in r]
    if arith:
        metrics["gold/arithmetic_exact_match"] = sum(exact_match(x, str(r["answer"])) for r, x in arith) / len(arith)
    return metrics
