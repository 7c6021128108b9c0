"""The eval report: ``report.json`` (every number) and ``report.html`` (tables and plots, one self-contained file).

Plots are drawn with matplotlib's Agg backend and embedded as base64 PNG, so the HTML opens
anywhere without its folder.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from pathlib import Path

from tether.io import write_json, write_text

POLICY, BASE, GOLD = "#1f77b4", "#999999", "#d62728"


def _png(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return '<img alt="plot" src="data:image/png;base64,' + base64.b64encode(buf.getvalue()).decode() + '">'


def _fig(w: float = 6.0, h: float = 3.4):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(w, h))


def _fmt(v) -> str:
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.4g}"
    if isinstance(v, (list, tuple)) and all(isinstance(x, float) for x in v):
        return "[" + ", ".join(f"{x:.3g}" for x in v) + "]"
    return html.escape(str(v))


def _table(rows: list[tuple], header: tuple | None = None) -> str:
    head = "<tr>" + "".join(f"<th>{html.escape(str(h))}</th>" for h in header) + "</tr>" if header else ""
    body = "".join("<tr>" + "".join(f"<td>{_fmt(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table>{head}{body}</table>"


def _flat(d: dict) -> list[tuple]:
    return [(k, v) for k, v in d.items() if isinstance(v, (int, float, str)) or v is None]


def _grouped_bars(title: str, labels: list[str], policy: list[float], base: list[float], ylabel: str):
    fig, ax = _fig()
    x = range(len(labels))
    ax.bar([i - 0.2 for i in x], policy, 0.4, label="policy", color=POLICY)
    ax.bar([i + 0.2 for i in x], base, 0.4, label="base", color=BASE)
    ax.set_xticks(list(x), labels, rotation=15, fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend()
    return _png(fig)


def _kl_section(s: dict) -> str:
    names = ["exact", "k1", "k2", "k3"]
    _fig()  # selects the Agg backend
    import matplotlib.pyplot as plt

    plt.close("all")
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.4))
    a1.bar(names, [s[f"kl/{n}"] for n in names], yerr=[1.96 * s[f"kl/{n}_stderr"] for n in names], capsize=4,
           color=[POLICY, "#ff7f0e", "#2ca02c", "#9467bd"])
    a1.set_ylabel("nats per response")
    a1.set_title("KL(policy ‖ base): mean ± 1.96 s.e.")
    per = s["per_response"]
    a2.hist([per["exact"], per["k1"]], bins=30, label=["exact (Σ_t full-vocab KL)", "k1 (Σ_t log-ratio)"],
            color=[POLICY, "#ff7f0e"])
    a2.set_xlabel("nats per response")
    a2.set_title("spread over responses")
    a2.legend(fontsize=8)
    rows = [(n, s[f"kl/{n}"], s[f"kl/{n}_stderr"], s[f"kl/{n}_std"]) for n in names]
    return _table(rows, ("estimate", "mean", "std. error", "std. dev.")) + _png(fig) + \
        f"<p>{int(s['kl/responses'])} responses, {s['kl/tokens_mean']:.1f} tokens on average. k1, k3 and the exact " \
        "sum are unbiased for the sequence KL; k2 is not.</p>"


def _winrate_section(w: dict) -> str:
    fig, ax = _fig(5, 3.2)
    vals = [w["rate"], w["lc_rate"]]
    lo = [w["rate"] - w["interval"][0], w["lc_rate"] - w["lc_interval"][0]]
    hi = [w["interval"][1] - w["rate"], w["lc_interval"][1] - w["lc_rate"]]
    ax.bar(["win-rate", "length-controlled"], vals, yerr=[lo, hi], capsize=5, color=[POLICY, "#2ca02c"])
    ax.axhline(0.5, color="k", ls="--", lw=1)
    ax.set_ylim(0, 1)
    ax.set_title(f"policy vs base, judge {w['judge']} (95% bootstrap)")
    return _table(_flat(w)) + _png(fig)


def _lengths_section(s: dict) -> str:
    fig, ax = _fig()
    ax.hist([s["samples"]["policy"], s["samples"]["base"]], bins=25, label=["policy", "base"], color=[POLICY, BASE])
    ax.set_xlabel("response length (words)")
    ax.set_title("lengths on held-out prompts")
    ax.legend()
    groups = ["all"] + (["short"] if "lengths/short_ratio" in s else [])
    rows = [(g, who, s[f"lengths/{g}_{who}_mean"], s[f"lengths/{g}_{who}_median"], s[f"lengths/{g}_{who}_p95"])
            for g in groups for who in ("policy", "base")]
    ratios = [(f"{g} ratio (policy / base)", s[f"lengths/{g}_ratio"]) for g in groups]
    return _table(rows, ("prompts", "model", "mean", "median", "p95")) + _table(ratios) + _png(fig)


def _refusal_section(s: dict) -> str:
    names = sorted({k.split("/")[1].rsplit("_", 1)[0] for k in s})
    rows = [(n, s[f"refusal/{n}_policy"], s[f"refusal/{n}_base"], int(s[f"refusal/{n}_count"])) for n in names]
    plot = _grouped_bars("refusal rate (benign / safe: over-refusal)", names, [r[1] for r in rows],
                         [r[2] for r in rows], "share refused")
    return _table(rows, ("prompt set", "policy", "base", "prompts")) + plot


def _sycophancy_section(s: dict) -> str:
    keys = [k for k in s["policy"] if k != "initially_correct"]
    rows = [(k, s["policy"][k], s["base"][k]) for k in keys]
    return _table(rows, ("metric", "policy", "base")) + _grouped_bars("sycophancy", keys, [r[1] for r in rows],
                                                                      [r[2] for r in rows], "rate")


def _capability_section(s: dict) -> str:
    rows = []
    if "mc" in s:
        rows += [("multiple choice acc", s["mc"]["policy"]["acc"], s["mc"]["base"]["acc"]),
                 ("multiple choice acc_norm", s["mc"]["policy"]["acc_norm"], s["mc"]["base"]["acc_norm"])]
    for key, title in (("arithmetic", "arithmetic exact match"), ("gsm8k", "GSM8K exact match")):
        if key in s:
            rows.append((f"{title} (n={s[key]['count']})", s[key]["policy"], s[key]["base"]))
    return _table(rows, ("measure", "policy", "base")) + _grouped_bars(
        "capability retention", [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows], "accuracy")


def _hacking_section(s: dict) -> str:
    parts = []
    if "padding" in s:
        fig, ax = _fig()
        p = s["padding"]
        ax.plot(p["words_added"], p["reward"], "o-", color=POLICY, label="reward model")
        if "padding_gold" in s:
            ax.plot(s["padding_gold"]["words_added"], s["padding_gold"]["reward"], "s--", color=GOLD, label="gold")
        ax.set_xlabel(f"words of filler added ({p['filler'].strip()!r} repeated)")
        ax.set_ylabel("mean reward")
        ax.set_title(f"the same answer, padded: RM slope {p['slope_per_10_words']:+.3f} per 10 words")
        ax.legend()
        parts.append(_png(fig))
    if "phrases" in s:
        ph = s["phrases"]
        fig, ax = _fig(7, 0.3 * len(ph) + 1.2)
        ax.barh([g["phrase"][:40] for g in ph][::-1], [g["gain"] for g in ph][::-1],
                xerr=[1.96 * g["stderr"] for g in ph][::-1], color=POLICY, capsize=3)
        ax.axvline(0, color="k", lw=1)
        ax.set_xlabel("mean RM gain from the phrase, in its better place (± 1.96 s.e.)")
        ax.tick_params(axis="y", labelsize=8)
        parts.append(_png(fig))
        rows = [(g["phrase"], g.get("position", "end"), g["gain"], g["stderr"], g["positive"],
                 s["usage_policy"].get(g["phrase"], float("nan")), s["usage_base"].get(g["phrase"], float("nan")))
                for g in ph]
        parts.append(_table(rows, ("phrase", "placed at", "RM gain", "s.e.", "share positive", "used by policy",
                                   "used by base")))
    if s.get("ascent"):
        rows = [(a["prompt"].strip()[-60:], a["start"], a["start_score"], a["continuous_score"], a["projected"],
                 a["projected_score"]) for a in s["ascent"]]
        parts.append("<h3>Gradient ascent on the RM's input embeddings</h3>" + _table(
            rows, ("prompt", "start answer", "RM", "RM after ascent (continuous)", "nearest tokens", "RM of those")))
    return "".join(parts)


def _overopt_section(s: dict) -> str:
    from tether.instruments.overopt import predict

    pts = s["points"]
    fig, ax = _fig()
    d = [p["d"] for p in pts]
    grid = [max(d) * i / 60 for i in range(1, 61)]
    for key, color in (("gold", GOLD), ("proxy", POLICY)):
        if all(p.get(key) is not None for p in pts):
            y0 = pts[0][key]
            ax.plot(d, [p[key] - y0 for p in pts], "o", color=color, label=f"{key} (measured)")
            fit = s.get(f"fit_{key}", {})
            if "alpha" in fit:
                shape = "d(α−β log d)" if s["form"] == "rl" else "d(α−β d)"
                ax.plot(grid, predict(s["form"], fit["alpha"], fit["beta"], grid), "-", color=color,
                        label=f"{key}: {shape}, α={fit['alpha']:.2f}, β={fit['beta']:.2f}")
    if "gold_peak" in s:
        ax.axvline(s["gold_peak"]["d"], color=GOLD, ls=":", lw=1, label="measured gold peak")
    if s["form"] == "bon":
        for p in pts:
            ax.annotate(f"n={p['n']}", (p["d"], 0), fontsize=7, textcoords="offset points", xytext=(0, -12))
    ax.set_xlabel("d = √KL(policy ‖ base)")
    ax.set_ylabel("reward gain over the start")
    ax.set_title("over-optimisation (Gao et al. 2023 functional form)")
    ax.legend(fontsize=7)
    rows = [(k, v.get("alpha"), v.get("beta"), v.get("rmse"), v.get("peak_d"), v.get("peak_kl"))
            for k, v in ((f, s[f"fit_{f}"]) for f in ("gold", "proxy") if f"fit_{f}" in s) if "alpha" in v]
    peak = _table(_flat(s["gold_peak"])) if "gold_peak" in s else ""
    return _table(rows, ("reward", "α", "β", "rmse", "peak d*", "peak KL")) + peak + _png(fig)


SECTIONS = [("kl", "KL from the base", _kl_section), ("win_rate", "Win-rate against the base", _winrate_section),
            ("lengths", "Lengths", _lengths_section), ("rm", "Reward-model accuracy", lambda s: _table(_flat(s))),
            ("refusal", "Refusal", _refusal_section),
            ("refusal_judge", "Refusal by the judge", lambda s: _table(_flat(s))), ("sycophancy", "Sycophancy", _sycophancy_section),
            ("capability", "Capability retention", _capability_section),
            ("hacking", "Reward-hacking probes", _hacking_section),
            ("overoptimisation", "Over-optimisation of the run (RL form)", _overopt_section),
            ("overoptimisation_bon", "Over-optimisation of best-of-n against the RM (BoN form)", _overopt_section)]

STYLE = """body{font-family:sans-serif;max-width:1000px;margin:2em auto;color:#222}
table{border-collapse:collapse;margin:.6em 0;font-size:14px}td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}
th{background:#f0f0f0}img{max-width:100%;display:block;margin:.5em 0}h2{border-bottom:2px solid #1f77b4}
.diag td:first-child{font-weight:bold}"""


def render_html(report: dict) -> str:
    from tether.instruments.diagnose import diagnose_report

    cfg = report["config"]
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>tether eval</title><style>{STYLE}</style></head>"
             f"<body><h1>tether eval</h1><p>policy <code>{html.escape(cfg['policy'])}</code> against base "
             f"<code>{html.escape(cfg['base'])}</code>, judge <code>{html.escape(cfg['judge'])}</code> "
             f"({report.get('seconds', 0):.0f} s)</p>"]
    metrics_file = Path(cfg["policy"]) / "metrics.jsonl"  # the run's own metrics, as `tether diagnose` reads them
    metrics = ([json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
               if metrics_file.exists() else None)
    found = diagnose_report(report, metrics)
    parts.append("<h2>Diagnosis</h2>" + (f"<p><b>{html.escape(found['verdict'])}</b></p>"))
    if found["findings"]:
        parts.append("<table class='diag'><tr><th>symptom</th><th>evidence</th><th>instrument</th><th>likely cause</th>"
                     "<th>fix</th></tr>" + "".join(
                         "<tr>" + "".join(f"<td>{html.escape(f[k])}</td>" for k in
                                          ("symptom", "evidence", "instrument", "cause", "fix")) + "</tr>"
                         for f in found["findings"]) + "</table>")
    parts.append("<h2>Summary</h2>" + _table(_flat(report["summary"])))
    for key, title, render in SECTIONS:
        if key in report["sections"]:
            parts.append(f"<h2>{title}</h2>" + render(report["sections"][key]))
    if report.get("examples"):
        parts.append("<h2>Examples</h2>" + _table([(e["prompt"].strip(), e["policy"], e["base"], e["outcome"])
                                                   for e in report["examples"]],
                                                  ("prompt", "policy", "base", "outcome for policy")))
    if report.get("skipped"):
        parts.append("<h2>Not measured</h2><ul>" + "".join(f"<li>{html.escape(s)}</li>" for s in report["skipped"]) + "</ul>")
    parts.append("<h2>Inputs</h2>" + _table(_flat(report["sources"])) + "</body></html>")
    return "".join(parts)


def write_report(report: dict, out: str | Path) -> Path:
    """Write ``report.json`` and ``report.html`` into ``out``; returns the HTML path."""
    out = Path(out)
    write_json(out / "report.json", report)
    return write_text(out / "report.html", render_html(report))
