"""``tether world export``: write the gold world's data as the files tether consumes."""

from __future__ import annotations

import click

from tether.config import options
from tether.world import WorldConfig, export


@click.group()
def world() -> None:
    """The gold world: an embedded task with a known true reward."""


@world.command("export")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="folder to write the files into "
              "(absent or empty, or an earlier export with --overwrite)")
@click.option("--overwrite", is_flag=True, help="replace the files of an earlier export in --out (one with world.json)")
@options(WorldConfig)
def export_command(cfg: WorldConfig, out: str, overwrite: bool) -> None:
    """Write pretraining text, SFT, prompts, preferences, feedback and probes as JSONL files."""
    files = export(out, cfg, overwrite=overwrite)
    import json

    counts = json.loads(files["manifest"].read_text())["counts"]
    for name, path in files.items():
        if name != "manifest":
            click.echo(f"  {counts[name]:>6}  {path}")
    click.echo(f"  world.json describes them: {files['manifest']}")


@world.command("label")
@click.option("--policy", required=True, type=click.Path(exists=True, file_okay=False),
              help="the policy folder whose samples are compared (for example an SFT run)")
@click.option("--prompts", required=True, type=click.Path(exists=True, dir_okay=False),
              help="prompt rows (JSONL with a 'prompt' field), e.g. the world's prompts_train.jsonl")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="preference JSONL to write")
@click.option("--samples", default=8, show_default=True, help="samples a prompt (even; consecutive ones are paired)")
@click.option("--max-new-tokens", default=64, show_default=True, help="tokens sampled at most a response")
@click.option("--batch-size", default=32, show_default=True,
              help="rows sampled at once (a prompt's samples share its prefill; larger is faster on small models)")
@click.option("--length-bias", default=0.0, show_default=True, help="the rater's preference for longer answers")
@click.option("--phrase-bias", default=0.0, show_default=True, help="the rater's preference for 'delve'-style words")
@click.option("--sycophancy-bias", default=0.0, show_default=True, help="the rater's preference for agreeing")
@click.option("--refusal-bias", default=0.0, show_default=True, help="the rater's preference for refusals")
@click.option("--seed", default=0, show_default=True, help="seed of sampling and of the rater's coin flips")
def label_command(policy: str, prompts: str, out: str, samples: int, max_new_tokens: int, batch_size: int,
                  length_bias: float, phrase_bias: float, sycophancy_bias: float, refusal_bias: float,
                  seed: int) -> None:
    """Pairs of POLICY's own samples labelled by a simulated rater (InstructGPT-style on-policy comparisons)."""
    from tether.config import SEED_MAX, check
    from tether.data import load_prompts

    check("samples", samples, ge=2, integer=True)
    check("max_new_tokens", max_new_tokens, ge=1, integer=True)
    check("batch_size", batch_size, ge=1, integer=True)
    for name, value in (("length_bias", length_bias), ("phrase_bias", phrase_bias),
                        ("sycophancy_bias", sycophancy_bias), ("refusal_bias", refusal_bias)):
        check(name, value)
    check("seed", seed, ge=0, le=SEED_MAX, integer=True)
    from tether.io import write_jsonl
    from tether.models import load_model, load_tokenizer
    from tether.world import Rater
    from tether.world.sampled import policy_preferences

    rows = [{"prompt": r.prompt} for r in load_prompts(prompts)]
    rater = Rater(length_bias=length_bias, phrase_bias=phrase_bias, sycophancy_bias=sycophancy_bias,
                  refusal_bias=refusal_bias, seed=seed)
    try:
        prefs = policy_preferences(load_model(policy), load_tokenizer(policy), rows, rater, samples=samples,
                                   max_new_tokens=max_new_tokens, seed=seed, batch_size=batch_size)
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint="--samples") from err
    write_jsonl(out, prefs)
    agree = sum(p["gold_chosen"] > p["gold_rejected"] for p in prefs)
    ties = sum(p["gold_chosen"] == p["gold_rejected"] for p in prefs)
    click.echo(f"{len(prefs)} pairs written to {out}; the rater's choice has the higher gold reward in {agree} "
               f"and ties under gold in {ties}")


COMMANDS = [world]
