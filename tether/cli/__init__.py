"""The `tether` command. Each command group lives in its own module here and is added below.

Failure is part of the interface: an error the user can act on (:class:`tether.errors.TetherError`,
which ``DataError``, ``TrainingDiverged`` and the configuration, model, checkpoint and output errors
are, and I/O errors) is printed as one line ``Error: ...`` with exit status 1; anything else is
named as a bug in one line. ``tether --debug ...`` (or ``TETHER_DEBUG=1``) shows the traceback.
"""

from __future__ import annotations

import os

import click

from tether import __version__


def one_line(message: str) -> str:
    """A message on one line (continuation lines joined with ' | '), so a terminal shows it whole."""
    return " | ".join(part.strip() for part in str(message).splitlines() if part.strip())


def _explain(err: Exception) -> str:
    from tether.errors import TetherError

    if isinstance(err, TetherError):
        return one_line(str(err))
    if isinstance(err, OSError):
        where = f"{err.filename}: " if err.filename and str(err.filename) not in str(err) else ""
        return one_line(f"{where}{err}")
    return one_line(f"unexpected {type(err).__name__}: {err} (a bug in tether: please report it; "
                    "`tether --debug ...` shows the traceback)")


class _Tether(click.Group):
    """The command group that turns an exception into one clear line unless --debug is given."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except KeyboardInterrupt:
            raise click.exceptions.Abort() from None
        except Exception as err:
            if ctx.params.get("debug") or os.environ.get("TETHER_DEBUG", "") not in ("", "0"):
                raise
            raise click.ClickException(_explain(err)) from None


@click.group(cls=_Tether, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="tether")
@click.option("--debug", is_flag=True, help="show the full traceback of an error (also: TETHER_DEBUG=1)")
def main(debug: bool) -> None:
    """tether: RLHF you can measure.

    Stages write one output folder each; a later stage names an earlier stage's folder as its model.
    """


def _register() -> None:
    from tether.cli import eval, model, rl, rlaif, stages, theory, world

    for module in (stages, theory, world, rl, rlaif, eval, model):
        for command in module.COMMANDS:
            main.add_command(command)


_register()
