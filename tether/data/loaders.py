"""Loaders for every record format, from every kind of source, with validation at load time.

Sources: a path to ``.jsonl`` / ``.jsonl.gz`` / ``.json`` / ``.csv`` / ``.parquet`` (``.json``
and ``.csv`` may be gzipped too), a folder written by ``datasets.save_to_disk`` (a DatasetDict
folder gives ``split``), an in-memory ``datasets.Dataset`` / ``DatasetDict``, a list of dicts, or
a hub name (``datasets.load_dataset(name, split=split)``). The whole source is validated before a
loader returns, so a stage can refuse bad input before it writes anything; a bad record raises
:class:`DataError` naming the file, the line (or row), the field and what was expected.

``columns`` maps tether's field names to the source's: ``load_prompts("gsm8k.jsonl",
columns={"prompt": "question"})``. Keys a format does not use are kept in ``record.extra``.
With ``skip_invalid=True`` a bad record is skipped instead, and the skips are counted in the log
(a file that cannot be read at all still raises, as does one with no records or whose every
record was skipped: a stage never trains on nothing).

Chat models: given a tokenizer with a chat template, every record is rendered with it, message
lists and string rows alike (an HH-RLHF transcript becomes its turns: :class:`ChatFormat`), so a
response ends with the template's end of turn. A stage's ``--no-chat-template`` passes no
tokenizer: strings are used as given and messages in tether's HH transcript style.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import logging
import os
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any, NamedTuple

from tether.data.records import DataError, FeedbackRecord, PreferenceRecord, PromptRecord, SFTRecord

log = logging.getLogger("tether.data")

HUMAN = "\n\nHuman:"
ASSISTANT = "\n\nAssistant:"
ROLES = ("system", "user", "assistant")
FILE_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".csv", ".parquet")
FIELDS = ("prompt", "completion", "text", "messages", "chosen", "rejected", "label")  # what `columns` may map


class Row(NamedTuple):
    """One input record and where it came from."""

    source: str  # the file's name, "<memory>" or the dataset's name
    line: int | str  # 1-based line of a JSONL / CSV file, or "row N"
    data: dict
    textual: bool = False  # True for CSV, where every value is a string (labels read "true"/"0")


# --- reading rows -------------------------------------------------------------------------


def _decode(raw: bytes, name: str, first_line: int = 1) -> str:
    """Text of ``raw`` (UTF-8, a leading BOM dropped); invalid UTF-8 raises naming its line."""
    try:
        return raw.decode("utf-8-sig" if first_line == 1 else "utf-8")
    except UnicodeDecodeError as e:
        line = first_line + raw[: e.start].count(b"\n")
        raise DataError(name, line, None, f"invalid UTF-8 (byte {raw[e.start]:#x}); expected UTF-8 text") from None


def _open_bytes(path: Path):
    """A binary file object for ``path``, decompressed when its name ends in ``.gz``."""
    return gzip.open(path, "rb") if path.name.lower().endswith(".gz") else open(path, "rb")


def _read_bytes(path: Path) -> bytes:
    """All bytes of ``path`` (decompressed); a corrupt gzip file raises DataError."""
    try:
        with _open_bytes(path) as f:
            return f.read()
    except (OSError, EOFError) as e:
        raise DataError(path.name, None, None, f"cannot read the file: {e}") from None


def _read_jsonl(path: Path) -> Iterator[Row]:
    """One row per non-blank line; each line must hold a JSON object."""
    name = path.name
    try:
        with _open_bytes(path) as f:
            for n, raw in enumerate(f, start=1):
                text = _decode(raw, name, n).strip()
                if not text:
                    continue  # blank lines are allowed (and still counted)
                try:
                    obj = json.loads(text)
                except json.JSONDecodeError as e:
                    raise DataError(name, n, None, f"malformed JSON: {e.msg} (column {e.colno})") from None
                if not isinstance(obj, dict):
                    raise DataError(name, n, None, f"expected a JSON object, got {_kind(obj)}")
                yield Row(name, n, obj)
    except (OSError, EOFError) as e:  # a corrupt .gz
        raise DataError(name, None, None, f"cannot read the file: {e}") from None


def _read_json(path: Path) -> Iterator[Row]:
    """Rows of a JSON file holding a list of objects, or {"data": [...]}; rows are "row N"."""
    try:
        obj = json.loads(_decode(_read_bytes(path), path.name))
    except json.JSONDecodeError as e:
        raise DataError(path.name, e.lineno, None, f"malformed JSON: {e.msg} (column {e.colno})") from None
    if isinstance(obj, dict) and isinstance(obj.get("data"), list):
        obj = obj["data"]
    if not isinstance(obj, list):
        raise DataError(path.name, None, None,
                        f'expected a list of objects (or {{"data": [...]}}) at the top level, got {_kind(obj)}')
    for i, row in enumerate(obj, start=1):
        if not isinstance(row, dict):
            raise DataError(path.name, f"row {i}", None, f"expected a JSON object, got {_kind(row)}")
        yield Row(path.name, f"row {i}", row)


def _read_csv(path: Path) -> Iterator[Row]:
    """Rows of a CSV file with a header; a row's line is the file line it starts on (header = 1)."""
    reader = csv.reader(io.StringIO(_decode(_read_bytes(path), path.name), newline=""))
    try:
        header = next(reader)
    except StopIteration:
        raise DataError(path.name, 1, None, "empty file; expected a header line naming the columns") from None
    except csv.Error as e:
        raise DataError(path.name, 1, None, f"malformed CSV: {e}") from None
    start = reader.line_num + 1
    while True:
        try:
            values = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            raise DataError(path.name, start, None, f"malformed CSV: {e}") from None
        line, start = start, reader.line_num + 1
        if not values:
            continue  # a blank line
        if len(values) != len(header):
            raise DataError(path.name, line, None,
                            f"expected {len(header)} values (columns {', '.join(header)}), got {len(values)}")
        yield Row(path.name, line, dict(zip(header, values)), textual=True)


