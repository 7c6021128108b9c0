"""``tether eval`` (every instrument on a policy against its base) and ``tether diagnose`` (what went wrong)."""

from __future__ import annotations

import json

import click

from tether.config import options
from tether.instruments.evaluate import EvalConfig


@click.command("eval")
@options(EvalConfig)
def eval_command(cfg: EvalConfig) -> None:
    """Measure a policy against its base: KL, win-rate, lengths, RM accuracy, refusal, sycophancy, capability,
    hacking probes, over-optimisation. Writes report.json and report.html (in POLICY/eval by default).
    Under torchrun the per-prompt work is split over ranks and rank 0 writes the report."""
    from pathlib import Path

    from tether import distributed
    from tether.cli.stages import _run
    from tether.instruments.diagnose import diagnose_report, format_diagnosis
    from tether.instruments.evaluate import run_eval

    report = _run(run_eval, cfg)
    if not distributed.env().main:  # under torchrun: rank 0 wrote the report and speaks
        return
    s = report["summary"]
    click.echo(f"KL(policy ‖ base) {s['kl_exact']:.3f} ± {s['kl_exact_stderr']:.3f} nats (exact; k1 {s['kl_k1']:.3f}, "
               f"k3 {s['kl_k3']:.3f}); win-rate {s['win_rate']:.3f} [{s['win_rate_interval'][0]:.3f}, "
               f"{s['win_rate_interval'][1]:.3f}], length-controlled {s['lc_win_rate']:.3f} ({s['judge']})")
    click.echo(format_diagnosis(diagnose_report(report)))
    out = Path(cfg.out or Path(cfg.policy) / "eval")
    click.echo(f"report: {out / 'report.html'} and {out / 'report.json'}")


@click.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--report", "report_path", default=None, type=click.Path(dir_okay=False),
              help="eval report to read (default: RUN_DIR/eval/report.json, written by `tether eval`)")
@click.option("--json", "as_json", is_flag=True, help="print the findings as JSON")
def diagnose(run_dir: str, report_path: str | None, as_json: bool) -> None:
    """Map each symptom of a run to its instrument, likely cause and fix; say plainly when it is healthy."""
    from tether.instruments.diagnose import diagnose as run_diagnose
    from tether.instruments.diagnose import format_diagnosis

    found = run_diagnose(run_dir, report_path)
    click.echo(json.dumps(found, indent=2) if as_json else format_diagnosis(found))


COMMANDS = [eval_command, diagnose]
