"""Configs are dataclasses. They round-trip to YAML and become command-line options.

Every stage has one config dataclass; fields carry their help text in ``metadata["help"]`` and
groups of fields nest (``train: TrainConfig``). In YAML the groups nest; on the command line
each leaf is one flat option (``--lr``), so leaf names are unique within a stage. Precedence:
defaults < ``--config file.yaml`` < options given on the command line.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import typing
from pathlib import Path
from typing import Any

import click
import yaml

from tether.errors import ConfigError


def opt(default: Any, help: str, **kwargs) -> Any:
    """A dataclass field with a default and its help text."""
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata={"help": help}, **kwargs)
    return dataclasses.field(default=default, metadata={"help": help}, **kwargs)


def group(cls: type, help: str = "") -> Any:
    """A nested group of options, e.g. ``train: TrainConfig = group(TrainConfig)``."""
    return dataclasses.field(default_factory=cls, metadata={"help": help})


def to_dict(cfg: Any) -> dict:
    """The config as plain nested dicts (what YAML and tether.json hold)."""
    return dataclasses.asdict(cfg)


def from_dict(cls: type, data: dict, where: str = "config") -> Any:
    """Build ``cls`` from its defaults overridden by nested dicts; unknown keys and wrong types are errors.

    ``where`` names the source (a file's path) in the :class:`ConfigError` a bad key raises, which
    reads ``where: key: what was expected`` with the key dotted through groups (``train.steps``).
    """
    obj = cls()
    _apply(obj, data, where, ())
    return obj


def _type_name(value: Any) -> str:
    return "null" if value is None else {"dict": "a mapping", "list": "a list"}.get(type(value).__name__,
                                                                                   type(value).__name__)


def _apply(obj: Any, data: dict, where: str, keys: tuple[str, ...]) -> None:
    at = f"{where}: {'.'.join(keys)}: " if keys else f"{where}: "
    if not isinstance(data, dict):
        expected = "a mapping of option: value" if keys else "a mapping of option: value at the top level"
        raise ConfigError(f"{at}expected {expected}, got {_type_name(data)}")
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    unknown = sorted(str(k) for k in data if k not in names)
    if unknown:
        groups = {path[-1]: ".".join(path[:-1]) for path, _, _ in _leaves(type(obj)) if len(path) > 1}
        hint = "".join(f"; {k} belongs under {groups[k]}:" for k in unknown if k in groups)
        raise ConfigError(f"{at}unknown option(s) {', '.join(unknown)}{hint}; known: {', '.join(sorted(names))}")
    for name, value in data.items():
        if dataclasses.is_dataclass(hints[name]):
            _apply(getattr(obj, name), value, where, keys + (name,))
        else:
            setattr(obj, name, _coerce(value, hints[name], f"{where}: {'.'.join(keys + (name,))}"))


def _unwrap_optional(kind: Any) -> tuple[Any, bool]:
    """(T, True) for ``T | None``; (kind, False) otherwise."""
    args = typing.get_args(kind)
    if args and type(None) in args:
        return next(a for a in args if a is not type(None)), True
    return kind, False


def _coerce(value: Any, kind: Any, where: str) -> Any:
    base, optional = _unwrap_optional(kind)
    if value is None and optional:
        return None
    if base is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if base in (int, str, bool) and type(value) is base:
        return value
    if base is float and isinstance(value, str):
        try:
            return float(value)  # YAML reads 3e-4 as a string
        except ValueError:
            pass
    if base not in (int, float, str, bool):
        return value
    raise ConfigError(f"{where}: expected {base.__name__}, got {value!r:.80}")


def save_yaml(cfg: Any, path: str | Path) -> None:
    from tether.io import write_text

    write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))


def load_yaml(cls: type, path: str | Path) -> Any:
    """``cls`` from a YAML file of options (nested as in a saved config.yaml).

    Invalid YAML (with its line), an empty file, a top level that is not a mapping, an unknown key
    or a value of the wrong type raises a one-line :class:`ConfigError` naming the file.
    """
    try:
        text = Path(path).read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: invalid UTF-8 (byte {e.object[e.start]:#x}); expected a YAML text file") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        problem = " ".join(str(getattr(e, "problem", None) or e).split())
        raise ConfigError(f"{path}{line}: invalid YAML ({problem}); expected option: value lines") from None
    if data is None:
        raise ConfigError(f"{path}: empty; expected option: value lines (e.g. lr: 1.0e-4), nested as in a saved "
                          "config.yaml")
    return from_dict(cls, data, where=str(path))


def _leaves(cls: type, prefix: tuple[str, ...] = ()):
    """(path, field, type) for every leaf option of a config class, groups flattened."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        if dataclasses.is_dataclass(kind):
            yield from _leaves(kind, prefix + (f.name,))
        else:
            yield prefix + (f.name,), f, kind


def _default(cls: type, path: tuple[str, ...]) -> Any:
    obj = cls()
    for name in path:
        obj = getattr(obj, name)
    return obj


def options(cls: type):
    """Decorate a click command with one option per leaf of ``cls`` plus ``--config``.

    The command receives ``cfg`` (an instance of ``cls``) instead of the separate options, and
    any other options of its own as keyword arguments.
    """
    leaves = list(_leaves(cls))
    names = [path[-1] for path, _, _ in leaves]
    dupes = {n for n in names if names.count(n) > 1}
    if dupes:
        raise TypeError(f"{cls.__name__}: option names must be unique, repeated: {sorted(dupes)}")

    def decorate(fn):
        def wrapper(config: str | None, **given):
            ctx = click.get_current_context()
            cfg = load_yaml(cls, config) if config else cls()
            for path, _, _ in leaves:
                key = path[-1]
                if ctx.get_parameter_source(key) == click.core.ParameterSource.COMMANDLINE:
                    obj = cfg
                    for name in path[:-1]:
                        obj = getattr(obj, name)
                    setattr(obj, key, given[key])
            if hasattr(cfg, "validate"):
                try:
                    cfg.validate()
                except ValueError as e:
                    raise click.UsageError(str(e)) from e
            return fn(cfg, **{k: v for k, v in given.items() if k not in names})

        wrapper.__name__ = fn.__name__
        wrapper.__doc__ = fn.__doc__
        cmd = wrapper
        for path, f, kind in reversed(leaves):
            base, _ = _unwrap_optional(kind)
            default = _default(cls, path)
            flag = "--" + path[-1].replace("_", "-")
            help_text = f.metadata.get("help", "")
            if base is bool:
                cmd = click.option(f"{flag}/--no-{flag[2:]}", path[-1], default=default, show_default=True, help=help_text)(cmd)
            else:
                cmd = click.option(flag, path[-1], type=base, default=default, show_default=True, help=help_text)(cmd)
        cmd = click.option(
            "--config", type=click.Path(exists=True, dir_okay=False), default=None,
            help="YAML file with any of these options (nested as in the saved config.yaml)",
        )(cmd)
        return cmd

    return decorate


# --- range checks shared by every config's validate() -------------------------------------

SEED_MAX = 2**32 - 1  # seeds are mixed into 64-bit generator seeds (seed × 1,000,003 + step); larger ones overflow


def flag(name: str) -> str:
    """The command-line spelling of a field: ``max_grad_norm`` -> ``--max-grad-norm``."""
    return "--" + name.replace("_", "-")


def _bound(x: float) -> str:
    return str(x) if isinstance(x, int) else f"{x:g}"


def check(name: str, value: Any, *, ge: float | None = None, gt: float | None = None, le: float | None = None,
          lt: float | None = None, integer: bool = False, note: str = "") -> None:
    """Raise :class:`~tether.errors.ConfigError` unless ``value`` is a finite number within the bounds.

    ``ge``/``gt`` bound it below (inclusive/exclusive), ``le``/``lt`` above. NaN and ±inf always
    fail (NaN fails every comparison, so a plain ``value <= 0`` test would let it through). The
    message names the option as typed on the command line and the range it must lie in, e.g.
    ``--min-lr-ratio must be a number in [0, 1], got 7.0``; ``note`` is appended (what 0 means, say).
    """
    numeric = isinstance(value, numbers.Integral if integer else numbers.Real)
    ok = numeric and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and all((ge is None or value >= ge, gt is None or value > gt, le is None or value <= le,
                     lt is None or value < lt))
    if ok:
        return
    low = f"[{_bound(ge)}" if ge is not None else f"({_bound(gt)}" if gt is not None else None
    high = f"{_bound(le)}]" if le is not None else f"{_bound(lt)})" if lt is not None else None
    if low and high:
        where = f" in {low}, {high}"
    elif low:
        where = f" {'>=' if ge is not None else '>'} {low[1:]}"
    elif high:
        where = f" {'<=' if le is not None else '<'} {high[:-1]}"
    else:
        where = ""
    kind = "an integer" if integer else "a number" if where else "a finite number"
    got = str(value) if numeric else repr(value)
    raise ConfigError(f"{flag(name)} must be {kind}{where}{note and f' ({note})'}, got {got}")


def check_fields(cfg: Any, names: str, **bounds: Any) -> None:
    """:func:`check` on each of the space-separated fields ``names`` of ``cfg`` with the same bounds."""
    for name in names.split():
        check(name, getattr(cfg, name), **bounds)
