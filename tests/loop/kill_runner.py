"""Run the real `tether` command line and SIGKILL it at a chosen moment of its writes.

    python tests/loop/kill_runner.py WHEN N -- TETHER ARGS...     one run, killed at WHEN (N-th occurrence)
    python tests/loop/kill_runner.py --serve                      a fork server for tests/loop/test_kill_resume.py

WHEN is one of MOMENTS:

    none               no kill: the run ends as it would
    after-checkpoint   the N-th checkpoint is complete (save_checkpoint returned), then SIGKILL
    checkpoint-model   inside the N-th checkpoint: its model.safetensors is half written, then SIGKILL
    checkpoint-state   inside the N-th checkpoint: every tensor file is written and state.json half, then SIGKILL
    final-model        inside the N-th final model write: model.safetensors half written, then SIGKILL
    final-meta         the N-th final model is written, tether.json half written, then SIGKILL
    reference-cache    DPO / KTO: the N-th reference log-prob cache file (under ref_logps/) half written, then SIGKILL
    metrics-line       the N-th line of metrics.jsonl half written, then SIGKILL (a kill -9 can cut a write
                       that straddles a page boundary, and a full disk or a power cut does the same)

Nothing in tether has a hook for this: the write functions are replaced by module attribute
(every module that imported them by name, ``from x import f``, included) before the command runs.
"Half written" means the real writer wrote the whole file, which is then cut to half its bytes:
what a kill between two ``write`` calls leaves. A file under a ``checkpoints`` folder belongs to a
checkpoint, any other ``model.safetensors`` to a final model (an ensemble writes one per member).

The fork server imports torch, transformers and tether once (about ten seconds on the CI machine)
and then forks a child per job; it never runs a tensor operation itself, so each child starts
as clean as a fresh process. It reads one JSON job a line on stdin, {"when", "n", "args", "log",
"env"} (env: variables to set in the child, such as KILL_RUNNER_NOTE, a file where the child says
what it cut before it kills itself), and answers one JSON line on stdout, {"signal": S} or {"exit": CODE}.
"""

from __future__ import annotations

import importlib
import json
import os
import pkgutil
import signal
import sys
import traceback
from pathlib import Path

MOMENTS = ("none", "after-checkpoint", "checkpoint-model", "checkpoint-state", "final-model", "final-meta",
           "reference-cache", "metrics-line")


NOTE = os.environ.get("KILL_RUNNER_NOTE", "")  # where to say what was cut just before the kill


