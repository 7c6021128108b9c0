"""Loaders for every record format, from every kind of source, with validation at load time.

Sources: a path to ``.jsonl`` / ``.jsonl.gz`` / ``.json`` / ``.csv`` / ``.parquet``, a folder
written by ``datasets.save_to_disk``, an in-memory ``datasets.Dataset`` or list of dicts, or a
hub name (``datasets.load_dataset``). The whole source is validated before a loader returns, so a
stage can refuse bad input before it writes anything; a bad record raises :class:`DataError`
naming the file, the line (or row), the field and what was expected.

``columns`` maps tether's field names to the source's: ``load_prompts("gsm8k.jsonl",
columns={"prompt": "question"})``. Keys a format does not use are kept in ``record.extra``.
With ``skip_invalid=True`` a bad record is skipped instead, and the skips are counted in the log
(a file that cannot be read at all still raises).
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from tether.data.records import DataError, FeedbackRecord, PreferenceRecord, PromptRecord, SFTRecord

log = logging.getLogger("tether.data")

ASSISTANT = "\n\nAssistant:"
ROLES = ("system", "user", "assistant")
FILE_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".csv", ".parquet")

Row = tuple[str, "int | str", dict]  # (source name, line or "row N", the record)


# --- reading rows -------------------------------------------------------------------------


def _decode(raw: bytes, name: str, first_line: int = 1) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = first_line + raw[: e.start].count(b"\n")
        raise DataError(name, line, None, f"invalid UTF-8 (byte {raw[e.start]:#x})") from None


def _read_jsonl(path: Path) -> Iterator[Row]:
    name = path.name
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rb") as f:
        for n, raw in enumerate(f, start=1):
            text = _decode(raw, name, n).strip()
            if not text:
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                raise DataError(name, n, None, f"malformed JSON: {e.msg} (column {e.colno})") from None
            if not isinstance(obj, dict):
                raise DataError(name, n, None, f"expected a JSON object, got {type(obj).__name__}")
            yield name, n, obj


def _read_json(path: Path) -> Iterator[Row]:
    text = _decode(path.read_bytes(), path.name)
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(path.name, e.lineno, None, f"malformed JSON: {e.msg} (column {e.colno})") from None
    if isinstance(obj, dict) and isinstance(obj.get("data"), list):
        obj = obj["data"]
    if not isinstance(obj, list):
        raise DataError(path.name, None, None, 'expected a list of objects (or {"data": [...]}) at the top level')
    for i, row in enumerate(obj, start=1):
        if not isinstance(row, dict):
            raise DataError(path.name, f"row {i}", None, f"expected an object, got {type(row).__name__}")
        yield path.name, f"row {i}", row


def _read_csv(path: Path) -> Iterator[Row]:
    reader = csv.DictReader(io.StringIO(_decode(path.read_bytes(), path.name), newline=""))
    for row in reader:
        yield path.name, reader.line_num, {k: v for k, v in row.items() if k is not None}


def _read_dataset(ds, name: str) -> Iterator[Row]:
    for i, row in enumerate(ds, start=1):
        yield name, f"row {i}", dict(row)


def _looks_local(source: str) -> bool:
    return source.startswith((".", "/", "~")) or source.endswith(FILE_SUFFIXES)


def read_rows(source: Any, split: str = "train", limit: int | None = None) -> Iterator[Row]:
    """Every record of ``source`` as (source name, line or row, dict), at most ``limit`` of them."""
    rows = _rows(source, split)
    for i, row in enumerate(rows):
        if limit is not None and i >= limit:
            return
        yield row


def _rows(source: Any, split: str) -> Iterator[Row]:
    if isinstance(source, Sequence) and not isinstance(source, (str, bytes)):
        for i, row in enumerate(source, start=1):
            if not isinstance(row, Mapping):
                raise DataError("<memory>", f"row {i}", None, f"expected a dict, got {type(row).__name__}")
            yield "<memory>", f"row {i}", dict(row)
        return
    try:
        import datasets
    except ImportError:  # pragma: no cover - datasets is a dependency
        datasets = None
    if datasets is not None and isinstance(source, datasets.Dataset):
        yield from _read_dataset(source, "<dataset>")
        return
    path = Path(str(source)).expanduser()
    if path.is_dir():
        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise DataError(str(path), None, None, f"no split {split!r}; splits: {', '.join(loaded)}")
            loaded = loaded[split]
        yield from _read_dataset(loaded, path.name)
        return
    if path.is_file():
        name = path.name.lower()
        if name.endswith((".jsonl", ".jsonl.gz", ".ndjson")):
            yield from _read_jsonl(path)
        elif name.endswith(".json"):
            yield from _read_json(path)
        elif name.endswith(".csv"):
            yield from _read_csv(path)
        elif name.endswith(".parquet"):
            import pyarrow.parquet as pq

            for i, row in enumerate(pq.read_table(path).to_pylist(), start=1):
                yield path.name, f"row {i}", row
        else:
            raise DataError(path.name, None, None, f"unknown file type; expected one of {', '.join(FILE_SUFFIXES)}")
        return
    if _looks_local(str(source)):
        raise DataError(str(source), None, None, "no such file or folder")
    yield from _read_dataset(datasets.load_dataset(str(source), split=split), str(source))  # a hub name


# --- fields -------------------------------------------------------------------------------


class _Fields:
    """One row, read through the ``columns`` mapping, with errors that say where."""

    def __init__(self, row: Row, columns: Mapping[str, str]):
        self.source, self.line, self.data = row
        self.columns = columns
        self.used: set[str] = set()

    @property
    def where(self) -> str:
        return f"{self.source}:{self.line}"

    def error(self, field: str | None, message: str) -> DataError:
        return DataError(self.source, self.line, field, message)

    def has(self, name: str) -> bool:
        return self.columns.get(name, name) in self.data

    def raw(self, name: str) -> Any:
        key = self.columns.get(name, name)
        if key not in self.data:
            raise self.error(key, f"missing (keys present: {', '.join(sorted(self.data)) or 'none'})")
        self.used.add(key)
        return self.data[key]

    def text(self, name: str) -> str:
        value = self.raw(name)
        key = self.columns.get(name, name)
        if not isinstance(value, str):
            raise self.error(key, f"expected a non-empty string, got {type(value).__name__}")
        if not value.strip():
            raise self.error(key, "expected a non-empty string, got an empty one")
        return value

    def messages(self, name: str) -> list[dict]:
        value = self.raw(name)
        key = self.columns.get(name, name)
        if not isinstance(value, list) or not value:
            raise self.error(key, "expected a non-empty list of {role, content} messages")
        for i, m in enumerate(value):
            if not isinstance(m, Mapping) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                raise self.error(key, f"message {i}: expected {{'role': one of {ROLES}, 'content': a string}}, got {m!r}")
        return [{"role": m["role"], "content": m["content"]} for m in value]

    def extra(self) -> dict:
        return {k: v for k, v in self.data.items() if k not in self.used}


# --- chat rendering -----------------------------------------------------------------------


def render_messages(messages: list[dict], tokenizer=None, add_generation_prompt: bool = False) -> str:
    """Render a conversation: the tokenizer's chat template if it has one, else tether's default.

    The default is the HH-RLHF transcript style the gold world uses: system content first as it
    is, then "\\n\\nHuman: " + content for the user and "\\n\\nAssistant: " + content for the
    assistant; a generation prompt is "\\n\\nAssistant:".
    """
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    parts = []
    for m in messages:
        if m["role"] == "system":
            parts.append(m["content"])
        else:
            parts.append(("\n\nHuman: " if m["role"] == "user" else "\n\nAssistant: ") + m["content"])
    return "".join(parts) + (ASSISTANT if add_generation_prompt else "")


def split_conversation(messages: list[dict], tokenizer=None) -> tuple[str, str]:
    """(prompt, completion) of a conversation whose last message is the assistant's."""
    prompt = render_messages(messages[:-1], tokenizer, add_generation_prompt=True)
    full = render_messages(messages, tokenizer)
    if full.startswith(prompt):
        return prompt, full[len(prompt) :]
    return prompt, messages[-1]["content"]


