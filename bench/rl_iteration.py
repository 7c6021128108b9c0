"""Seconds per RL iteration, split by stage, samples/s and peak memory: PPO, GRPO and RLOO.

    python bench/rl_iteration.py                        # PPO, GRPO and RLOO, the tiny default and a ~25M-parameter Llama
    python bench/rl_iteration.py --algos grpo --models tiny-default
    python bench/rl_iteration.py --device cuda          # the same on a GPU (bf16 autocast)

One iteration = generate (prompts_per_step x group_size samples of max_new_tokens tokens with a KV
cache), score (the reward, log π_old and log π_ref of every sample; PPO adds the critic's values
and GAE) and update (GRPO/RLOO: inner_iters optimiser steps, micro-batches of batch_size rows; PPO:
--ppo-epochs passes over mini-batches of batch_size rows through policy and critic). Each stage
is the trainer's own function (tether.trainers.grpo, tether.trainers.ppo), timed after warm-up
iterations that are not. PPO samples one response per prompt, prompts_per_step x group_size
prompts, so every algorithm scores the same number of samples. Models are freshly
initialised (the sizes of bench/train_throughput.py's MODELS) so they rarely emit EOS: every
response runs the full max_new_tokens, the worst case. A reference model is loaded (β > 0), as in a
default run. Each (model, algorithm) runs in a fresh process, so its peak memory is its own: peak
resident set size on CPU, peak allocated CUDA memory on a GPU.

Adding an algorithm: write a ``setup_<algo>`` that returns the state and a list of (stage name,
function of the state) in ALGOS; the timing loop and the table are shared.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_throughput import MODELS  # noqa: E402  the same model sizes as the training benchmark

PROMPTS = [f"\n\nHuman: What is {a} plus {b}?\n\nAssistant:" for a in range(20) for b in range(20)]


def build(name: str, device: str, max_positions: int):
    """A freshly initialised model of MODELS[name] and a tokenizer trained on the world's corpus.

    The tokenizer has at most 1024 tokens; the model keeps the vocabulary size of MODELS (ids the
    tokenizer lacks decode to nothing), so its parameter count matches bench/train_throughput.py.
    """
    from tether.models import TinyConfig, build_tiny, train_tokenizer
    from tether.world import WorldConfig, build_world

    vocab, hidden, layers, heads, inter = MODELS[name]
    world = build_world(WorldConfig(pretrain_docs=800, sft_train=10, sft_eval=1, pref_train=1, pref_test=1, feedback=1))
    tokenizer = train_tokenizer(world.pretrain, vocab_size=min(vocab, 1024))

    class _Vocab:  # build_tiny takes the vocabulary size and special ids from a tokenizer
        eos_token_id, pad_token_id = tokenizer.eos_token_id, tokenizer.pad_token_id

        def __len__(self):
            return vocab

    model = build_tiny(_Vocab(), TinyConfig(vocab, hidden, layers, heads, inter, max_positions=max_positions))
    return model.to(device), tokenizer


def setup_critic_free(algo: str, name: str, args) -> tuple[dict, list[tuple[str, Callable[[dict], None]]]]:
    """GRPO or RLOO: the trainer's generate_batch, score_batch and update, on a format reward."""
    import copy

    from tether.loop import build_optimizer
    from tether.rewards import load_reward
    from tether.trainers.grpo import GRPOConfig, RLOOConfig, batch_logprobs, generate_batch, score_batch, update

    cfg = (GRPOConfig if algo == "grpo" else RLOOConfig)(model="bench", prompts="bench")
    s = cfg.sampling
    s.group_size, s.prompts_per_step, s.max_new_tokens = args.group_size, args.prompts_per_step, args.max_new_tokens
    s.gen_batch_size = args.group_size * args.prompts_per_step
    cfg.train.batch_size, cfg.train.device, cfg.inner_iters = args.batch_size, args.device, args.inner_iters
    cfg.validate()
    model, tokenizer = build(name, args.device, max_positions=args.max_new_tokens + 32)
    ref = copy.deepcopy(model).eval().requires_grad_(False)
    state = {"model": model.train(), "tokenizer": tokenizer, "optimizer": build_optimizer(model, cfg.train),
             "reward": load_reward("format"), "cfg": cfg, "step": 0,
             "reference": lambda batch: batch_logprobs(ref, batch, cfg)}

    def generate(st):
        k = st["step"] * s.prompts_per_step % len(PROMPTS)
        st["batch"] = generate_batch(st["model"], st["tokenizer"], PROMPTS[k : k + s.prompts_per_step], st["step"], cfg)

    def score(st):
        st["scored"] = score_batch(st["model"], st["reference"], st["reward"], st["batch"], cfg)

    def step(st):
        update(st["model"], st["optimizer"], st["batch"], st["scored"], cfg)
        st["step"] += 1

    return state, [("generate", generate), ("score", score), ("update", step)]


