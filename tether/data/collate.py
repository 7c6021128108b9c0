"""From records to tensors: tokenisation with prompt masks, over-length handling, padding, packing.

Prompt and completion are tokenised separately and concatenated, so the prompt tokens the model
trains on are exactly the tokens it will later be given to continue from.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from tether.data.records import DataError
from tether.losses.lm import IGNORE_INDEX

if TYPE_CHECKING:
    from tether.data.records import SFTRecord

log = logging.getLogger("tether.data")

OVERFLOW_CHOICES = ("truncate", "drop", "error")


@dataclass
class Encoded:
    """One tokenised example: ``labels`` equals ``input_ids`` on response tokens, IGNORE_INDEX elsewhere."""

    input_ids: list[int]
    labels: list[int]


@dataclass
class OverflowCount:
    """How many examples were longer than ``max_len``, and what became of them."""

    truncated: int = 0
    dropped: int = 0


def record_error(rec, field: str | None, message: str) -> DataError:
    """A DataError at a record's ``where`` ("file:line", "file:row N", or "" for one built in code)."""
    source, sep, line = (rec.where or "").rpartition(":")
    if not sep:
        return DataError(rec.where or "<records>", None, field, message)
    return DataError(source, int(line) if line.isdigit() else line, field, message)


def nothing_left(source: str, kind: str, n_records: int, count: OverflowCount, max_len: int, overflow: str,
                 held_out: int = 0, need: int = 1) -> DataError:
    """The error of a stage left with too little to train on (fewer than ``need``), saying where every record went.

    ``kind`` names the units ("examples", "pairs"); ``n_records`` counts the training records,
    ``held_out`` the records set aside for evaluation.
    """
    parts = [f"{n_records + held_out} record(s) read"]
    if held_out:
        parts.append(f"{held_out} held out for evaluation (--eval-fraction)")
    if count.dropped:
        parts.append(f"{count.dropped} dropped as longer than max_len={max_len} (overflow={overflow})")
    if count.truncated:
        parts.append(f"{count.truncated} truncated")
    advice = " (raise --max-len, or pass --overflow truncate)" if count.dropped else ""
    few = f"no {kind}" if need == 1 else f"fewer than {need} {kind}"
    return DataError(str(source), None, None, f"{few} left to train on: {', '.join(parts)}; expected at least "
                     f"{'one' if need == 1 else need}{advice}")


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    """Token ids of a prompt, with the tokenizer's own special prefix (e.g. BOS) if it adds one."""
    return tokenizer(prompt, add_special_tokens=True)["input_ids"] if prompt else []


def response_ids(tokenizer, response: str) -> list[int]:
    """Token ids of a response ending with EOS: how every stage sees a finished response, and how the
    sampler ends one.

    A chat template closes the assistant's turn itself (SmolLM2's ``...<|im_end|>\n``, its EOS then a
    newline): such a response ends at that EOS (what follows it is never sampled, and the reward model
    must read the score where a sampled response ends) instead of getting a second EOS.
    """
    ids, eos = tokenizer(response, add_special_tokens=False)["input_ids"], tokenizer.eos_token_id
    if eos in ids and not tokenizer.decode(ids[len(ids) - ids[::-1].index(eos):]).strip():
        return ids[: len(ids) - ids[::-1].index(eos)]  # up to the turn's closing EOS, whitespace after it dropped
    return ids + [eos]


def encode_sft(
    records: Sequence[SFTRecord], tokenizer, max_len: int, overflow: str = "truncate", train_on_prompt: bool = False
) -> tuple[list[Encoded], OverflowCount]:
    """Tokenise prompt + completion + EOS, labelling only the completion (and EOS).

    ``overflow`` says what happens to an example longer than ``max_len`` tokens: ``truncate``
    cuts it on the right (dropped if nothing of the completion is left), ``drop`` skips it,
    ``error`` raises. Every truncation and drop is counted and logged, never silent.
    """
    if overflow not in OVERFLOW_CHOICES:
        raise ValueError(f"overflow must be one of {OVERFLOW_CHOICES}, got {overflow!r}")
    out, count = [], OverflowCount()
    for rec in records:
        prompt, completion = prompt_ids(tokenizer, rec.prompt), response_ids(tokenizer, rec.completion)
        ids = prompt + completion
        labels = ids.copy() if train_on_prompt else [IGNORE_INDEX] * len(prompt) + completion
        if len(ids) > max_len:
            if overflow == "error":
                raise record_error(rec, None, f"{len(ids)} tokens, longer than max_len={max_len} "
                                   "(choose overflow=truncate or overflow=drop to handle such examples)")
            if overflow == "drop" or len(prompt) >= max_len - 1:
                count.dropped += 1
                continue
            ids, labels = ids[:max_len], labels[:max_len]
            count.truncated += 1
        out.append(Encoded(ids, labels))
    if count.truncated or count.dropped:
        log.warning(
            "%d of %d examples were longer than %d tokens: %d truncated, %d dropped",
            count.truncated + count.dropped, len(records), max_len, count.truncated, count.dropped,
        )
    return out, count


