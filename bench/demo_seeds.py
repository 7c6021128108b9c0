"""The demo's figures over seeds: are two versions of ``tether demo`` the same within seed noise?

Each group is the report.json files of one version of the demo at several seeds (``tether demo --seed S
--out DIR``; the world, every stage and every evaluation follow the seed). For every figure of the report
(pretraining and SFT loss, RM accuracy, PPO / DPO / GRPO figures, gold reward per policy, the instruments'
KL, win-rate, refusal of benign prompts, length and diagnosis) it gives each run's value, each group's mean
and standard deviation, the difference of the means in units of the pooled standard deviation, and whether
the second group's mean lies within the first group's range.

    python bench/demo_seeds.py before=runs/a0/report.json,runs/a1/report.json,runs/a2/report.json \\
        after=runs/b0/report.json,runs/b1/report.json,runs/b2/report.json --out bench/results/demo_seeds.md
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def figures(report: dict) -> dict[str, float]:
    """The figures of one report.json, by name."""
    f = {"pretrain held-out loss": report["pretrain"]["eval/loss"], "SFT held-out loss": report["sft"]["eval/loss"],
         "RM accuracy (rater)": report["rm"]["eval/rm/accuracy"],
         "RM accuracy (gold)": report["rm"]["eval/rm/gold_accuracy"],
         "PPO held-out KL": report["ppo"]["eval/kl"], "PPO RM reward": report["ppo"]["eval/reward"],
         "DPO implicit-reward accuracy": report["dpo"]["eval/reward_accuracy"], "DPO KL": report["dpo"]["eval/kl"],
         "GRPO exact match, start": report["grpo"]["eval_exact_match_start"],
         "GRPO exact match, end": report["grpo"]["eval_exact_match_end"], "GRPO KL": report["grpo"]["kl/k1"]}
    for policy in ("pretrained", "sft", "ppo", "dpo", "grpo"):
        f[f"gold reward, {policy}"] = report["gold"][policy]["gold/reward"]
    for policy in ("ppo", "dpo"):
        summary = report["instruments"][policy]["summary"]
        f[f"{policy.upper()} win-rate (gold judge)"] = summary["win_rate"]
        f[f"{policy.upper()} exact KL"] = summary["kl_exact"]
        f[f"{policy.upper()} refusal of benign prompts"] = summary["refusal_benign_policy"]
        f[f"{policy.upper()} length / SFT's"] = summary["length_ratio"]
        f[f"{policy.upper()} diagnosed healthy"] = float(report["instruments"][policy]["diagnosis"]["healthy"])
    f["seconds"] = report["seconds"]
    return f


def table(groups: dict[str, list[dict[str, float]]]) -> str:
    names = list(groups)
    runs = [(f"{name} {i}", run) for name in names for i, run in enumerate(groups[name])]
    pair = len(names) == 2  # then the difference of the two and whether the second's mean is in the first's range
    lines = ["| figure | " + " | ".join(label for label, _ in runs) + " | "
             + " | ".join(f"{n} mean ± sd" for n in names)
             + (" | difference / pooled sd | within the first's range |" if pair else " |"),
             "|---|" + "---:|" * (len(runs) + len(names)) + ("---:|---|" if pair else "")]
    for key in runs[0][1]:
        values = {n: [run[key] for run in groups[n]] for n in names}
        stats = {n: (statistics.mean(v), statistics.stdev(v) if len(v) > 1 else 0.0) for n, v in values.items()}
        row = [key] + [f"{run[key]:.3f}" for _, run in runs] + [f"{m:.3f} ± {s:.3f}" for m, s in stats.values()]
        if pair:
            (ma, sa), (mb, sb) = stats.values()
            pooled = ((sa ** 2 + sb ** 2) / 2) ** 0.5
            row += [f"{(mb - ma) / pooled:+.2f}" if pooled else "—",
                    "yes" if min(values[names[0]]) - 1e-6 <= mb <= max(values[names[0]]) + 1e-6 else "no"]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("groups", nargs="+", help="NAME=report.json,report.json,... (one group a version)")
    parser.add_argument("--out", help="also write the table to this markdown file")
    args = parser.parse_args()
    groups = {}
    for spec in args.groups:
        name, _, paths = spec.partition("=")
        if not paths:
            parser.error(f"{spec!r}: expected NAME=report.json,report.json,...")
        groups[name] = [figures(json.loads(Path(p).read_text())) for p in paths.split(",")]
    text = table(groups)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