def _read_parquet(path: Path) -> Iterator[Row]:
    """Rows of a Parquet file, as "row N"."""
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as e:  # pyarrow raises several types for a file that is not Parquet
        raise DataError(path.name, None, None, f"cannot read as Parquet: {e}") from None
    for i, row in enumerate(rows, start=1):
        yield Row(path.name, f"row {i}", row)


def _read_dataset(ds: Any, name: str, split: str) -> Iterator[Row]:
    """Rows of a ``datasets.Dataset`` (or the ``split`` of a ``DatasetDict``), as "row N"."""
    import datasets

    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataError(name, None, None, f"no split {split!r}; expected one of: {', '.join(ds)}")
        ds = ds[split]
    for i, row in enumerate(ds, start=1):
        yield Row(name, f"row {i}", dict(row))


def _looks_local(source: str) -> bool:
    """True when ``source`` is meant as a local path (so it is never sent to the hub)."""
    return source.startswith((".", "/", "~")) or source.lower().endswith(FILE_SUFFIXES + (".gz", ".ndjson"))


def read_rows(source: Any, split: str = "train", limit: int | None = None) -> Iterator[Row]:
    """Every record of ``source`` as a :class:`Row`, at most ``limit`` of them (see the module doc)."""
    if limit is not None and (not isinstance(limit, int) or limit < 0):
        raise ValueError(f"limit must be a non-negative int or None, got {limit!r}")
    for i, row in enumerate(_rows(source, split)):
        if limit is not None and i >= limit:
            return
        yield row


