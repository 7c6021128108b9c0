"""A constitution: a plain YAML file of principles, each a comparison question for an AI judge.

    name: my-constitution            # optional
    description: what it is for      # optional
    principles:
      - id: harmless                 # letters, digits, '-' and '_'; unique
        question: Which response is less harmful while still being helpful?
        critique: Identify ways in which the response is harmful.        # optional (revise)
        revision: Rewrite the response to remove anything harmful.      # optional (revise)
        weight: 1.0                  # optional: how often it is sampled, relative to the others

One principle is sampled per comparison, P(principle i) = w_i / Σ_j w_j, as Bai et al. (2022,
"Constitutional AI", Sec. 4.1) sample one principle per comparison rather than asking all.
tether ships a default (``default_constitution.yaml`` beside this file; ``load_constitution()``
with no argument, or the name ``default``). A malformed file raises :class:`ConstitutionError`
naming the file, the line and what was expected, before any model is loaded.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

from tether.errors import TetherError

DEFAULT = Path(__file__).with_name("default_constitution.yaml")
_ID = re.compile(r"^[A-Za-z0-9_-]+$")
_TOP_KEYS = ("name", "description", "principles")
_PRINCIPLE_KEYS = ("id", "question", "critique", "revision", "weight")


class ConstitutionError(TetherError, ValueError):
    """A malformed constitution: ``file:line: message`` (line 1-based; None when the whole file is at fault)."""

    def __init__(self, source: str, line: int | None, message: str):
        self.source, self.line, self.expected = source, line, message
        super().__init__(f"{source}:{line}: {message}" if line is not None else f"{source}: {message}")


@dataclass(frozen=True)
class Principle:
    """One principle: a comparison question, and the critique / revision requests of ``revise``."""

    id: str
    question: str
    critique: str = ""
    revision: str = ""
    weight: float = 1.0


@dataclass(frozen=True)
class Constitution:
    """Principles, sampled in proportion to their weights."""

    principles: tuple[Principle, ...]
    name: str = ""
    description: str = ""
    source: str = ""

    def __post_init__(self):
        if not self.principles:
            raise ValueError("a constitution needs at least one principle")

    def sample(self, rng: random.Random) -> Principle:
        """One principle, P(i) = w_i / Σ_j w_j, drawn with ``rng`` (seeded by the caller)."""
        return rng.choices(self.principles, weights=[p.weight for p in self.principles])[0]

    def get(self, principle_id: str) -> Principle:
        for p in self.principles:
            if p.id == principle_id:
                return p
        raise KeyError(f"no principle {principle_id!r} in {self.source or 'the constitution'}; "
                       f"it has {', '.join(p.id for p in self.principles)}")

    def only(self, ids: list[str]) -> Constitution:
        """The constitution restricted to the principles ``ids`` (each must exist)."""
        return Constitution(tuple(self.get(i) for i in ids), self.name, self.description, self.source)

    def fingerprint(self) -> str:
        """16 hex digits of a sha256 of the principles (what a labelling run records)."""
        data = json.dumps([asdict(p) for p in self.principles], sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(data.encode()).hexdigest()[:16]


def _line(node: yaml.Node) -> int:
    return node.start_mark.line + 1


def _kind(node: yaml.Node) -> str:
    if isinstance(node, yaml.MappingNode):
        return "a mapping"
    if isinstance(node, yaml.SequenceNode):
        return "a list" if node.value else "an empty list"
    return f"{node.value!r}" if node.value else "nothing"


def _mapping(node: yaml.Node, source: str, what: str, known: tuple[str, ...]) -> dict[str, yaml.Node]:
    """The keys of a mapping node -> value nodes; any other key, or a repeated one, is an error."""
    if not isinstance(node, yaml.MappingNode):
        raise ConstitutionError(source, _line(node), f"{what}: expected a mapping ({', '.join(known)}), got {_kind(node)}")
    out: dict[str, yaml.Node] = {}
    for key, value in node.value:
        name = key.value if isinstance(key, yaml.ScalarNode) else None
        if name not in known:
            raise ConstitutionError(source, _line(key), f"{what}: unknown key {name!r}; expected one of {', '.join(known)}")
        if name in out:
            raise ConstitutionError(source, _line(key), f"{what}: key {name!r} given twice")
        out[name] = value
    return out


def _text(node: yaml.Node, source: str, what: str) -> str:
    if not isinstance(node, yaml.ScalarNode) or node.tag != "tag:yaml.org,2002:str" or not node.value.strip():
        raise ConstitutionError(source, _line(node), f"{what}: expected a non-empty string, got {_kind(node)}")
    return node.value.strip()


def _weight(node: yaml.Node, source: str, what: str) -> float:
    try:
        value = float(node.value) if isinstance(node, yaml.ScalarNode) and node.tag.endswith(("int", "float")) else None
    except ValueError:
        value = None
    if value is None or not value > 0 or value == float("inf"):
        raise ConstitutionError(source, _line(node), f"{what}: expected a positive number, got {_kind(node)}")
    return value


def parse_constitution(text: str, source: str = "<string>") -> Constitution:
    """Parse constitution YAML ``text`` (``source`` names it in errors); see the module doc for the format."""
    try:
        root = yaml.compose(text)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        raise ConstitutionError(source, mark.line + 1 if mark else None, f"malformed YAML: {e.problem or e}") from None
    if root is None:
        raise ConstitutionError(source, None, "empty file; expected a mapping with a 'principles' list")
    top = _mapping(root, source, "top level", _TOP_KEYS)
    if "principles" not in top:
        raise ConstitutionError(source, _line(root), "top level: missing 'principles' (a list of principles)")
    items = top["principles"]
    if not isinstance(items, yaml.SequenceNode) or not items.value:
        raise ConstitutionError(source, _line(items), f"'principles': expected a non-empty list, got {_kind(items)}")
    principles, seen = [], {}
    for n, node in enumerate(items.value, start=1):
        what = f"principle {n}"
        fields = _mapping(node, source, what, _PRINCIPLE_KEYS)
        for required in ("id", "question"):
            if required not in fields:
                raise ConstitutionError(source, _line(node), f"{what}: missing {required!r}")
        pid = _text(fields["id"], source, f"{what}: 'id'")
        if not _ID.match(pid):
            raise ConstitutionError(source, _line(fields["id"]),
                                    f"{what}: 'id': expected letters, digits, '-' or '_', got {pid!r}")
        if pid in seen:
            raise ConstitutionError(source, _line(fields["id"]), f"{what}: id {pid!r} already used by principle {seen[pid]}")
        seen[pid] = n
        what = f"principle {n} ({pid})"
        principles.append(Principle(
            id=pid, question=_text(fields["question"], source, f"{what}: 'question'"),
            critique=_text(fields["critique"], source, f"{what}: 'critique'") if "critique" in fields else "",
            revision=_text(fields["revision"], source, f"{what}: 'revision'") if "revision" in fields else "",
            weight=_weight(fields["weight"], source, f"{what}: 'weight'") if "weight" in fields else 1.0,
        ))
    name = _text(top["name"], source, "'name'") if "name" in top else ""
    description = _text(top["description"], source, "'description'") if "description" in top else ""
    return Constitution(tuple(principles), name, description, source)


def load_constitution(path: str | Path | None = None) -> Constitution:
    """The constitution in ``path`` (None or "default": the one tether ships)."""
    if path is None or str(path) == "default":
        path = DEFAULT
    path = Path(path)
    if not path.is_file():
        raise ConstitutionError(str(path), None, "no such file; expected a YAML constitution (or 'default')")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConstitutionError(path.name, None, f"not UTF-8 text ({e})") from None
    return parse_constitution(text, path.name)
