"""Configs are dataclasses. They round-trip to YAML and become command-line options.

Every stage has one config dataclass; fields carry their help text in ``metadata["help"]`` and
groups of fields nest (``train: TrainConfig``). In YAML the groups nest; on the command line
each leaf is one flat option (``--lr``), so leaf names are unique within a stage. Precedence:
defaults < ``--config file.yaml`` < options given on the command line.
"""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any

import click
import yaml


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
    """Build ``cls`` from its defaults overridden by nested dicts; unknown keys and wrong types are errors."""
    obj = cls()
    _apply(obj, data, where)
    return obj


def _apply(obj: Any, data: dict, where: str) -> None:
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"{where}: unknown option(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}")
    for name, value in data.items():
        if dataclasses.is_dataclass(hints[name]):
            _apply(getattr(obj, name), value, f"{where}.{name}")
        else:
            setattr(obj, name, _coerce(value, hints[name], f"{where}.{name}"))


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
    raise ValueError(f"{where}: expected {base.__name__}, got {value!r}")


def save_yaml(cfg: Any, path: str | Path) -> None:
    from tether.io import write_text

    write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))


def load_yaml(cls: type, path: str | Path) -> Any:
    with open(path, encoding="utf-8") as f:
        data = yaml.safe_load(f) or {}
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
            data = yaml.safe_load(Path(config).read_text(encoding="utf-8")) or {} if config else {}
            cfg = from_dict(cls, data, where=config or "config")
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