def _conversation(f: _Fields, name: str, tokenizer) -> tuple[str, str]:
    messages = f.messages(name)
    if messages[-1]["role"] != "assistant":
        raise f.error(f.columns.get(name, name), "the last message must be the assistant's (the response to learn)")
    return split_conversation(messages, tokenizer)


def split_transcripts(f: _Fields, chosen: str, rejected: str) -> tuple[str, str, str]:
    """Implicit prompt (HH-RLHF): the shared prefix up to and including its last "\\n\\nAssistant:"."""
    n = 0
    for a, b in zip(chosen, rejected):
        if a != b:
            break
        n += 1
    cut = chosen.rfind(ASSISTANT, 0, n)
    if cut < 0 or cut + len(ASSISTANT) > n:
        raise f.error("chosen", 'no "prompt" field, and chosen and rejected share no prefix ending in '
                      '"\\n\\nAssistant:" to take as the prompt (expected HH-RLHF-style transcripts)')
    end = cut + len(ASSISTANT)
    return chosen[:end], chosen[end:], rejected[end:]


# --- the loaders --------------------------------------------------------------------------


def _load(source, parse, split, limit, columns, skip_invalid) -> list:
    out, skipped = [], []
    for row in read_rows(source, split, limit):
        try:
            out.extend(parse(_Fields(row, columns or {})))
        except DataError as e:
            if not skip_invalid:
                raise
            skipped.append(e)
    if skipped:
        log.warning("skipped %d invalid record(s) of %s (skip_invalid); the first: %s", len(skipped), source, skipped[0])
    return out


