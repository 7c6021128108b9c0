"""PPO on the gold world: the figures of the PPO issue, reproduced by one command.

    python bench/ppo_gold_world.py --world runs/demo/world --sft runs/demo/sft --rm runs/demo/rm --out runs/ppo-exp

Three experiments, run as parallel `tether` processes (one CPU thread each, ``--jobs`` at once):

1. PPO against the learned reward model (default raters) at a few learning rates: gold reward on
   held-out prompts, achieved KL, and the gold-judged win-rate against the SFT policy;
2. a β sweep with ``tether calibrate-beta --method ppo``: achieved KL and win-rate per β;
3. over-optimisation: a reward model trained on a length-biased rater's labels, and PPO with a
   small β against it; the proxy (RM) reward, the gold reward and the length on held-out prompts
   at every evaluation.

Writes ``summary.json`` in ``--out`` and prints it.
"""

from __future__ import annotations

import argparse
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from _run import TETHER, sh  # bench/_run.py (scripts here run as `python bench/NAME.py`)


def ppo_args(a, reward: str, prompts: str, eval_prompts: str, out: Path, *, lr: float, beta: float, steps: int) -> list[str]:
    return TETHER + ["ppo", "--model", a.sft, "--reward", reward, "--prompts", prompts, "--eval-prompts", eval_prompts,
                     "--eval-size", "151", "--out", str(out), "--steps", str(steps), "--eval-every", "10",
                     "--save-every", "0", "--rollout-batch", "64", "--lr", str(lr), "--beta", str(beta), "--overwrite"]


def lr_run(a, lr: float) -> Path:
    out = Path(a.out) / f"lr-{lr:g}"
    sh(ppo_args(a, a.rm, f"{a.world}/prompts_train.jsonl", f"{a.world}/prompts_eval.jsonl", out, lr=lr, beta=a.beta,
                steps=a.steps), Path(a.out) / f"lr-{lr:g}.log")
    return out


def beta_run(a, beta: float) -> Path:
    out = Path(a.out) / f"sweep-{beta:g}"
    sh(TETHER + ["calibrate-beta", "--method", "ppo", "--model", a.sft, "--data", f"{a.world}/prompts_train.jsonl",
                 "--prompts", f"{a.world}/prompts_test.jsonl", "--reward", a.rm, "--judge", "gold", "--betas", str(beta),
                 "--eval-prompts", "201", "--steps", str(a.steps), "--lr", str(a.sweep_lr), "--warmup-steps", "0",
                 "--schedule", "constant", "--rollout-batch", "64", "--kl-budget", "100", "--out", str(out)],
       Path(a.out) / f"sweep-{beta:g}.log")
    return out


def overopt_run(a) -> Path:
    root = Path(a.out) / "overopt"
    log = Path(a.out) / "overopt.log"
    sh(TETHER + ["world", "export", "--out", str(root / "world"), "--rater-length-bias", str(a.length_bias)], log)
    sh(TETHER + ["rm", "--model", a.sft, "--data", str(root / "world/preferences_train.jsonl"), "--eval-data",
                 str(root / "world/preferences_test.jsonl"), "--out", str(root / "rm"), "--eval-every", "0", "--steps", str(a.rm_steps),
                 "--save-every", "0", "--overwrite"], log)
    sh(ppo_args(a, str(root / "rm"), f"{a.world}/prompts_train.jsonl", f"{a.world}/prompts_eval.jsonl", root / "ppo",
                lr=a.overopt_lr, beta=a.overopt_beta, steps=a.overopt_steps), log)
    return root


def curve(folder: Path) -> list[dict]:
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return [{k: r[k] for k in ("step", "eval/reward", "eval/gold", "eval/kl", "eval/length") if k in r}
            for r in rows if "eval/gold" in r]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--world", required=True)
    ap.add_argument("--sft", required=True)
    ap.add_argument("--rm", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--jobs", type=int, default=12)
    ap.add_argument("--steps", type=int, default=60, help="PPO iterations of experiments 1 and 2")
    ap.add_argument("--lrs", default="2e-5,5e-5,1e-4")
    ap.add_argument("--beta", type=float, default=0.05, help="β of experiment 1")
    ap.add_argument("--betas", default="0.01,0.03,0.1,0.3,1")
    ap.add_argument("--sweep-lr", type=float, default=5e-5)
    ap.add_argument("--length-bias", type=float, default=2.0)
    ap.add_argument("--overopt-beta", type=float, default=0.002)
    ap.add_argument("--overopt-lr", type=float, default=1e-4)
    ap.add_argument("--overopt-steps", type=int, default=120)
    ap.add_argument("--rm-steps", type=int, default=300, help="steps of the length-biased reward model")
    ap.add_argument("--win-samples", type=int, default=4)
    ap.add_argument("--only", default="lr,sweep,overopt", help="which experiments to run")
    a = ap.parse_args()
    Path(a.out).mkdir(parents=True, exist_ok=True)
    only = set(a.only.split(","))
    lrs = [float(x) for x in a.lrs.split(",")] if "lr" in only else []
    betas = [float(x) for x in a.betas.split(",")] if "sweep" in only else []
    with ThreadPoolExecutor(a.jobs) as pool:
        over = pool.submit(overopt_run, a) if "overopt" in only else None
        lr_jobs = {lr: pool.submit(lr_run, a, lr) for lr in lrs}
        sweep_jobs = {b: pool.submit(beta_run, a, b) for b in betas}
        lr_out = {lr: j.result() for lr, j in lr_jobs.items()}
        sweep_out = {b: j.result() for b, j in sweep_jobs.items()}
        over_out = over.result() if over else None

    from tether.data import load_prompts
    from tether.instruments.winrate import policy_win_rate
    from tether.models import load_model, load_tokenizer
    from tether.rewards import load_reward

    summary: dict = {"config": vars(a), "ppo_vs_sft": {}, "beta_sweep": [], "overoptimisation": None}
    test = [r.prompt for r in load_prompts(f"{a.world}/prompts_test.jsonl")]
    sft, tok = load_model(a.sft), load_tokenizer(a.sft)
    for lr, folder in lr_out.items():
        w = policy_win_rate(load_model(folder), sft, tok, test, load_reward("gold"), samples=a.win_samples, seed=1)
        summary["ppo_vs_sft"][f"{lr:g}"] = {"win_rate": w.rate, "interval": w.interval, "gold_ppo": w.mean_a,
                                           "gold_sft": w.mean_b, "wins": w.wins, "ties": w.ties, "losses": w.losses,
                                           "eval_curve": curve(folder)}
    for b, folder in sweep_out.items():
        summary["beta_sweep"] += json.loads((folder / "frontier.json").read_text())["points"]
    if over_out is not None:
        rm_metrics = json.loads((over_out / "rm/tether.json").read_text())["metrics"]
        summary["overoptimisation"] = {
            "rm": {k: rm_metrics.get(k) for k in ("eval/rm/accuracy", "eval/rm/gold_accuracy",
                                                  "eval/rm/rm_prefers_longer", "eval/rm/gold_prefers_longer")},
            "curve": curve(over_out / "ppo")}
    (Path(a.out) / "summary.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
