"""Over-optimisation, measured on every saved checkpoint of a PPO run with many samples a point.

    python bench/overopt_checkpoints.py --run runs/ppo --base runs/sft --reward runs/rm \
        --prompts runs/demo/world/prompts_test.jsonl --samples 4

A PPO run's own evaluations sample each held-out prompt once, which leaves the gold curve's
rise and fall inside its noise on a small world. Here each checkpoint (``--save-every`` with
enough ``--keep-checkpoints``) and the base are sampled ``--samples`` times on every prompt, with
the same seeds for every checkpoint, so that the change in gold reward from the base is a
paired difference (its standard error is printed beside it). Per point: the proxy (the reward
model PPO was trained against), the gold reward, their changes from the base, the KL from the
base (k1 summed over a response, on these samples) and the response length. Writes
``RUN/overopt_checkpoints.json`` and ``.png`` (gold and proxy against √KL, as Gao et al. 2023
plot them) and prints the table.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch


def policy_state(checkpoint: Path) -> dict:
    """The policy's tensors from a PPO checkpoint (which holds the policy and its value function)."""
    from safetensors.torch import load_file

    state = load_file(str(checkpoint / "model.safetensors"))
    return {k.removeprefix("policy."): v for k, v in state.items() if k.startswith("policy.")}


@torch.no_grad()
def measure(policy, base, tok, prompts: list[str], reward_fn, a) -> dict[str, list[float]]:
    """Per sample: gold, proxy, k1 KL from the base and length, over ``a.samples`` seeded passes."""
    from tether.rollout import rollout
    from tether.scoring import response_logprobs
    from tether.world import gold_rewards

    out: dict[str, list[float]] = {"gold": [], "proxy": [], "kl": [], "length": []}
    for k in range(a.samples):
        batch = rollout(policy, tok, prompts, max_new_tokens=a.max_new_tokens, seed=a.seed + k, batch_size=64)
        out["gold"] += gold_rewards(batch.prompts, batch.responses)
        out["proxy"] += torch.as_tensor(reward_fn(batch.prompts, batch.responses), dtype=torch.float32).tolist()
        logp, base_logp = (response_logprobs(m, batch, batch_size=64) for m in (policy, base))  # 64 rows a forward
        out["kl"] += (logp - base_logp).sum(-1).tolist()  # k1 per response
        out["length"] += batch.mask.sum(-1).float().tolist()
    return out


def mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def paired_se(a: list[float], b: list[float]) -> float:
    d = [x - y for x, y in zip(a, b)]
    m = mean(d)
    return math.sqrt(sum((x - m) ** 2 for x in d) / (len(d) - 1) / len(d))


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    d = [math.sqrt(max(r["kl"], 0.0)) for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax.errorbar(d, [r["gold_gain"] for r in rows], yerr=[2 * r["gold_gain_se"] for r in rows], marker="o",
                label="gold − base (±2 s.e., paired)", capsize=3)
    ax.plot(d, [r["proxy_gain"] for r in rows], marker="s", label="proxy (RM) − base")
    for r, x in zip(rows, d):
        ax.annotate(str(r["step"]), (x, r["gold_gain"]), textcoords="offset points", xytext=(3, 5), fontsize=7)
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xlabel("√KL(π ‖ π_base)  (nats^½, per response)")
    ax.set_ylabel("reward change from the base")
    ax2 = ax.twinx()
    ax2.plot(d, [r["length"] for r in rows], color="tab:green", ls=":", marker=".", label="length (tokens)")
    ax2.set_ylabel("response length (tokens)", color="tab:green")
    lines = ax.get_legend_handles_labels()
    more = ax2.get_legend_handles_labels()
    ax.legend(lines[0] + more[0], lines[1] + more[1], fontsize=8, loc="lower left")
    ax.set_title("Over-optimisation: every checkpoint, paired samples")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="a PPO output folder with checkpoints/step-*")
    ap.add_argument("--base", required=True, help="the policy PPO started from and was tethered to (the SFT folder)")
    ap.add_argument("--reward", required=True, help="the proxy: the reward model the run was trained against")
    ap.add_argument("--prompts", required=True, help="held-out prompts of the gold world")
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=48, help="as the PPO run sampled (its max_new_tokens)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--limit", type=int, default=0, help="only the first N prompts (0: all; a quick look)")
    ap.add_argument("--every", type=int, default=1, help="only every k-th checkpoint")
    a = ap.parse_args()

    from tether.data import load_prompts
    from tether.models import load_model, load_tokenizer
    from tether.rewards import load_reward

    torch.manual_seed(0)
    prompts = [r.prompt for r in load_prompts(a.prompts)][: a.limit or None]
    base, tok = load_model(a.base).eval(), load_tokenizer(a.base)
    policy = load_model(a.base).eval()
    reward_fn = load_reward(a.reward)
    checkpoints = sorted((Path(a.run) / "checkpoints").glob("step-*"))[a.every - 1 :: a.every]
    if not checkpoints:
        raise SystemExit(f"{a.run}/checkpoints holds no step-* folder: run PPO with --save-every and --keep-checkpoints")
    start = measure(base, base, tok, prompts, reward_fn, a)
    rows = []
    for step, ck in [(0, None)] + [(int(c.name.split("-")[1]), c) for c in checkpoints]:
        if ck is None:
            m = start
        else:
            missing, unexpected = policy.load_state_dict(policy_state(ck), strict=False)
            tied = policy.get_input_embeddings().weight is policy.get_output_embeddings().weight
            if unexpected or any(not (tied and ("lm_head" in k or "embed_tokens" in k)) for k in missing):
                raise SystemExit(f"{ck}: the checkpoint does not fit {a.base} (missing {missing}, extra {unexpected})")
            m = measure(policy, base, tok, prompts, reward_fn, a)
        rows.append({"step": step, "gold": mean(m["gold"]), "proxy": mean(m["proxy"]), "kl": mean(m["kl"]),
                     "length": mean(m["length"]), "gold_gain": mean(m["gold"]) - mean(start["gold"]),
                     "gold_gain_se": paired_se(m["gold"], start["gold"]) if ck is not None else 0.0,
                     "proxy_gain": mean(m["proxy"]) - mean(start["proxy"])})
        r = rows[-1]
        print(f"step {step:4d}  KL {r['kl']:6.3f}  length {r['length']:5.1f}  proxy {r['proxy']:+.3f} "
              f"({r['proxy_gain']:+.3f})  gold {r['gold']:+.3f} ({r['gold_gain']:+.3f} ± {r['gold_gain_se']:.3f})",
              flush=True)
    out = Path(a.run) / "overopt_checkpoints.json"
    out.write_text(json.dumps({"config": vars(a), "points": rows, "samples_per_point": len(prompts) * a.samples},
                              indent=2))
    plot(rows, out.with_suffix(".png"))
    print(f"written: {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