def load_sft(source, *, tokenizer=None, columns: Mapping[str, str] | None = None, limit: int | None = None,
             skip_invalid: bool = False,
             split: str = "train") -> list[SFTRecord]:
    """SFT records from {"prompt","completion"}, {"messages": [...]} or {"text"} rows."""

    def parse(f: _Fields):
        if f.has("messages"):
            prompt, completion = _conversation(f, "messages", tokenizer)
        elif f.has("prompt") or f.has("completion"):
            prompt, completion = f.text("prompt"), f.text("completion")
        elif f.has("text"):
            prompt, completion = "", f.text("text")
        else:
            raise f.error(None, "expected keys prompt + completion, messages, or text; got "
                          + (", ".join(sorted(f.data)) or "none"))
        return [SFTRecord(prompt, completion, f.where, f.extra())]

    return _load(source, parse, split, limit, columns, skip_invalid)


def _preference(f: _Fields, tokenizer) -> tuple[str, str, str]:
    if not (f.has("chosen") and f.has("rejected")):
        raise f.error("chosen" if not f.has("chosen") else "rejected",
                      "missing: a preference record needs chosen and rejected (and optionally prompt)")
    if isinstance(f.raw("chosen"), list):  # conversational
        prefix = f.messages("prompt") if f.has("prompt") else []
        prompt, chosen = _conversation_with(f, prefix, "chosen", tokenizer)
        prompt_r, rejected = _conversation_with(f, prefix, "rejected", tokenizer)
        if prompt_r != prompt:
            raise f.error("rejected", "chosen and rejected conversations must share everything but the last reply")
    elif f.has("prompt"):
        prompt, chosen, rejected = f.text("prompt"), f.text("chosen"), f.text("rejected")
    else:
        prompt, chosen, rejected = split_transcripts(f, f.text("chosen"), f.text("rejected"))
        for name, value in (("chosen", chosen), ("rejected", rejected)):
            if not value.strip():
                raise f.error(name, "expected a non-empty response after the shared prompt, got an empty one")
    if chosen == rejected:
        raise f.error("rejected", "identical to chosen: a pair must differ")
    return prompt, chosen, rejected


def _conversation_with(f: _Fields, prefix: list[dict], name: str, tokenizer) -> tuple[str, str]:
    messages = prefix + f.messages(name)
    if messages[-1]["role"] != "assistant":
        raise f.error(f.columns.get(name, name), "the last message must be the assistant's")
    return split_conversation(messages, tokenizer)


def load_preferences(source, *, tokenizer=None, columns: Mapping[str, str] | None = None, limit: int | None = None,
             skip_invalid: bool = False,
                     split: str = "train") -> list[PreferenceRecord]:
    """Preference pairs: explicit prompt, implicit prompt (HH-RLHF transcripts) or conversations."""

    def parse(f: _Fields):
        prompt, chosen, rejected = _preference(f, tokenizer)
        return [PreferenceRecord(prompt, chosen, rejected, f.where, f.extra())]

    return _load(source, parse, split, limit, columns, skip_invalid)


def _label(f: _Fields) -> bool:
    value = f.raw("label")
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0"):
        return value.strip().lower() in ("true", "1")
    raise f.error(f.columns.get("label", "label"), f"expected true or false, got {value!r}")


def load_feedback(source, *, tokenizer=None, columns: Mapping[str, str] | None = None, limit: int | None = None,
                  skip_invalid: bool = False, split: str = "train", from_pairs: bool = False) -> list[FeedbackRecord]:
    """Unpaired feedback {"prompt","completion","label"}; preference rows (or ``from_pairs``) give
    one desirable (chosen) and one undesirable (rejected) record each."""

    def parse(f: _Fields):
        if from_pairs or not f.has("label"):
            if not f.has("chosen") and not from_pairs:
                raise f.error("label", "missing: expected prompt + completion + label, or a preference pair")
            prompt, chosen, rejected = _preference(f, tokenizer)
            extra = f.extra()
            return [FeedbackRecord(prompt, chosen, True, f.where, extra),
                    FeedbackRecord(prompt, rejected, False, f.where, extra)]
        if f.has("messages"):
            prompt, completion = _conversation(f, "messages", tokenizer)
        else:
            prompt, completion = f.text("prompt"), f.text("completion")
        return [FeedbackRecord(prompt, completion, _label(f), f.where, f.extra())]

    return _load(source, parse, split, limit, columns, skip_invalid)


def load_prompts(source, *, tokenizer=None, columns: Mapping[str, str] | None = None, limit: int | None = None,
             skip_invalid: bool = False,
                 split: str = "train") -> list[PromptRecord]:
    """Prompts {"prompt", ...extras} or {"messages": [...]} (rendered with a generation prompt)."""

    def parse(f: _Fields):
        if f.has("messages") and not f.has("prompt"):
            prompt = render_messages(f.messages("messages"), tokenizer, add_generation_prompt=True)
        else:
            prompt = f.text("prompt")
        return [PromptRecord(prompt, f.where, f.extra())]

    return _load(source, parse, split, limit, columns, skip_invalid)


def fingerprint(records: Sequence) -> str:
    """A content hash of the records (not of where they came from): 16 hex digits, stable across runs."""
    h = hashlib.sha256()
    for rec in records:
        fields = {k: v for k, v in asdict(rec).items() if k != "where"}
        h.update(json.dumps(fields, sort_keys=True, ensure_ascii=False, default=str).encode())
        h.update(b"\n")
    return h.hexdigest()[:16]