def pack(examples: Sequence[Encoded], max_len: int) -> list[Encoded]:
    """Concatenate examples into rows of ``max_len`` tokens (the last row may be shorter).

    Labels keep their masks, so packed SFT still trains on responses only. Examples in one row
    attend to the ones before them (plain causal attention, as packing usually works); each
    starts after the previous one's EOS, which is how a model learns where a document starts.
    """
    rows: list[Encoded] = []
    ids: list[int] = []
    labels: list[int] = []
    for ex in examples:
        ids.extend(ex.input_ids)
        labels.extend(ex.labels)
        while len(ids) >= max_len:
            rows.append(Encoded(ids[:max_len], labels[:max_len]))
            ids, labels = ids[max_len:], labels[max_len:]
    if any(l != IGNORE_INDEX for l in labels[1:]):
        rows.append(Encoded(ids, labels))
    return rows


def pad(examples: Sequence[Encoded], pad_id: int, side: str = "right") -> dict[str, torch.Tensor]:
    """Pad to the longest example: ``input_ids``, ``attention_mask`` and ``labels``, each (B, T)."""
    width = max(len(ex.input_ids) for ex in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, ex in enumerate(examples):
        n = len(ex.input_ids)
        cols = slice(0, n) if side == "right" else slice(width - n, width)
        ids[i, cols] = torch.tensor(ex.input_ids)
        labels[i, cols] = torch.tensor(ex.labels)
        mask[i, cols] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@dataclass
class EncodedPair:
    """A preference pair tokenised for one forward pass: prompt + chosen and prompt + rejected, each ending in EOS."""

    chosen: list[int]
    rejected: list[int]
    prompt_len: int
    margin: float = 0.0
    label: float = 1.0  # P(chosen ≻ rejected): 1 for a hard label, a soft label in [0, 1] otherwise

    @property
    def width(self) -> int:
        """The columns its batch needs: the longer side's tokens."""
        return max(len(self.chosen), len(self.rejected))


def encode_pairs(records: Sequence, tokenizer, max_len: int, overflow: str = "truncate",
                 margin_field: str = "", label_field: str = "") -> tuple[list[EncodedPair], OverflowCount]:
    """Tokenise preference records (``.prompt``, ``.chosen``, ``.rejected``) for reward modelling.

    ``margin_field`` names an extra column holding a per-pair margin (a number; missing is an error).
    ``label_field`` names an extra column holding a soft label P(chosen ≻ rejected), a number in
    [0, 1] (missing is an error), such as ``label_prob`` of ``tether rlaif label``.

    Over-long pairs follow ``overflow`` as in :func:`encode_sft`; a truncated pair keeps the
    first ``max_len`` tokens of each side (a pair whose prompt alone fills ``max_len`` is dropped,
    since both sides would be identical).
    """
    if overflow not in OVERFLOW_CHOICES:
        raise ValueError(f"overflow must be one of {OVERFLOW_CHOICES}, got {overflow!r}")
    out, count = [], OverflowCount()
    for rec in records:
        prompt = prompt_ids(tokenizer, rec.prompt)
        sides = [prompt + response_ids(tokenizer, t) for t in (rec.chosen, rec.rejected)]
        if max(map(len, sides)) > max_len:
            if overflow == "error":
                raise record_error(rec, None, f"{max(map(len, sides))} tokens, longer than max_len={max_len} "
                                   "(choose overflow=truncate or overflow=drop to handle such pairs)")
            if overflow == "drop" or len(prompt) >= max_len - 1:
                count.dropped += 1
                continue
            sides = [s[:max_len] for s in sides]
            count.truncated += 1
            if sides[0] == sides[1]:
                count.dropped += 1
                continue
        margin = 0.0
        if margin_field:
            value = rec.extra.get(margin_field)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise record_error(rec, margin_field, f"expected a number (the pair's margin), got {value!r:.80}")
            margin = float(value)
        label = 1.0
        if label_field:
            value = rec.extra.get(label_field)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                raise record_error(rec, label_field, "expected a number in [0, 1] (P(chosen ≻ rejected), a soft "
                                   f"label), got {value!r:.80}")
            label = float(value)
        out.append(EncodedPair(sides[0], sides[1], len(prompt), margin, label))
    if count.truncated or count.dropped:
        log.warning("%d of %d pairs were longer than %d tokens: %d truncated, %d dropped",
                    count.truncated + count.dropped, len(records), max_len, count.truncated, count.dropped)
    return out, count


def pad_pairs(pairs: Sequence[EncodedPair], pad_id: int) -> dict[str, torch.Tensor]:
    """One batch of 2B rows, chosen first then rejected, so both sides share one forward pass.

    ``input_ids`` and ``attention_mask`` are (2B, T), right-padded; ``prompt_lengths`` (2B,) each row's prompt
    tokens (a pair's two rows share them: :func:`tether.models.reward.raw_scores` runs them once).
    """
    rows = [Encoded(p.chosen, p.chosen) for p in pairs] + [Encoded(p.rejected, p.rejected) for p in pairs]
    batch = pad(rows, pad_id)
    del batch["labels"]
    batch["prompt_lengths"] = torch.tensor([p.prompt_len for p in pairs] * 2)
    return batch


# --- direct preference optimisation and KTO ------------------------------------------------


def pair_rows(pairs: Sequence[EncodedPair]) -> list[Encoded]:
    """2B labelled rows, every chosen side then every rejected side; prompt tokens get IGNORE_INDEX."""
    def row(ids: list[int], prompt_len: int) -> Encoded:
        return Encoded(ids, [IGNORE_INDEX] * prompt_len + ids[prompt_len:])

    return [row(p.chosen, p.prompt_len) for p in pairs] + [row(p.rejected, p.prompt_len) for p in pairs]


def pad_pairs_labelled(pairs: Sequence[EncodedPair], pad_id: int) -> dict[str, torch.Tensor]:
    """Like :func:`pad_pairs` (chosen first, then rejected: one forward pass), with ``labels``.

    ``input_ids``, ``attention_mask`` and ``labels`` are (2B, T), right-padded; labels are
    IGNORE_INDEX on prompt and padding tokens, so sequence log-probs sum over responses only.
    """
    return pad(pair_rows(pairs), pad_id)


@dataclass
class EncodedFeedback:
    """One unpaired-feedback example (KTO): prompt and completion token ids (completion ends in EOS)."""

    prompt: list[int]
    completion: list[int]
    label: bool


def feedback_row(prompt: list[int], completion: list[int], max_len: int) -> Encoded:
    """prompt + completion cut to ``max_len`` tokens, labelled on the completion only."""
    ids = (prompt + completion)[:max_len]
    return Encoded(ids, ([IGNORE_INDEX] * len(prompt) + completion)[:max_len])


def encode_feedback(records: Sequence, tokenizer, max_len: int,
                    overflow: str = "truncate") -> tuple[list[EncodedFeedback], OverflowCount]:
    """Tokenise feedback records (``.prompt``, ``.completion``, ``.label``); over-long ones as in :func:`encode_sft`."""
    if overflow not in OVERFLOW_CHOICES:
        raise ValueError(f"overflow must be one of {OVERFLOW_CHOICES}, got {overflow!r}")
    out, count = [], OverflowCount()
    for rec in records:
        prompt, completion = prompt_ids(tokenizer, rec.prompt), response_ids(tokenizer, rec.completion)
        if len(prompt) + len(completion) > max_len:
            if overflow == "error":
                raise record_error(rec, None, f"{len(prompt) + len(completion)} tokens, longer than max_len={max_len} "
                                   "(choose overflow=truncate or overflow=drop to handle such examples)")
            if overflow == "drop" or len(prompt) >= max_len - 1:
                count.dropped += 1
                continue
            completion = completion[: max_len - len(prompt)]
            count.truncated += 1
        out.append(EncodedFeedback(prompt, completion, bool(rec.label)))
    if count.truncated or count.dropped:
        log.warning("%d of %d examples were longer than %d tokens: %d truncated, %d dropped",
                    count.truncated + count.dropped, len(records), max_len, count.truncated, count.dropped)
    return out, count