def setup_ppo(name: str, args) -> tuple[dict, list[tuple[str, Callable[[dict], None]]]]:
    """PPO: rollout, then the reward and score_rollout (π, π_ref, values, GAE), then ppo_update."""
    import copy

    import torch

    from tether.loop import build_optimizer
    from tether.models.value import ActorCritic, ValueModel
    from tether.rewards import load_reward
    from tether.rollout import policy_logprobs, rollout
    from tether.trainers.ppo import PPOConfig, ppo_update, score_rollout, sequence_scores

    n = args.group_size * args.prompts_per_step
    cfg = PPOConfig(model="bench", prompts="bench", rollout_batch=n, epochs=args.ppo_epochs,
                    max_new_tokens=args.max_new_tokens)
    cfg.train.batch_size, cfg.train.device = args.batch_size, args.device
    cfg.validate()
    policy, tokenizer = build(name, args.device, max_positions=args.max_new_tokens + 32)
    reference = copy.deepcopy(policy).eval().requires_grad_(False)
    critic = ValueModel(copy.deepcopy(policy.model))  # the backbone under a zero value head, as from an RM folder
    ac = ActorCritic(policy, critic).to(args.device).eval()
    state = {"ac": ac, "tokenizer": tokenizer, "optimizer": build_optimizer(ac, cfg.train),
             "reward": load_reward("format"), "step": 0}

    def generate(st):
        k = st["step"] * n % len(PROMPTS)
        st["batch"] = rollout(policy, tokenizer, (PROMPTS * 2)[k : k + n], max_new_tokens=cfg.max_new_tokens,
                              seed=st["step"], batch_size=n).to(args.device)

    def score(st):
        b = st["batch"]
        raw = torch.as_tensor(st["reward"](b.prompts, b.responses), dtype=torch.float32).to(args.device)
        empty = torch.tensor([not r.strip() for r in b.responses], device=args.device)
        _, scores = sequence_scores(raw, empty, b.ended, cfg)
        st["scored"], _ = score_rollout(ac, lambda x: policy_logprobs(reference, x), b, scores, cfg, cfg.beta)

    def update(st):
        ppo_update(ac, st["optimizer"], st["batch"], st["scored"], cfg, st["step"], None)
        st["step"] += 1

    return state, [("generate", generate), ("score", score), ("update", update)]


ALGOS = {"ppo": setup_ppo,
         "grpo": lambda name, args: setup_critic_free("grpo", name, args),
         "rloo": lambda name, args: setup_critic_free("rloo", name, args)}


def run_one(name: str, algo: str, args) -> dict:
    import torch

    from tether.models import count_parameters

    state, stages = ALGOS[algo](name, args)
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    seconds = {stage: 0.0 for stage, _ in stages}
    for it in range(args.warmup + args.iters):
        for stage, fn in stages:
            tick = time.perf_counter()
            fn(state)
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            if it >= args.warmup:
                seconds[stage] += time.perf_counter() - tick
    if args.device.startswith("cuda"):
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
    per_iter = {k: v / args.iters for k, v in seconds.items()}
    total = sum(per_iter.values())
    return {"model": name, "algo": algo, "parameters": count_parameters(state.get("model") or state["ac"].policy),
            "device": args.device,
            "samples_per_iter": args.group_size * args.prompts_per_step, "seconds": per_iter,
            "seconds_per_iter": total, "samples_per_s": args.group_size * args.prompts_per_step / total,
            "peak_memory_mb": peak_mb, "threads": torch.get_num_threads()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--algos", default="ppo,grpo,rloo", help=f"any of {', '.join(ALGOS)}")
    ap.add_argument("--group-size", type=int, default=8)
    ap.add_argument("--prompts-per-step", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=16, help="rows per micro-batch of the update")
    ap.add_argument("--inner-iters", type=int, default=1)
    ap.add_argument("--ppo-epochs", type=int, default=4, help="PPO: passes over each rollout batch")
    ap.add_argument("--iters", type=int, default=3, help="timed iterations")
    ap.add_argument("--warmup", type=int, default=1, help="iterations before timing starts")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        name, algo = args.one.split(":")
        print(json.dumps(run_one(name, algo, args)))
        return
    shared = ["--device", args.device, "--group-size", str(args.group_size), "--prompts-per-step",
              str(args.prompts_per_step), "--max-new-tokens", str(args.max_new_tokens), "--batch-size",
              str(args.batch_size), "--inner-iters", str(args.inner_iters), "--ppo-epochs", str(args.ppo_epochs),
              "--iters", str(args.iters),
              "--warmup", str(args.warmup)]
    print(f"{'algo':<6}{'model':<14}{'params':>12}{'device':>8}{'samples/s':>11}{'s/iter':>9}"
          f"{'generate':>10}{'score':>8}{'update':>8}{'peak MB':>9}")
    for algo, name in ((a, m) for a in args.algos.split(",") for m in args.models.split(",")):
        if algo not in ALGOS:
            sys.exit(f"unknown algorithm {algo!r}; choose from {', '.join(ALGOS)}")
        cmd = [sys.executable, __file__, "--one", f"{name}:{algo}", *shared]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"{algo} {name} failed:\n{proc.stderr[-3000:]}")
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        s = r["seconds"]
        print(f"{algo:<6}{r['model']:<14}{r['parameters']:>12,}{r['device']:>8}{r['samples_per_s']:>11.1f}"
              f"{r['seconds_per_iter']:>9.2f}{s['generate']:>10.2f}{s['score']:>8.2f}{s['update']:>8.2f}"
              f"{r['peak_memory_mb']:>9,.0f}")


if __name__ == "__main__":
    main()