def _rows(source: Any, split: str) -> Iterator[Row]:
    """Dispatch on the kind of ``source``."""
    if isinstance(source, (list, tuple)):
        for i, row in enumerate(source, start=1):
            if not isinstance(row, Mapping):
                raise DataError("<memory>", f"row {i}", None, f"expected a dict, got {_kind(row)}")
            yield Row("<memory>", f"row {i}", dict(row))
        return
    if not isinstance(source, (str, os.PathLike)):
        import datasets

        if isinstance(source, (datasets.Dataset, datasets.DatasetDict)):
            info = getattr(source, "info", None)
            yield from _read_dataset(source, getattr(info, "dataset_name", None) or "<dataset>", split)
            return
        raise TypeError(f"cannot load data from a {type(source).__name__}; expected a path, a hub name, "
                        "a datasets.Dataset or a list of dicts")
    path = Path(source).expanduser()
    if path.is_dir():
        import datasets

        try:
            loaded = datasets.load_from_disk(str(path))
        except FileNotFoundError as e:
            raise DataError(path.name, None, None, f"not a folder written by datasets' save_to_disk ({e})") from None
        yield from _read_dataset(loaded, path.name, split)
        return
    if path.is_file():
        name = path.name.lower()
        if name.endswith((".jsonl", ".jsonl.gz", ".ndjson")):
            yield from _read_jsonl(path)
        elif name.endswith((".json", ".json.gz")):
            yield from _read_json(path)
        elif name.endswith((".csv", ".csv.gz")):
            yield from _read_csv(path)
        elif name.endswith(".parquet"):
            yield from _read_parquet(path)
        else:
            raise DataError(path.name, None, None, f"unknown file type; expected one of {', '.join(FILE_SUFFIXES)}")
        return
    if isinstance(source, os.PathLike) or _looks_local(source):
        raise DataError(str(source), None, None, "no such file or folder")
    yield from _read_hub(source, split)


def _read_hub(name: str, split: str) -> Iterator[Row]:
    """Rows of a dataset on the Hugging Face hub (needs network access)."""
    import datasets

    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as e:  # offline, unknown name, missing split: all say the same to the user
        raise DataError(name, None, None, f"not a local file or folder, and loading it as a hub dataset "
                        f"failed ({type(e).__name__}: {e})") from e
    yield from _read_dataset(ds, name, split)


# --- fields -------------------------------------------------------------------------------


def _kind(value: Any) -> str:
    """A short name of ``value``'s type for messages: int, list, null, ..."""
    return "null" if value is None else type(value).__name__


class _Fields:
    """One row read through the ``columns`` mapping; remembers which keys it used, and says where."""

    def __init__(self, row: Row, columns: Mapping[str, str]):
        self.row, self.columns, self.used = row, columns, set()

    @property
    def where(self) -> str:
        return f"{self.row.source}:{self.row.line}"

    def key(self, name: str) -> str:
        """The source's key for tether's field ``name``."""
        return self.columns.get(name, name)

    def error(self, name: str | None, message: str) -> DataError:
        """A DataError at this row for tether's field ``name`` (reported under the source's key)."""
        return DataError(self.row.source, self.row.line, self.key(name) if name else None, message)

    def has(self, name: str) -> bool:
        return self.key(name) in self.row.data

    def raw(self, name: str) -> Any:
        key = self.key(name)
        if key not in self.row.data:
            raise self.error(name, f"missing (keys present: {', '.join(sorted(self.row.data)) or 'none'})")
        self.used.add(key)
        return self.row.data[key]

    def text(self, name: str) -> str:
        """A non-empty string field."""
        value = self.raw(name)
        if not isinstance(value, str):
            raise self.error(name, f"expected a non-empty string, got {_kind(value)}")
        if not value.strip():
            raise self.error(name, "expected a non-empty string, got an empty or whitespace-only one")
        return value

    def messages(self, name: str) -> list[dict]:
        """A non-empty list of {"role", "content"} messages with known roles and string contents."""
        value = self.raw(name)
        if not isinstance(value, list) or not value:
            got = "an empty list" if value == [] else _kind(value)
            raise self.error(name, f'expected a non-empty list of {{"role", "content"}} messages, got {got}')
        for i, m in enumerate(value):
            if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
                raise self.error(name, f'message {i}: expected an object with "role" and "content", got {m!r:.80}')
            if m["role"] not in ROLES:
                raise self.error(name, f"message {i}: unknown role {m['role']!r}; expected one of {', '.join(ROLES)}")
            if not isinstance(m["content"], str):
                raise self.error(name, f"message {i}: expected string content, got {_kind(m['content'])}")
        return [{"role": m["role"], "content": m["content"]} for m in value]

    def label(self) -> bool:
        """The feedback label: a bool, or 0/1; in CSV true/false/1/0 in any case."""
        value = self.raw("label")
        if isinstance(value, bool):
            return value
        if not self.row.textual and isinstance(value, int) and value in (0, 1):
            return bool(value)
        if self.row.textual and isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0"):
            return value.strip().lower() in ("true", "1")
        expected = "true, false, 1 or 0" if self.row.textual else "true or false (or 0/1)"
        raise self.error("label", f"expected {expected}, got {value!r}")

    def extra(self) -> dict:
        """Every key of the row no field used."""
        return {k: v for k, v in self.row.data.items() if k not in self.used}

    def formats_error(self, kind: str, formats: str) -> DataError:
        """The error for a row that matches none of a record kind's formats."""
        keys = ", ".join(sorted(self.row.data)) or "none"
        hint = "" if self.columns else "; map other names with columns={...}"
        return self.error(None, f"expected the keys of a {kind} record: {formats}; got {keys}{hint}")