def _die(**what) -> None:
    """SIGKILL this process, after writing ``what`` (the moment and the file left cut) to NOTE."""
    if NOTE:
        with open(NOTE, "w", encoding="utf-8") as f:
            f.write(json.dumps({key: str(value) for key, value in what.items()}) + "\n")
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def _halve(path: str | os.PathLike) -> None:
    os.truncate(path, os.path.getsize(path) // 2)


def _in_checkpoint(path: str | os.PathLike) -> Path | None:
    """The checkpoint folder ``path`` is written into, if it is one (``.../checkpoints/<folder>/file``)."""
    p = Path(path)
    return p.parent if p.parent.parent.name == "checkpoints" else None


def _import_everything() -> None:
    """Import every module that may hold a reference to a write function, so the sweep finds it."""
    import safetensors.torch  # noqa: F401
    import transformers.modeling_utils  # noqa: F401

    import tether
    import tether.cli  # noqa: F401

    for info in pkgutil.walk_packages(tether.__path__, "tether.", onerror=lambda name: None):
        if info.name.endswith(".__main__"):  # importing it would run the command line
            continue
        try:
            importlib.import_module(info.name)
        except Exception:  # an optional backend (vLLM, ...) that is not installed
            pass


def _replace_everywhere(original, replacement) -> int:
    """Point every module attribute that is ``original`` at ``replacement``; returns how many."""
    count = 0
    for module in list(sys.modules.values()):
        namespace = getattr(module, "__dict__", None)
        if not isinstance(namespace, dict):
            continue
        for name, value in list(namespace.items()):
            if value is original:
                namespace[name] = replacement
                count += 1
    return count


def install(when: str, n: int) -> None:
    """Patch the write functions so that this process SIGKILLs itself at ``when`` (``n``-th occurrence)."""
    if when not in MOMENTS:
        raise SystemExit(f"kill_runner: WHEN must be one of {MOMENTS}, got {when!r}")
    if when == "none":
        return
    _import_everything()
    import safetensors.torch

    import tether.io
    import tether.loop

    seen = {"checkpoints": [], "final_models": 0, "metas": 0, "caches": 0, "lines": 0}

    if when == "metrics-line":
        real_log = tether.loop.MetricsLog.log

        def log(self, step, metrics):
            seen["lines"] += 1
            if seen["lines"] == n and getattr(self, "file", None) is not None:
                line = json.dumps({"step": step, **metrics}) + "\n"
                self.file.write(line[: len(line) // 2])
                self.file.flush()
                _die(when=when, file=self.path)
            return real_log(self, step, metrics)

        tether.loop.MetricsLog.log = log
        return

    if when == "after-checkpoint":
        real_save_checkpoint = tether.loop.save_checkpoint

        def save_checkpoint(*args, **kwargs):
            out = real_save_checkpoint(*args, **kwargs)
            seen["checkpoints"].append(out)
            if len(seen["checkpoints"]) == n:
                _die(when=when, checkpoint=out)
            return out

        assert _replace_everywhere(real_save_checkpoint, save_checkpoint)
        return

    if when in ("checkpoint-model", "checkpoint-state", "final-model", "reference-cache"):
        real_save_file = safetensors.torch.save_file

        def save_file(tensors, filename, *args, **kwargs):
            out = real_save_file(tensors, filename, *args, **kwargs)
            name = Path(filename).name
            ckpt = _in_checkpoint(filename)
            if ckpt is not None:
                if ckpt not in seen["checkpoints"]:
                    seen["checkpoints"].append(ckpt)
                if len(seen["checkpoints"]) == n and when == "checkpoint-model" and name == "model.safetensors":
                    _halve(filename)
                    _die(when=when, file=filename)
            elif Path(filename).parent.name == "ref_logps":
                seen["caches"] += 1
                if when == "reference-cache" and seen["caches"] == n:
                    _halve(filename)
                    _die(when=when, file=filename)
            elif name == "model.safetensors" and when == "final-model":
                seen["final_models"] += 1
                if seen["final_models"] == n:
                    _halve(filename)
                    _die(when=when, file=filename)
            return out

        assert _replace_everywhere(real_save_file, save_file)

    if when in ("checkpoint-state", "final-meta"):
        real_write_json = tether.io.write_json

        def write_json(path, obj):
            name, ckpt = Path(path).name, _in_checkpoint(path)
            hit = False
            if when == "checkpoint-state" and name == "state.json" and ckpt is not None:
                if ckpt not in seen["checkpoints"]:
                    seen["checkpoints"].append(ckpt)
                hit = len(seen["checkpoints"]) == n
            elif when == "final-meta" and name == "tether.json":
                seen["metas"] += 1
                hit = seen["metas"] == n
            if hit:  # what a non-atomic writer would leave: the first half of the document
                text = json.dumps(obj, indent=2, ensure_ascii=False, default=str)
                Path(path).write_text(text[: len(text) // 2], encoding="utf-8")
                _die(when=when, file=path)
            return real_write_json(path, obj)

        assert _replace_everywhere(real_write_json, write_json)


def run_cli(args: list[str]) -> int:
    """``tether ARGS`` in this process; returns its exit status."""
    from tether.cli import main

    try:
        main.main(args=args, prog_name="tether", standalone_mode=True)
    except SystemExit as stop:
        code = stop.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    return 0


def _child(job: dict) -> None:
    """In a forked child: redirect output to the job's log, patch, run, and never return."""
    global NOTE
    code = 1
    try:
        fd = os.open(job["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
        os.environ.update(job.get("env", {}))
        NOTE = os.environ.get("KILL_RUNNER_NOTE", "")
        install(job["when"], int(job["n"]))
        code = run_cli([str(a) for a in job["args"]])
    except BaseException:  # noqa: BLE001 - report anything, then leave
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def serve() -> None:
    """The fork server: import once, then one forked child per job line on stdin."""
    answers = os.fdopen(os.dup(1), "w")  # the protocol's own channel; a stray print goes to stderr instead
    os.dup2(2, 1)
    _import_everything()
    print(json.dumps({"ready": True}), file=answers, flush=True)
    for line in sys.stdin:
        if not line.strip():
            continue
        job = json.loads(line)
        pid = os.fork()
        if pid == 0:
            _child(job)
        _, status = os.waitpid(pid, 0)
        answer = {"signal": os.WTERMSIG(status)} if os.WIFSIGNALED(status) else {"exit": os.WEXITSTATUS(status)}
        print(json.dumps(answer), file=answers, flush=True)


def main(argv: list[str]) -> int:
    if argv[:1] == ["--serve"]:
        serve()
        return 0
    if len(argv) < 3 or argv[2] != "--":
        print(__doc__, file=sys.stderr)
        return 2
    install(argv[0], int(argv[1]))
    return run_cli(argv[3:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
