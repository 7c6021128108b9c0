"""``tether optimal-policy`` (the closed-form optimum, by hand) and ``tether calibrate-beta``."""

from __future__ import annotations

import math

import click
import numpy as np

from tether import theory
from tether.calibrate import CalibrateConfig, format_summary, run_calibrate
from tether.config import options


def _floats(ctx: click.Context, param: click.Parameter, value: str | None) -> list[float] | None:
    if value is None:
        return None
    try:
        out = [float(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated numbers, got {value!r}", ctx, param) from None
    if not out:
        raise click.BadParameter("expected at least one number", ctx, param)
    return out


def _check_beta(beta: float, ctx: click.Context, name: str) -> None:
    if math.isnan(beta) or beta < 0:
        raise click.BadParameter(f"β must be >= 0 (0 and inf allowed), got {beta}", ctx, param_hint=name)


def _fmt(x: float) -> str:
    return f"{x:.4f}" if math.isfinite(x) and abs(x) < 1e6 else f"{x:.4g}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(header, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in rows]
    return "\n".join(lines)


@click.command("optimal-policy")
@click.option("--sft", required=True, callback=_floats, help="π_SFT over the responses, comma-separated (sums to 1)")
@click.option("--reward", required=True, callback=_floats, help="R(y) for each response, comma-separated")
@click.option("--beta", type=float, default=None, help="KL coefficient β for the single-β table (0 and inf allowed)")
@click.option("--sweep", callback=_floats, default=None, help="comma-separated β values for a sweep table")
def optimal_policy(sft: list[float], reward: list[float], beta: float | None, sweep: list[float] | None) -> None:
    """π*(y) = π_SFT(y)·exp(R(y)/β)/Z, the maximiser of E[R] − β·KL(π || π_SFT).

    Example: tether optimal-policy --sft 0.6,0.4 --reward 1,0 --beta 0.5
    """
    ctx = click.get_current_context()
    if len(sft) != len(reward):
        raise click.BadParameter(f"--sft has {len(sft)} values but --reward has {len(reward)}", ctx, param_hint="--reward")
    if not all(math.isfinite(r) for r in reward):
        raise click.BadParameter(f"rewards must be finite numbers, got {reward}", ctx, param_hint="--reward")
    if not all(p >= 0 for p in sft) or not abs(sum(sft) - 1.0) <= 1e-3:
        raise click.BadParameter(f"probabilities must be >= 0 and sum to 1 (within 1e-3); they sum to {sum(sft):.6g}",
                                 ctx, param_hint="--sft")
    if beta is None and sweep is None:
        raise click.UsageError("give --beta, --sweep, or both", ctx)
    pi = np.asarray(sft) / sum(sft)
    r = np.asarray(reward)
    if beta is not None:
        _check_beta(beta, ctx, "--beta")
        star = theory.optimal_policy(pi, r, beta)
        if 0 < beta < math.inf:
            numer = np.exp(np.log(np.where(pi > 0, pi, 1e-300)) + r / beta) * (pi > 0)
        else:
            numer = np.full_like(pi, math.nan)
        rows = [[str(i), _fmt(pi[i]), _fmt(r[i]), _fmt(numer[i]), _fmt(star[i])] for i in range(len(pi))]
        click.echo(f"β = {beta:g}")
        click.echo(_table(["y", "π_SFT", "R", "π_SFT·exp(R/β)", "π*"], rows))
        log_z = float(theory.log_partition(pi, r, beta))
        z = math.exp(log_z) if log_z < 700 else math.inf
        click.echo(f"Z = {_fmt(z)}   log Z = {_fmt(log_z)}")
        click.echo(f"KL(π*||π_SFT) = {_fmt(float(theory.kl_divergence(star, pi)))}   "
                   f"E_π*[R] = {_fmt(float(theory.expected_reward(star, r)))}   "
                   f"E_π_SFT[R] = {_fmt(float(theory.expected_reward(pi, r)))}")
    if sweep is not None:
        for b in sweep:
            _check_beta(b, ctx, "--sweep")
        if beta is not None:
            click.echo("")
        rows = []
        for b in sweep:
            star = theory.optimal_policy(pi, r, b)
            rows.append([f"{b:g}", *(_fmt(p) for p in star), _fmt(float(theory.kl_divergence(star, pi))),
                         _fmt(float(theory.expected_reward(star, r)))])
        header = ["β", *(f"π*(y={i})" for i in range(len(pi))), "KL(π*||π_SFT)", "E[R]"]
        click.echo(_table(header, rows))


@click.command("calibrate-beta")
@options(CalibrateConfig)
def calibrate_beta(cfg: CalibrateConfig) -> None:
    """Measure achieved KL and win-rate for each β, plot the frontier, recommend a β within a KL budget.

    Example (exact, seconds): tether calibrate-beta --method tabular --betas 0.1,0.3,1,3 --kl-budget 0.5
    """
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    summary = run_calibrate(cfg)
    click.echo(format_summary(summary))
    click.echo(f"  frontier: {cfg.out}/frontier.png and frontier.json")


COMMANDS = [optimal_policy, calibrate_beta]
