"""Win-rate of one policy against another under a judge (the gold reward by default) on held-out prompts.

    python bench/gold_winrate.py --a runs/demo/dpo --b runs/demo/sft --prompts runs/demo/world/prompts_test.jsonl
    python bench/gold_winrate.py --a runs/dpo --b runs/sft --prompts test.jsonl --judge runs/rm --samples 4

Each prompt gets ``--samples`` responses from each policy (temperature 1, the same seeds for
both); sample k of a is judged against sample k of b (tether.instruments.winrate.policy_win_rate).
Prints one JSON object: the win-rate of a against b (ties count half), its 95% bootstrap
interval over prompts, wins / ties / losses, and each policy's mean judge score.
"""

from __future__ import annotations

import argparse
import json


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--a", required=True, help="policy folder whose win-rate is reported")
    ap.add_argument("--b", required=True, help="policy folder it is compared with (e.g. the SFT folder)")
    ap.add_argument("--prompts", required=True, help="prompt file (any format tether.data.load_prompts reads)")
    ap.add_argument("--judge", default="gold", help="reward spec for tether.rewards.load_reward (default: gold)")
    ap.add_argument("--samples", type=int, default=1, help="responses per prompt from each policy")
    ap.add_argument("--limit", type=int, default=0, help="use only the first N prompts (0: all)")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    from tether.data import load_prompts
    from tether.instruments.winrate import policy_win_rate
    from tether.models import load_model, load_tokenizer
    from tether.rewards import load_reward

    prompts = [r.prompt for r in load_prompts(args.prompts)]
    if args.limit:
        prompts = prompts[: args.limit]
    result = policy_win_rate(load_model(args.a), load_model(args.b), load_tokenizer(args.a), prompts,
                             load_reward(args.judge), samples=args.samples, max_new_tokens=args.max_new_tokens,
                             seed=args.seed, tokenizer_b=load_tokenizer(args.b))
    print(json.dumps({"a": args.a, "b": args.b, "judge": args.judge, "prompts": len(prompts), **result._asdict()}))


if __name__ == "__main__":
    main()
