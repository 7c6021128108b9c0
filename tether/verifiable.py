"""Verifiable rewards: scores a program can check, with no reward model.

    exact_match   R = 1[final answer of y = reference answer of x]            (0 or 1)
    format        R = 1[y states a final answer as "#### N" or "The answer is N"]  (0 or 1)
    overlong      DAPO's soft overlong punishment (Yu et al. 2025, eq. 13), a function of |y| in tokens

The final answer is read by tether.world.extract_answer (the number after the last "####" or
"The answer is"), and compared by tether.world.exact_match, so GSM8K-style answers ("... #### 72")
and bare numbers both work as references.

Reference answers. The reward interface is ``reward(prompts, responses)``; a reward that needs
the reference answer gets it from a prompt → answer map given when it is built
(``tether.rewards.load_reward("exact_match", answers=...)``). :func:`answer_map` builds that map
from prompt records whose extra fields hold ``"answer"`` (how ``tether grpo`` / ``rloo`` / ``bon``
read prompt files). Scoring a prompt the map does not hold is an error, never a silent 0.

Everything here is a pure function of strings and numbers.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from tether.world import exact_match, extract_answer


def exact_match_rewards(responses: Sequence[str], answers: Sequence[str]) -> list[float]:
    """R_i = 1 if the final answer of ``responses[i]`` equals ``answers[i]``, else 0.

    DeepSeekMath / DeepSeek-R1's accuracy reward, the GSM8K convention for the final answer.
    Shape: N responses, N answers -> N floats in {0, 1}.
    """
    if len(responses) != len(answers):
        raise ValueError(f"{len(responses)} responses but {len(answers)} answers")
    return [1.0 if exact_match(r, str(a)) else 0.0 for r, a in zip(responses, answers)]


def format_rewards(responses: Sequence[str]) -> list[float]:
    """R_i = 1 if ``responses[i]`` states a final answer ("#### N" or "The answer is N"), else 0.

    A format reward in the spirit of DeepSeek-R1's (which checks its think/answer tags): it pays
    for a parseable answer whether or not it is right. Shape: N responses -> N floats in {0, 1}.
    """
    return [0.0 if extract_answer(r) is None else 1.0 for r in responses]


def overlong_penalty(length: int, max_tokens: int, cache_tokens: int) -> float:
    """DAPO's soft overlong punishment of a response of ``length`` tokens (Yu et al. 2025, eq. 13):

        R(y) = 0                                   if |y| ≤ L_max − L_cache
             = ((L_max − L_cache) − |y|) / L_cache if L_max − L_cache < |y| ≤ L_max
             = −1                                  if |y| > L_max

    L_max = ``max_tokens`` (DAPO: the generation budget, 20480), L_cache = ``cache_tokens``
    (DAPO: 4096). The penalty falls linearly from 0 to −1 over the last L_cache tokens.
    """
    if cache_tokens < 1 or cache_tokens > max_tokens:
        raise ValueError(f"need 1 <= cache_tokens <= max_tokens, got cache {cache_tokens}, max {max_tokens}")
    if length > max_tokens:
        return -1.0
    free = max_tokens - cache_tokens
    return 0.0 if length <= free else (free - length) / cache_tokens


def combine(scores: Sequence[Sequence[float]], weights: Sequence[float]) -> list[float]:
    """Weighted sum of K reward terms, R_i = Σ_k w_k · R_k,i. Shape: (K, N), (K,) -> N floats."""
    if len(scores) != len(weights):
        raise ValueError(f"{len(scores)} reward terms but {len(weights)} weights")
    n = len(scores[0]) if scores else 0
    if any(len(s) != n for s in scores):
        raise ValueError("every reward term must score the same responses")
    return [sum(w * s[i] for w, s in zip(weights, scores)) for i in range(n)]


def answer_map(records: Iterable, field: str = "answer") -> dict[str, str]:
    """prompt → reference answer from prompt records (``.prompt``, ``.extra``) or dicts.

    Records without the field are left out (a reward that needs them fails when it meets such a
    prompt); two different answers for the same prompt are an error.
    """
    out: dict[str, str] = {}
    for rec in records:
        prompt, extra = (rec["prompt"], rec) if isinstance(rec, Mapping) else (rec.prompt, rec.extra)
        if field not in extra or extra[field] is None:
            continue
        answer = str(extra[field])
        if out.setdefault(prompt, answer) != answer:
            from tether.data.records import DataError

            raise DataError("the prompt records", None, field,
                            f"prompt {prompt!r} has two different answers, {out[prompt]!r} and {answer!r}; "
                            "expected one answer a prompt")
    return out
