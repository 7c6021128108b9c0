"""RLAIF on the gold world: the figures of the RLAIF issue, reproduced by one command.

    python bench/rlaif_gold_world.py --world runs/demo/world --pretrain runs/demo/pretrain --sft runs/demo/sft \
        --out runs/rlaif

1. a judge: the pretrained tiny default fine-tuned on judge prompts built from gold-labelled
   comparisons (``tether rlaif train-judge``; skipped with ``--judge FOLDER``); its held-out
   agreement with gold and its flip rate when the order is swapped are in ``judge/judge_eval.json``;
2. branch ``all`` (the default constitution's five principles): ``tether rlaif label`` on SFT
   samples of the training prompts (soft labels; ``--gold`` so that agreement with the truth is
   measured), ``tether rm --label-field label_prob``, and PPO-ptx from SFT against that RM with
   the demo's settings (tether.demo);
3. branch ``harmless`` (the harmlessness principle alone), Constitutional AI's setting: the demo's
   SFT policy already refuses 99% of harmful requests, so this branch starts from a *helpful-only*
   policy, SFT on the same demonstrations except that 70% of those for harmful requests comply
   (``--comply``; as Bai et al. start from a helpful-only RLHF model). It labels pairs of that
   policy's samples on the training split's harmful and benign requests (the red-team prompts),
   trains an RM on them, and runs PPO-ptx on those prompts (ptx: the demonstrations for all other
   requests);
4. every policy is scored on held-out test prompts: the mean gold reward, the gold-judged
   win-rate against the policy it started from (tether.instruments.winrate.policy_win_rate), and
   refusal of the world's harmful probes beside refusal of its benign look-alikes (over-refusal),
   each over ``--probe-samples`` samples a probe at temperature 1.

Stages run as ``tether`` processes (one CPU thread each), the branches ``--jobs`` at once; a stage
whose output exists is not run again (``--overwrite`` reruns). Writes ``summary.json`` in
``--out`` and prints it as tables.
"""

from __future__ import annotations

import argparse
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from _run import TETHER, sh  # bench/_run.py (scripts here run as `python bench/NAME.py`)

BRANCHES = ("all", "harmless")


def done(path: Path, a) -> bool:
    return path.exists() and not a.overwrite


def helpful_only(a) -> tuple[str, Path, Path, Path]:
    """The helpful-only SFT policy and its files: (folder, red-team prompts, ptx data, SFT data)."""
    import random

    from tether.io import read_jsonl, write_jsonl
    from tether.world.gold import parse_question, question_of
    from tether.world.tasks import HARMFUL

    root = Path(a.out) / "helpful_only"
    family = lambda prompt: parse_question(question_of(prompt))[0]  # noqa: E731
    rng = random.Random(a.seed)
    data = []
    for r in read_jsonl(f"{a.world}/sft_train.jsonl"):
        if family(r["prompt"]) == "harmful" and rng.random() < a.comply:
            r = {**r, "completion": " Sure. " + HARMFUL[question_of(r["prompt"])]}
        data.append(r)
    sft_data = write_jsonl(root / "sft_train.jsonl", data)
    ptx = write_jsonl(root / "ptx.jsonl", [r for r in data if family(r["prompt"]) != "harmful"])
    red = write_jsonl(root / "prompts_redteam.jsonl", [r for r in read_jsonl(f"{a.world}/prompts_train.jsonl")
                                                       if r["family"] in ("harmful", "benign")])
    folder = root / "sft"
    if not done(folder / "tether.json", a):
        sh(TETHER + ["sft", "--model", a.pretrain, "--data", str(sft_data), "--eval-data", f"{a.world}/sft_eval.jsonl",
                     "--out", str(folder), "--steps", "300", "--lr", "1e-3", "--warmup-steps", "20", "--eval-every", "0",
                     "--save-every", "0", "--seed", str(a.seed), "--overwrite"], root / "run.log")
    return str(folder), red, ptx, sft_data


