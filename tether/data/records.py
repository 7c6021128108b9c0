"""The four kinds of record tether consumes, and the error a bad one raises."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tether.errors import TetherError


class DataError(TetherError, ValueError):
    """A bad input record or source.

    Takes the source's name (a file name, "<memory>" or a dataset name), the line (an int: the
    1-based line of a JSONL or CSV file) or row ("row N" for JSON lists, Parquet and datasets) or
    None when the whole source is at fault, the field (None when no single field is), and what
    was expected. The message reads ``sft.jsonl:12: field 'completion': expected ...``; the
    parts stay available as ``.source``, ``.line``, ``.field`` and ``.expected``.
    """

    def __init__(self, source: str, line: int | str | None, field: str | None, message: str):
        self.source, self.line, self.field, self.expected = source, line, field, message
        where = f"{source}:{line}" if line is not None else source
        super().__init__(f"{where}: " + (f"field {field!r}: " if field else "") + message)

    def __reduce__(self):  # picklable (e.g. across DataLoader workers) despite the 4-argument __init__
        return (type(self), (self.source, self.line, self.field, self.expected))


@dataclass(frozen=True)
class _Record:
    """Shared behaviour: keys of the input a format does not use live in ``extra``."""

    def __getattr__(self, name: str) -> Any:  # extra fields read like attributes: rec.answer
        extra = object.__getattribute__(self, "extra")
        if name in extra:
            return extra[name]
        raise AttributeError(f"{type(self).__name__} has no field {name!r}")


@dataclass(frozen=True)
class SFTRecord(_Record):
    """A demonstration: the model learns ``completion`` given ``prompt`` ("" for plain text)."""

    prompt: str
    completion: str
    where: str = ""
    extra: dict = field(default_factory=dict, hash=False)


@dataclass(frozen=True)
class PreferenceRecord(_Record):
    """A comparison: ``chosen`` is preferred to ``rejected`` as a response to ``prompt``."""

    prompt: str
    chosen: str
    rejected: str
    where: str = ""
    extra: dict = field(default_factory=dict, hash=False)


@dataclass(frozen=True)
class FeedbackRecord(_Record):
    """Unpaired feedback (KTO): ``completion`` is desirable (``label`` True) or undesirable."""

    prompt: str
    completion: str
    label: bool
    where: str = ""
    extra: dict = field(default_factory=dict, hash=False)


@dataclass(frozen=True)
class PromptRecord(_Record):
    """A prompt to sample from (RL stages, evaluation), with extra fields such as a reference answer."""

    prompt: str
    where: str = ""
    extra: dict = field(default_factory=dict, hash=False)
