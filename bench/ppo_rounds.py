"""PPO with on-policy preference rounds on the gold world (InstructGPT §3.5's iterated collection).

    python bench/ppo_rounds.py --world runs/demo/world --sft runs/demo/sft --out runs/ppo-rounds

Each round: pair samples of a policy (consecutive samples of a prompt; 8 a prompt) and have the
world's default (unbiased) rater label them (`tether world label`); train a Bradley–Terry reward
model from the SFT folder on every pair collected so far, the world's fixed-candidate pairs
included; run PPO-ptx from the SFT policy against it (KL to SFT). Round 1 labels the SFT policy's
samples; round r > 1 labels the samples of round r − 1's PPO policy, so the reward model learns
where the policy now is. Then each round's PPO policy is set against SFT under the gold judge
(tether.instruments.winrate.policy_win_rate: 201 test prompts x 4 samples, the same seeds for both).
Steps whose output exists are skipped (the script resumes). Writes ``OUT/summary.json``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from _run import TETHER, sh  # bench/_run.py (scripts here run as `python bench/NAME.py`)


def rm_steps(a, r: int) -> int:
    steps = [int(x) for x in a.rm_steps.split(",")]
    return steps[min(r, len(steps)) - 1]


def run_round(a, r: int, pairs: list[Path]) -> tuple[Path, Path]:
    """Label the previous policy's samples, train the RM on all pairs so far, run PPO; returns (labels, PPO)."""
    out, log = Path(a.out), Path(a.out) / f"round{r}.log"
    labelled = out / f"onpolicy_round{r}.jsonl"
    policy = a.sft if r == 1 else str(out / f"ppo_round{r - 1}")
    if not labelled.exists():
        sh(TETHER + ["world", "label", "--policy", policy, "--prompts", f"{a.world}/prompts_train.jsonl",
                     "--out", str(labelled), "--samples", "8", "--seed", str(r - 1)], log)
    data = out / f"preferences_round{r}.jsonl"
    data.write_text("".join(p.read_text() for p in [Path(a.world) / "preferences_train.jsonl", *pairs, labelled]))
    rm = out / f"rm_round{r}"
    if not (rm / "tether.json").exists():
        sh(TETHER + ["rm", "--model", a.sft, "--data", str(data), "--eval-data", f"{a.world}/preferences_test.jsonl",
                     "--out", str(rm), "--steps", str(rm_steps(a, r)), "--overwrite"], log)
    ppo = out / f"ppo_round{r}"
    if not (ppo / "tether.json").exists():
        sh(TETHER + ["ppo", "--model", a.sft, "--reward", str(rm), "--prompts", f"{a.world}/prompts_train.jsonl",
                     "--eval-prompts", f"{a.world}/prompts_eval.jsonl", "--out", str(ppo), "--beta", str(a.beta),
                     "--lr", str(a.lr), "--ptx-data", f"{a.world}/sft_train.jsonl", "--ptx-coef", str(a.ptx_coef),
                     "--steps", str(a.steps), "--eval-every", "20", "--overwrite"], log)
    return labelled, ppo


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--world", required=True, help="the exported gold world (tether demo writes OUT/world)")
    ap.add_argument("--sft", required=True, help="the SFT folder: start of every reward model and PPO run")
    ap.add_argument("--out", required=True)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--rm-steps", default="600,800", help="RM steps by round (the last for later rounds): more "
                                                          "pairs, more steps")
    ap.add_argument("--steps", type=int, default=120, help="PPO iterations a round")
    ap.add_argument("--beta", type=float, default=0.05)
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--ptx-coef", type=float, default=2.0)
    ap.add_argument("--win-samples", type=int, default=4)
    a = ap.parse_args()
    Path(a.out).mkdir(parents=True, exist_ok=True)
    pairs, policies = [], []
    for r in range(1, a.rounds + 1):
        labelled, ppo = run_round(a, r, pairs)
        pairs.append(labelled)
        policies.append(ppo)

    from tether.data import load_prompts
    from tether.instruments.winrate import policy_win_rate
    from tether.models import load_model, load_tokenizer
    from tether.rewards import load_reward

    test = [x.prompt for x in load_prompts(f"{a.world}/prompts_test.jsonl")]
    sft, tok = load_model(a.sft), load_tokenizer(a.sft)
    rounds = []
    for r, ppo in enumerate(policies, 1):
        w = policy_win_rate(load_model(ppo), sft, tok, test, load_reward("gold"), samples=a.win_samples, seed=0,
                            tokenizer_b=tok)
        final = json.loads((ppo / "tether.json").read_text())["metrics"]
        rm = json.loads((Path(a.out) / f"rm_round{r}" / "tether.json").read_text())["metrics"]
        rounds.append({"round": r, "pairs": sum(1 for p in pairs[:r] for _ in open(p)),
                       "rm_accuracy": rm.get("eval/rm/accuracy"), "win_rate": w.rate, "interval": w.interval,
                       "wins": w.wins, "ties": w.ties, "losses": w.losses, "gold_ppo": w.mean_a, "gold_sft": w.mean_b,
                       "eval_kl": final.get("eval/kl")})
        print(json.dumps(rounds[-1]))
    (Path(a.out) / "summary.json").write_text(json.dumps({"config": vars(a), "rounds": rounds}, indent=2))


if __name__ == "__main__":
    main()
