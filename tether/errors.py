"""The errors tether explains in one line.

Every failure a user can cause — a bad record, option, config file, model folder, checkpoint,
output folder, or a run that diverges — raises a subclass of :class:`TetherError` whose message
names the path (and line and field where there is one) and what was expected. The command line
prints such a message as one line and exits non-zero; the traceback is shown only under
``tether --debug`` (or ``TETHER_DEBUG=1``). Each class also derives from the built-in exception
a Python caller would catch (``ValueError``, ``OSError``, ``RuntimeError``).
"""

from __future__ import annotations


class TetherError(Exception):
    """A failure the user can act on; its message is complete on one line."""


class ConfigError(TetherError, ValueError):
    """A bad option or config file: names the option (or file and key) and what was expected."""


class ModelError(TetherError, ValueError):
    """A model, tokenizer or reward source that cannot be loaded: names the path and what is wrong."""


class CheckpointError(TetherError, ValueError):
    """A checkpoint that cannot be resumed: names the file and what is wrong (and how to go on)."""


class OutputError(TetherError, OSError):
    """An output folder tether must not or cannot write: names it and says why."""