def branch(a, name: str, judge: str) -> tuple[Path, str]:
    """Label with one constitution, train the RM on the soft labels, run PPO against it; (folder, start policy)."""
    from tether.demo import PPO_BETA, PPO_LR, PPO_PTX_COEF

    if name == "all":
        policy, prompts, ptx, principles, samples = a.sft, f"{a.world}/prompts_train.jsonl", f"{a.world}/sft_train.jsonl", [], a.samples
    else:
        policy, red, ptx_path, _ = helpful_only(a)
        prompts, ptx, principles, samples = str(red), str(ptx_path), ["--principles", "harmless"], a.redteam_samples
    root = Path(a.out) / name
    root.mkdir(parents=True, exist_ok=True)
    log = root / "run.log"
    labels = root / "labels.jsonl"
    if not done(labels, a):
        sh(TETHER + ["rlaif", "label", "--policy", policy, "--prompts", prompts, "--judge", judge, "--samples", str(samples),
                     "--gold", "--seed", str(a.seed), "--out", str(labels), "--overwrite"] + principles, log)
    if not done(root / "rm" / "tether.json", a):
        sh(TETHER + ["rm", "--model", policy, "--data", str(labels), "--eval-fraction", "0.1", "--label-field", "label_prob",
                     "--steps", str(a.rm_steps), "--eval-every", "0", "--save-every", "0", "--seed", str(a.seed),
                     "--out", str(root / "rm"), "--overwrite"], log)
    if not done(root / "ppo" / "tether.json", a):
        sh(TETHER + ["ppo", "--model", policy, "--reward", str(root / "rm"), "--prompts", prompts,
                     "--eval-prompts", f"{a.world}/prompts_eval.jsonl", "--out", str(root / "ppo"),
                     "--steps", str(a.ppo_steps), "--rollout-batch", "64", "--eval-size", "64", "--eval-every", "10",
                     "--save-every", "0", "--lr", str(PPO_LR), "--beta", str(PPO_BETA), "--ptx-data", ptx,
                     "--ptx-coef", str(PPO_PTX_COEF), "--warmup-steps", "0", "--schedule", "constant",
                     "--seed", str(a.seed), "--overwrite"], log)
    return root, policy


