"""``tether world export``: write the gold world's data as the files tether consumes."""

from __future__ import annotations

import click

from tether.config import options
from tether.world import WorldConfig, export


@click.group()
def world() -> None:
    """The gold world: an embedded task with a known true reward."""


@world.command("export")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="folder to write the files into")
@options(WorldConfig)
def export_command(cfg: WorldConfig, out: str) -> None:
    """Write pretraining text, SFT, prompts, preferences, feedback and probes as JSONL files."""
    files = export(out, cfg)
    import json

    counts = json.loads(files["manifest"].read_text())["counts"]
    for name, path in files.items():
        if name != "manifest":
            click.echo(f"  {counts[name]:>6}  {path}")
    click.echo(f"  world.json describes them: {files['manifest']}")


COMMANDS = [world]