# --- chat rendering -----------------------------------------------------------------------


def render_messages(messages: list[dict], tokenizer: Any = None, add_generation_prompt: bool = False) -> str:
    """Render a conversation to text; returns the string.

    Takes {"role", "content"} messages and a tokenizer (or None). A tokenizer with a
    ``chat_template`` renders through ``apply_chat_template(..., tokenize=False)``. Otherwise
    tether's default, the HH-RLHF transcript style the gold world uses: system content first as
    it is, then "\\n\\nHuman: " + content per user message and "\\n\\nAssistant: " + content per
    assistant message; the generation prompt is "\\n\\nAssistant:".
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


TURN = re.compile(r"(?:^|\n\n)(Human|Assistant):")


def transcript_messages(text: str) -> list[dict] | None:
    """The turns of an HH-RLHF transcript as {"role", "content"} messages, or None when ``text`` is not one.

    "\\n\\nHuman: a\\n\\nAssistant: b\\n\\nHuman: c\\n\\nAssistant:" gives user a, assistant b, user c:
    a final empty "Assistant:" is the generation prompt, not a turn. Text before the first turn
    becomes a system message; contents are stripped of surrounding whitespace.
    """
    parts = TURN.split(text)  # [before, role, content, role, content, ...]
    if len(parts) < 3 or parts[1] != "Human":
        return None
    messages = [{"role": "system", "content": parts[0].strip()}] if parts[0].strip() else []
    for role, content in zip(parts[1::2], parts[2::2]):
        messages.append({"role": "user" if role == "Human" else "assistant", "content": content.strip()})
    if messages[-1]["role"] == "assistant" and not messages[-1]["content"]:
        messages.pop()
    return messages


class ChatFormat:
    """Renders string records of a chat model through its chat template.

    A prompt that is an HH-RLHF transcript becomes its turns (:func:`transcript_messages`), any
    other prompt one user message; a completion becomes the assistant's reply, so it ends with
    the template's end of turn. Nothing changes when the tokenizer is None, has no chat template,
    or its template is the HH transcript style itself (tether's tiny models), nor for a prompt the
    template already rendered (it ends with the template's generation prompt).
    """

    def __init__(self, tokenizer: Any = None):
        self.tokenizer = tokenizer if tokenizer is not None and getattr(tokenizer, "chat_template", None) else None
        self.generation_tail = ""
        if self.tokenizer is not None:
            probe = render_messages([{"role": "user", "content": "\x00"}], self.tokenizer, add_generation_prompt=True)
            if probe == HUMAN + " \x00" + ASSISTANT:
                self.tokenizer = None  # the template writes HH transcripts: records are already in its format
            else:
                self.generation_tail = probe.rsplit("\x00", 1)[-1].rstrip()

    def __call__(self, prompt: str, completion: str | None = None) -> tuple[str, str | None]:
        """(prompt, completion) rendered; the completion may be None (a prompt record)."""
        if self.tokenizer is None or (self.generation_tail and prompt.rstrip().endswith(self.generation_tail)):
            return prompt, completion
        messages = transcript_messages(prompt) or [{"role": "user", "content": prompt.strip()}]
        if completion is None:
            return render_messages(messages, self.tokenizer, add_generation_prompt=True), None
        return split_conversation(messages + [{"role": "assistant", "content": completion.strip()}], self.tokenizer)


def chat_tokenizer(tokenizer: Any, cfg: Any) -> Any:
    """The tokenizer a stage's loaders render records with: ``tokenizer``, or None when ``cfg.chat_template`` is off."""
    return tokenizer if getattr(cfg, "chat_template", True) else None


def split_conversation(messages: list[dict], tokenizer: Any = None) -> tuple[str, str]:
    """(prompt, completion) of a conversation whose last message is the assistant's.

    The prompt renders every message but the last with a generation prompt; the completion is
    the rest of the full rendering, or the last message's content when the template does not
    render the prompt as a prefix of the whole.
    """
    prompt = render_messages(messages[:-1], tokenizer, add_generation_prompt=True)
    full = render_messages(messages, tokenizer)
    if full.startswith(prompt):
        return prompt, full[len(prompt):]
    return prompt, messages[-1]["content"]


def _conversation(f: _Fields, name: str, tokenizer: Any, prefix: list[dict] | None = None) -> tuple[str, str]:
    """(prompt, completion) of the messages in field ``name`` (after ``prefix``), ending with the assistant."""
    messages = (prefix or []) + f.messages(name)
    if messages[-1]["role"] != "assistant":
        raise f.error(name, f"the last message must be the assistant's (the response), got {messages[-1]['role']!r}")
    if not messages[-1]["content"].strip():
        raise f.error(name, "expected a non-empty assistant reply as the last message, got an empty one")
    return split_conversation(messages, tokenizer)


def split_transcripts(chosen: str, rejected: str) -> tuple[str, str, str] | None:
    """Split two HH-RLHF transcripts into (prompt, chosen reply, rejected reply), or None.

    The prompt is their common prefix cut just after the last "\\n\\nAssistant:" inside it; the
    replies are the remainders (they usually start with a space). None when the common prefix
    holds no "\\n\\nAssistant:".
    """
    common = os.path.commonprefix([chosen, rejected])
    cut = common.rfind(ASSISTANT)
    if cut < 0:
        return None
    end = cut + len(ASSISTANT)
    return chosen[:end], chosen[end:], rejected[end:]


# --- the loaders --------------------------------------------------------------------------


def _load(source: Any, parse: Callable[[_Fields], list], split: str, limit: int | None,
          columns: Mapping[str, str] | None, skip_invalid: bool) -> list:
    """Parse every row of ``source`` into records; returns them in order.

    A file or dataset with no record at all, or one whose every record ``skip_invalid`` skipped,
    is a DataError naming it (an in-memory empty list gives []; so does ``limit=0``).
    """
    columns = dict(columns or {})
    unknown = sorted(set(columns) - set(FIELDS))
    if unknown:
        raise ValueError(f"columns maps unknown field(s) {', '.join(unknown)}; tether's fields are {', '.join(FIELDS)}")
    out, skipped, n_rows = [], [], 0
    for row in read_rows(source, split, limit):
        n_rows += 1
        try:
            out.extend(parse(_Fields(row, columns)))
        except DataError as e:
            if not skip_invalid:
                raise
            skipped.append(e)
    if skipped:
        log.warning("skipped %d invalid record(s) of %s (skip_invalid); the first: %s", len(skipped), source, skipped[0])
    if not out and limit != 0:
        name = _source_name(source)
        if skipped:
            raise DataError(name, None, None, f"all {n_rows} record(s) are invalid and were skipped (skip_invalid), "
                            f"so none is left; the first: {skipped[0]}")
        if not isinstance(source, (list, tuple)):
            raise DataError(name, None, None, "empty: no records; expected at least one record")
    return out


def _source_name(source: Any) -> str:
    """How a whole source is named in messages: its path, "<memory>", or the dataset's name."""
    if isinstance(source, (str, os.PathLike)):
        return str(source)
    if isinstance(source, (list, tuple)):
        return "<memory>"
    info = getattr(source, "info", None)
    return getattr(info, "dataset_name", None) or "<dataset>"


def load_sft(source: Any, *, tokenizer: Any = None, columns: Mapping[str, str] | None = None,
             limit: int | None = None, split: str = "train", skip_invalid: bool = False) -> list[SFTRecord]:
    """SFT records from {"prompt","completion"}, {"messages": [...]} or {"text"} rows.

    Takes a source (see the module doc), a tokenizer whose chat template renders messages and
    string prompt/completion rows (:class:`ChatFormat`; None: tether's default, the strings as
    given), a ``columns`` mapping, ``limit`` (at most that many rows) and a ``split``. Returns one
    SFTRecord per row; a {"text"} row has prompt "" and is never templated.
    """
    chat = ChatFormat(tokenizer)

    def parse(f: _Fields) -> list[SFTRecord]:
        if f.has("messages"):
            prompt, completion = _conversation(f, "messages", tokenizer)
        elif f.has("prompt") or f.has("completion"):
            prompt, completion = chat(f.text("prompt"), f.text("completion"))
        elif f.has("text"):
            prompt, completion = "", f.text("text")
        else:
            raise f.formats_error("SFT", "prompt + completion, messages, or text")
        return [SFTRecord(prompt, completion, f.where, f.extra())]

    return _load(source, parse, split, limit, columns, skip_invalid)


def _preference(f: _Fields, tokenizer: Any, chat: ChatFormat) -> tuple[str, str, str]:
    """(prompt, chosen, rejected) of a row in any preference format; string rows go through ``chat``."""
    if not (f.has("chosen") and f.has("rejected")):
        missing = "chosen" if not f.has("chosen") else "rejected"
        raise f.error(missing, "missing; a preference record needs chosen + rejected (strings or message lists) "
                      f"and optionally prompt; keys present: {', '.join(sorted(f.row.data)) or 'none'}")
    chosen_list, rejected_list = isinstance(f.raw("chosen"), list), isinstance(f.raw("rejected"), list)
    if chosen_list != rejected_list:  # report the side that differs (from the prompt, else from chosen)
        odd = "rejected"
        if f.has("prompt") and chosen_list != isinstance(f.raw("prompt"), list):
            odd = "chosen"
        other = "rejected" if odd == "chosen" else "chosen"
        want = "a list of messages" if isinstance(f.raw(other), list) else "a string"
        raise f.error(odd, f"expected {want} like {f.key(other)!r} (both responses are strings or both are message "
                      f"lists), got {_kind(f.raw(odd))}")
    if chosen_list:  # conversational
        if f.has("prompt") and not isinstance(f.raw("prompt"), list):
            raise f.error("prompt", f"expected a list of messages like {f.key('chosen')!r} and {f.key('rejected')!r} "
                          f"(the conversation before them), got {_kind(f.raw('prompt'))}")
        prefix = f.messages("prompt") if f.has("prompt") else []
        prompt, chosen = _conversation(f, "chosen", tokenizer, prefix)
        prompt_rejected, rejected = _conversation(f, "rejected", tokenizer, prefix)
        if prompt_rejected != prompt:
            raise f.error("rejected", "expected the chosen and rejected conversations to differ only in the last "
                          "(assistant) message")
    elif f.has("prompt"):
        prompt, chosen, rejected = f.text("prompt"), f.text("chosen"), f.text("rejected")
        (_, chosen), (prompt, rejected) = chat(prompt, chosen), chat(prompt, rejected)
    else:  # implicit prompt: HH-RLHF transcripts
        parts = split_transcripts(f.text("chosen"), f.text("rejected"))
        if parts is None:
            raise f.error("chosen", 'no "prompt" key, and the common prefix of chosen and rejected contains no '
                          '"\\n\\nAssistant:" to cut the prompt at; expected HH-RLHF-style transcripts '
                          '("\\n\\nHuman: ...\\n\\nAssistant: ...") or a "prompt" key')
        prompt, chosen, rejected = parts  # a reply may be empty here: HH-RLHF prefers silence in a few pairs
        (_, chosen), (prompt, rejected) = chat(prompt, chosen), chat(prompt, rejected)
    if chosen == rejected:
        raise f.error("rejected", "identical to chosen; expected a pair of different responses")
    return prompt, chosen, rejected


def load_preferences(source: Any, *, tokenizer: Any = None, columns: Mapping[str, str] | None = None,
                     limit: int | None = None, split: str = "train",
                     skip_invalid: bool = False) -> list[PreferenceRecord]:
    """Preference pairs: explicit prompt, implicit prompt (HH-RLHF transcripts) or conversations.

    Takes the same arguments as :func:`load_sft`; returns one PreferenceRecord per row.
    """
    chat = ChatFormat(tokenizer)

    def parse(f: _Fields) -> list[PreferenceRecord]:
        prompt, chosen, rejected = _preference(f, tokenizer, chat)
        return [PreferenceRecord(prompt, chosen, rejected, f.where, f.extra())]

    return _load(source, parse, split, limit, columns, skip_invalid)


def load_feedback(source: Any, *, tokenizer: Any = None, columns: Mapping[str, str] | None = None,
                  limit: int | None = None, split: str = "train", from_pairs: bool = False,
                  skip_invalid: bool = False) -> list[FeedbackRecord]:
    """Unpaired feedback (KTO): {"prompt","completion","label"} or {"messages", "label"} rows.

    A preference row (one without "label", or every row with ``from_pairs=True``) gives two
    records: the chosen response labelled True and the rejected one labelled False. ``limit``
    counts rows, not records. Other arguments as :func:`load_sft`; returns the records in order.
    """
    chat = ChatFormat(tokenizer)

    def parse(f: _Fields) -> list[FeedbackRecord]:
        if from_pairs or (not f.has("label") and (f.has("chosen") or f.has("rejected"))):
            prompt, chosen, rejected = _preference(f, tokenizer, chat)
            extra = f.extra()
            return [FeedbackRecord(prompt, chosen, True, f.where, extra),
                    FeedbackRecord(prompt, rejected, False, f.where, dict(extra))]
        if f.has("messages"):
            prompt, completion = _conversation(f, "messages", tokenizer)
        elif f.has("prompt") or f.has("completion") or f.has("label"):
            prompt, completion = chat(f.text("prompt"), f.text("completion"))
        else:
            raise f.formats_error("feedback", "prompt + completion + label, messages + label, "
                                  "or a preference pair (chosen + rejected)")
        return [FeedbackRecord(prompt, completion, f.label(), f.where, f.extra())]

    return _load(source, parse, split, limit, columns, skip_invalid)


def load_prompts(source: Any, *, tokenizer: Any = None, columns: Mapping[str, str] | None = None,
                 limit: int | None = None, split: str = "train", skip_invalid: bool = False) -> list[PromptRecord]:
    """Prompts from {"prompt", ...extras} or {"messages": [...]} rows.

    Messages (or a "prompt" that is a message list) are rendered with a generation prompt and
    must not end with the assistant's message. Other arguments as :func:`load_sft`; returns one
    PromptRecord per row, extra keys (e.g. GSM8K's "answer") in ``.extra``.
    """
    chat = ChatFormat(tokenizer)

    def parse(f: _Fields) -> list[PromptRecord]:
        name = "prompt" if f.has("prompt") else "messages" if f.has("messages") else None
        if name is None:
            raise f.formats_error("prompt", "prompt (a string or a message list) or messages")
        if name == "messages" or isinstance(f.raw("prompt"), list):
            messages = f.messages(name)
            if messages[-1]["role"] == "assistant":
                raise f.error(name, "the last message is the assistant's; expected a conversation ending with the "
                              "user (the model writes the next assistant reply)")
            prompt = render_messages(messages, tokenizer, add_generation_prompt=True)
        else:
            prompt, _ = chat(f.text("prompt"))
        return [PromptRecord(prompt, f.where, f.extra())]

    return _load(source, parse, split, limit, columns, skip_invalid)


def fingerprint(records: list) -> str:
    """A content hash of records: 16 hex digits of a sha256, stable across runs and processes.

    Takes a list of records; hashes each one's kind and fields (extras included, ``where`` not, so
    the same data read from JSONL or CSV hashes the same) as canonical JSON.
    """
    h = hashlib.sha256()
    for rec in records:
        fields = {k: v for k, v in asdict(rec).items() if k != "where"}
        h.update(type(rec).__name__.encode())
        h.update(json.dumps(fields, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str).encode())
        h.update(b"\n")
    return h.hexdigest()[:16]