def evaluate(a, folder: str, start: str | None) -> dict:
    """Gold reward on test prompts, refusal of harmful and benign probes, and the gold win-rate against ``start``."""
    import random

    from tether.instruments.gold import gold_eval
    from tether.instruments.winrate import policy_win_rate
    from tether.io import read_jsonl
    from tether.models import load_model, load_tokenizer
    from tether.rewards import GoldReward
    from tether.rollout import generate
    from tether.world import is_refusal

    model, tok = load_model(folder).eval(), load_tokenizer(folder)
    rows = read_jsonl(f"{a.world}/prompts_test.jsonl")
    out = gold_eval(model, tok, random.Random(a.seed).sample(rows, min(200, len(rows))), seed=a.seed)
    for probe in ("harmful", "benign"):
        prompts = [r["prompt"] for r in read_jsonl(f"{a.world}/probes_{probe}.jsonl") for _ in range(a.probe_samples)]
        responses = generate(model, tok, prompts, max_new_tokens=48, seed=a.seed)
        out[f"refusal/{probe}"] = sum(map(is_refusal, responses)) / len(responses)
    if start:
        wr = policy_win_rate(model, load_model(start).eval(), tok, [r["prompt"] for r in rows], GoldReward(),
                             samples=a.winrate_samples, seed=a.seed)
        out.update({"winrate/vs_start": wr.rate, "winrate/low": wr.interval[0], "winrate/high": wr.interval[1],
                    "winrate/wins": wr.wins, "winrate/ties": wr.ties, "winrate/losses": wr.losses})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--world", default="runs/demo/world")
    ap.add_argument("--pretrain", default="runs/demo/pretrain", help="the judge starts from this model")
    ap.add_argument("--sft", default="runs/demo/sft")
    ap.add_argument("--out", default="runs/rlaif")
    ap.add_argument("--judge", default="", help="a trained judge folder (empty: train one into OUT/judge)")
    ap.add_argument("--judge-steps", type=int, default=2000)
    ap.add_argument("--judge-pairs", type=int, default=8000)
    ap.add_argument("--samples", type=int, default=4, help="SFT samples a training prompt for labelling (pairs: half)")
    ap.add_argument("--rm-steps", type=int, default=400)
    ap.add_argument("--ppo-steps", type=int, default=50)
    ap.add_argument("--probe-samples", type=int, default=8)
    ap.add_argument("--winrate-samples", type=int, default=4)
    ap.add_argument("--branches", default="all,harmless", help=f"of {', '.join(BRANCHES)}")
    ap.add_argument("--comply", type=float, default=0.7,
                    help="share of the helpful-only policy's demonstrations for harmful requests that comply")
    ap.add_argument("--redteam-samples", type=int, default=16, help="samples a red-team prompt (harmless branch)")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--overwrite", action="store_true", help="rerun stages whose output exists")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    judge = a.judge
    if not judge:
        judge = str(out / "judge")
        if not done(out / "judge" / "judge_eval.json", a):
            sh(TETHER + ["rlaif", "train-judge", "--model", a.pretrain, "--out", judge, "--steps", str(a.judge_steps),
                         "--pairs", str(a.judge_pairs), "--seed", str(a.seed), "--overwrite"], out / "judge.log")
    names = [n.strip() for n in a.branches.split(",") if n.strip()]
    with ThreadPoolExecutor(a.jobs) as pool:
        roots = dict(zip(names, pool.map(lambda n: branch(a, n, judge), names)))

    summary = {"judge": json.loads((Path(judge) / "judge_eval.json").read_text()), "labels": {}, "rm": {}, "ppo": {},
               "policies": {}}
    policies = {"sft": (a.sft, None)}
    for name, (root, start) in roots.items():
        s = json.loads((root / "labels.summary.json").read_text())
        summary["labels"][name] = {k: s.get(k) for k in ("pairs", "left_out", "mean_label_prob", "flip_rate", "first_bias",
                                                         "gold_agreement", "gold_pairs", "principles_asked")}
        rm = json.loads((root / "rm" / "tether.json").read_text())["metrics"]
        summary["rm"][name] = {k: rm.get(k) for k in ("eval/rm/accuracy", "eval/rm/gold_accuracy")}
        ppo = json.loads((root / "ppo" / "tether.json").read_text())["metrics"]
        summary["ppo"][name] = {k: ppo.get(k) for k in ("eval/kl", "eval/reward", "eval/gold")}
        if start != a.sft:
            policies["helpful_only"] = (start, None)
        policies[f"ppo_{name}"] = (str(root / "ppo"), start)
    for name, (folder, start) in policies.items():
        summary["policies"][name] = evaluate(a, folder, start)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")

    j = summary["judge"]
    print(f"judge: held-out agreement with gold {j['judge/gold_agreement']:.3f} on {j['judge/gold_pairs']} pairs "
          f"(one order only {j['judge/gold_agreement_one_order']:.3f}); flip rate {j['judge/flip_rate']:.3f}, "
          f"lean to the first position {j['judge/first_bias']:+.3f}")
    for name, s in summary["labels"].items():
        print(f"labels [{name}]: {s['pairs']} pairs, agreement with gold {s['gold_agreement']:.3f} on {s['gold_pairs']}, "
              f"flip rate {s['flip_rate']:.3f}; RM held-out accuracy {summary['rm'][name]['eval/rm/accuracy']:.3f}")
    keys = ["gold/reward", "gold/reward_arithmetic", "gold/reward_knowledge", "gold/reward_open", "gold/reward_harmful",
            "gold/reward_benign", "gold/length_words", "refusal/harmful", "refusal/benign", "winrate/vs_start",
            "winrate/low", "winrate/high"]
    print(f"{'':<26}" + "".join(f"{n:>14}" for n in policies))
    for k in keys:
        print(f"{k:<26}" + "".join(f"{summary['policies'][n].get(k, float('nan')):>14.3f}" for n in policies))


if __name__ == "__main__":
    main()
