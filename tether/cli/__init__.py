"""The `tether` command. Each command group lives in its own module here and is added below."""

from __future__ import annotations

import click

from tether import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="tether")
def main() -> None:
    """tether: RLHF you can measure.

    Stages write one output folder each; a later stage names an earlier stage's folder as its model.
    """


def _register() -> None:
    from tether.cli import eval, rl, rlaif, stages, theory, world

    for module in (stages, theory, world, rl, rlaif, eval):
        for command in module.COMMANDS:
            main.add_command(command)


_register()
