"""Small file helpers shared by every stage: atomic writes, so that no reader ever sees half a file."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any


def check_folder(out: Path, option: str = "--out") -> None:
    """Refuse (:class:`OutputError`) an output folder that is a file or lies under one, before anything is written."""
    from tether.errors import OutputError

    for above in (out, *out.parents):
        if above.exists() or above.is_symlink():
            if not above.is_dir():
                where = "is a file" if above == out else f"lies under {above}, which is a file"
                raise OutputError(f"{option} {out} {where}; it must be a folder: choose another {option}")
            return


def _replace(tmp: Path, final: Path) -> None:
    os.replace(tmp, final)


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file and a rename (atomic on POSIX)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    _replace(tmp, path)
    return path


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write one JSON document atomically, indented for people to read."""
    return write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n")


def write_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> Path:
    """Write one JSON object a line, atomically."""
    return write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Read a JSONL file written by tether (user data goes through ``tether.data`` instead)."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def replace_dir(tmp: Path, final: Path) -> None:
    """Move a fully written folder ``tmp`` into place at ``final``, replacing any old one."""
    if final.exists():
        old = final.with_name(final.name + ".old")
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)


def swap_dirs(a: Path, b: Path) -> None:
    """Exchange the folders ``a`` and ``b`` (both existing): ``b`` then holds what ``a`` held and vice versa.

    One atomic ``renameat2(RENAME_EXCHANGE)`` where the system offers it (Linux), so that no reader
    and no kill ever sees ``b`` missing; elsewhere three renames through ``b.tether-old``.
    """
    if _exchange(a, b):
        return
    parked = b.with_name(b.name + ".tether-old")
    os.replace(b, parked)
    os.replace(a, b)
    os.replace(parked, a)


def _exchange(a: Path, b: Path) -> bool:
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_cwd, rename_exchange = -100, 2
    return renameat2(at_cwd, os.fsencode(a), at_cwd, os.fsencode(b), rename_exchange) == 0
