r"""Best-of-N on the gold world: gold reward against N, and the measured KL beside log N − (N − 1)/N.

    OMP_NUM_THREADS=1 python bench/bon_gold_world.py --sft runs/demo/sft --rm runs/demo/rm \
        --prompts runs/demo/world/prompts_test.jsonl --pool 32

``--pool`` samples a prompt from the SFT policy (π_ref), scored by the reward model and by the gold
reward. Best-of-n is then exact on each prompt's empirical distribution (identical responses merged;
``tether.instruments.overopt.pool_curve``, what `tether eval`'s best-of-n curve uses): for n = 1, 2, 4, ...
≤ pool, KL(π_BoN ‖ π̂_ref), E[RM] and E[gold], averaged over prompts, once selecting by the RM and once by
gold, on the same pool.
The formula is an upper bound (Beirami et al. 2024, "Theoretical guarantees on the best-of-n alignment
policy"): it holds with equality only when no two responses tie.

Prints a table and writes ``OUT.json``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sft", default="runs/demo/sft")
    ap.add_argument("--rm", default="runs/demo/rm")
    ap.add_argument("--prompts", default="runs/demo/world/prompts_test.jsonl")
    ap.add_argument("--pool", type=int, default=32)
    ap.add_argument("--limit", type=int, default=0, help="first this many prompts (0: all)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="runs/bon_gold_world")
    a = ap.parse_args()

    import torch

    from tether.instruments.overopt import pool_curve
    from tether.models import load_model, load_tokenizer
    from tether.rewards import load_reward
    from tether.rollout import sample
    from tether.theory import bon_kl
    from tether.world import gold_rewards

    torch.set_num_threads(1)
    rows = [json.loads(line) for line in open(a.prompts, encoding="utf-8")]
    prompts = [r["prompt"] for r in rows][: a.limit or None]
    tokenizer, model = load_tokenizer(a.sft), load_model(a.sft).eval()
    repeated = [p for p in prompts for _ in range(a.pool)]  # one pool, scored once by each reward
    pairs = sample(model, tokenizer, repeated, max_new_tokens=48, seed=a.seed)
    texts = tokenizer.batch_decode([r for _, r in pairs], skip_special_tokens=True)
    responses = [tuple(r) for _, r in pairs]
    rm = torch.as_tensor(load_reward(a.rm)(repeated, texts), dtype=torch.float64).view(len(prompts), a.pool)
    gold = torch.as_tensor(gold_rewards(repeated, texts), dtype=torch.float64).view(len(prompts), a.pool)
    curves = {"rm": pool_curve(responses, rm, gold), "gold": pool_curve(responses, gold, gold)}
    print(f"best-of-n from {a.sft} on {len(prompts)} prompts, pool {a.pool} a prompt\n")
    print("| n | log n − (n−1)/n | KL measured (RM) | E[RM] | E[gold], by RM | KL measured (gold) | E[gold], by gold |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for by_rm, by_gold in zip(curves["rm"], curves["gold"]):
        n = by_rm["n"]
        print(f"| {n} | {bon_kl(n):.3f} | {by_rm['kl']:.3f} | {by_rm['proxy']:+.3f} | {by_rm['gold']:+.3f} | "
              f"{by_gold['kl']:.3f} | {by_gold['gold']:+.3f} |")
    out = Path(a.out).with_suffix(".json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"config": vars(a), "prompts": len(prompts), "curves": curves,
                               "bound": {p["n"]: bon_kl(p["n"]) for p in curves["rm"]}}, indent=2))


if __name__ == "__main__":
    main()
