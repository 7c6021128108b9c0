"""Capability retention: does the policy still know and compute what its base did?

Multiple choice by log-likelihood, as lm-evaluation-harness scores it (Gao et al., EleutherAI):
each choice c_j is scored by ll_j = log π(c_j | prompt), summed over its tokens, and

    acc      = 1[ argmax_j ll_j = gold ]
    acc_norm = 1[ argmax_j ll_j / bytes(c_j) = gold ]     (bytes: UTF-8 length of the continuation)

(the harness divides by ``len(choice)``, the character count, equal to the byte count for ASCII).
GSM8K-style exact match: greedy answer to each question, right when its final number ("#### N"
or "The answer is N") equals the reference's (the answer after "####").

Under torchrun the greedy answers are generated over ranks and gathered (tether.instruments.shard),
and the choices' log-likelihoods are split over ranks by tether.scoring: every rank calls these.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path

import torch

from tether.data.collate import prompt_ids


@torch.no_grad()
def choice_logliks(model, tokenizer, prompt: str, choices: Sequence[str]) -> list[float]:
    """log π(choice | prompt) summed over the choice's tokens, for each choice (no EOS appended)."""
    from tether.scoring import next_token_logprobs

    ids = [tokenizer(c, add_special_tokens=False)["input_ids"] for c in choices]
    if not all(ids):
        raise ValueError(f"a choice of {prompt!r} tokenises to nothing")
    return next_token_logprobs(model, tokenizer, [prompt_ids(tokenizer, prompt)], ids, batch_size=32)[0].tolist()


def mc_scores(logliks: Sequence[float], choices: Sequence[str], gold: int) -> tuple[float, float]:
    """(acc, acc_norm) of one question from its choices' log-likelihoods (module docstring)."""
    ll = torch.tensor(logliks, dtype=torch.float64)
    nbytes = torch.tensor([len(c.encode("utf-8")) for c in choices], dtype=torch.float64)
    return float(ll.argmax().item() == gold), float((ll / nbytes).argmax().item() == gold)


def mc_eval(model, tokenizer, rows: Sequence[dict]) -> dict[str, float]:
    """acc and acc_norm over rows {"prompt", "choices", "answer_index"}."""
    acc = acc_norm = 0.0
    for i, row in enumerate(rows):
        missing = {"prompt", "choices", "answer_index"} - set(row)
        if missing:
            raise ValueError(f"multiple-choice row {i + 1}: missing field(s) {sorted(missing)}")
        if not 0 <= row["answer_index"] < len(row["choices"]):
            raise ValueError(f"multiple-choice row {i + 1}: answer_index {row['answer_index']} is not a choice")
        a, an = mc_scores(choice_logliks(model, tokenizer, row["prompt"], row["choices"]), row["choices"],
                          row["answer_index"])
        acc, acc_norm = acc + a, acc_norm + an
    n = max(len(rows), 1)
    return {"acc": acc / n, "acc_norm": acc_norm / n, "count": float(len(rows))}


def read_gsm8k(path: str | Path, limit: int = 0, tokenizer=None) -> list[dict]:
    """GSM8K's JSONL ({"question", "answer" ending "#### N"}) as rows {"prompt", "answer"}; the first ``limit``.

    The question is one user message, rendered with ``tokenizer``'s chat template when it has one
    (else HH style: tether.data.render_messages).
    """
    from tether.data import render_messages

    rows = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            from tether.data.records import DataError

            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(str(path), line_no, None, f"malformed JSON: {e.msg} (column {e.colno})") from None
            if not isinstance(rec, dict) or not isinstance(rec.get("question"), str) \
                    or "####" not in str(rec.get("answer", "")):
                raise DataError(str(path), line_no, None, 'expected {"question": str, "answer": "... #### N"} (GSM8K)')
            question = [{"role": "user", "content": rec["question"]}]
            rows.append({"prompt": render_messages(question, tokenizer, add_generation_prompt=True),
                         "answer": rec["answer"]})
            if limit and len(rows) >= limit:
                break
    return rows


LAST_NUMBER = re.compile(r"-?[\d,]*\.?\d+")


def last_number_match(response: str, answer: str) -> bool:
    """GSM8K's flexible match: the response's final answer ("#### N", "The answer is N"), else the last
    number it writes, equals the reference's (what lm-evaluation-harness calls flexible-extract)."""
    from tether.world import exact_match

    if exact_match(response, answer):
        return True
    numbers = [n for n in LAST_NUMBER.findall(response) if any(c.isdigit() for c in n)]
    return bool(numbers) and exact_match(f"#### {numbers[-1]}", answer)


def exact_match_eval(model, tokenizer, rows: Sequence[dict], *, max_new_tokens: int = 64,
                     flexible: bool = False) -> tuple[float, list[str]]:
    """Share of rows {"prompt", "answer"} whose greedy response's final answer matches; and the responses.

    With ``flexible`` a response without a marked final answer is read at its last number
    (:func:`last_number_match`), as instruct models seldom write "#### N".
    """
    from tether.instruments.shard import generate  # over ranks under torchrun
    from tether.world import exact_match

    match = last_number_match if flexible else exact_match
    responses = generate(model, tokenizer, [r["prompt"] for r in rows], max_new_tokens=max_new_tokens, greedy=True)
    hits = [match(y, str(r["answer"])) for r, y in zip(rows, responses)]
    return (sum(hits) / len(hits) if hits else float("nan")), responses
