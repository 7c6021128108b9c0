"""Seconds per RL iteration, split by stage, samples/s and peak memory: PPO, GRPO and RLOO.

    python bench/rl_iteration.py                        # PPO, GRPO and RLOO, the tiny default and a ~25M-parameter Llama
    python bench/rl_iteration.py --algos grpo --models tiny-default
    python bench/rl_iteration.py --device cuda          # the same on a GPU (bf16 autocast)
    python bench/rl_iteration.py --models smollm2-135m --algos grpo --group-size 4 --prompts-per-step 1 \
        --batch-size 4 --max-new-tokens 32               # SmolLM2-135M's shape and tokenizer, new weights

One iteration = generate (prompts_per_step x group_size samples of max_new_tokens tokens with a KV
cache), score (the reward, log π_old and log π_ref of every sample; PPO adds the critic's values
and GAE) and update (GRPO/RLOO: inner_iters optimiser steps, micro-batches of batch_size rows; PPO:
--ppo-epochs passes over mini-batches of batch_size rows through policy and critic; the optimiser
steps of tether.loop.Run without its checkpoints and log: bench/_run.Steps). GRPO and RLOO run
the trainer's own stage (tether.trainers.grpo.CriticFree, tether.trainers.rloo.RLOO: rollout,
score, update and after_update, as tether.loop.rl calls them); PPO the trainer's functions
(tether.rollout.rollout, tether.trainers.ppo.score_rollout and ppo_update). Each stage is timed
after warm-up iterations that are not. PPO samples one response per prompt, prompts_per_step x group_size
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
from _run import Steps  # noqa: E402  bench/_run.py: an RL update's optimiser steps, without a run's checkpoints
from train_throughput import MODELS  # noqa: E402  the same model sizes as the training benchmark

PROMPTS = [f"\n\nHuman: What is {a} plus {b}?\n\nAssistant:" for a in range(20) for b in range(20)]


# a real model's architecture, vocabulary and tokenizer with freshly initialised weights: its FLOPs and memory are the
# real model's, and with near-uniform next-token probabilities over 49,152 tokens every response runs to the end
REAL_SHAPES = {"smollm2-135m": "smollm2"}


def build(name: str, device: str, max_positions: int):
    """A freshly initialised model of MODELS[name] and a tokenizer trained on the world's corpus.

    The tokenizer has at most 1024 tokens; the model keeps the vocabulary size of MODELS (ids the
    tokenizer lacks decode to nothing), so its parameter count matches bench/train_throughput.py.
    A name of REAL_SHAPES: that model's config (imported once from its GGUF file) and tokenizer, new weights.
    """
    from tether.models import TinyConfig, build_tiny, train_tokenizer
    from tether.world import WorldConfig, build_world

    if name in REAL_SHAPES:
        import tempfile

        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        from tether.models import load_tokenizer
        from tether.models.gguf import import_gguf

        folder = Path(tempfile.gettempdir()) / f"tether-rl-iteration-{name}"
        if not (folder / "config.json").exists():
            import_gguf(REAL_SHAPES[name], folder)
        tokenizer = load_tokenizer(folder)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder), dtype=torch.float32)
        model.config.pad_token_id = tokenizer.pad_token_id
        return model.to(device), tokenizer

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
    """GRPO or RLOO: the trainer's own stage (tether.trainers.grpo.CriticFree, tether.trainers.rloo.RLOO), its
    rollout, score and update (then after_update, as the RL loop calls it), on a format reward."""
    import copy
    import tempfile

    import torch

    from tether.generation import make_backend
    from tether.rewards import load_reward
    from tether.scoring import Reference
    from tether.trainers.grpo import CriticFree, GRPOConfig
    from tether.trainers.rl import Inputs
    from tether.trainers.rloo import RLOO, RLOOConfig

    rows = args.group_size * args.prompts_per_step
    cfg = (GRPOConfig if algo == "grpo" else RLOOConfig)(model="bench", prompts="bench", group_size=args.group_size,
                                                          prompts_per_step=args.prompts_per_step,
                                                          inner_iters=args.inner_iters)
    cfg.sampling.max_new_tokens, cfg.sampling.gen_batch_size = args.max_new_tokens, rows
    # one optimiser step on the whole batch a pass: micro-batches of batch_size rows, rows / batch_size of them
    cfg.train.batch_size, cfg.train.grad_accum, cfg.train.device = args.batch_size, rows // args.batch_size, args.device
    cfg.validate()
    device = torch.device(args.device)
    model, tokenizer = build(name, args.device, max_positions=args.max_new_tokens + 32)
    model.eval()  # as the trainer holds it (tether.trainers.rl.load_policy: no dropout in RL)
    reference = Reference.frozen(copy.deepcopy(model).eval().requires_grad_(False))
    reward = load_reward("format")
    inputs = Inputs(tokenizer, [], [], PROMPTS, [], reward, cfg)
    out = tempfile.TemporaryDirectory(prefix="rl_iteration-")  # the stage's output folder: nothing is written there
    stage = (CriticFree if algo == "grpo" else RLOO)(cfg, inputs, model, model, reference,
                                                     make_backend("tether", model, tokenizer), Path(out.name), device)
    stage.gold = False  # PROMPTS are gold-world questions, but the gold reward is a metric, not the iteration's work
    state = {"model": model, "stage": stage, "run": Steps(model, cfg.train), "out": out, "step": 0}

    def generate(st):
        st["batch"] = st["stage"].rollout(st["step"])

    def score(st):
        st["scored"], _, _ = st["stage"].score(st["batch"])

    def update(st):
        metrics = st["stage"].update(st["batch"], st["scored"], st["run"])
        st["stage"].after_update(metrics)
        st["step"] += 1

    return state, [("generate", generate), ("score", score), ("update", update)]


def setup_ppo(name: str, args) -> tuple[dict, list[tuple[str, Callable[[dict], None]]]]:
    """PPO: rollout, then the reward and score_rollout (π, π_ref, values, GAE), then ppo_update."""
    import copy

    import torch

    from tether.loop import autocast
    from tether.models.value import ActorCritic, ValueModel
    from tether.rewards import load_reward
    from tether.rollout import SamplingConfig, rollout
    from tether.scoring import Reference
    from tether.trainers.ppo import PPOConfig, ppo_update, score_rollout, sequence_scores

    n = args.group_size * args.prompts_per_step
    cfg = PPOConfig(model="bench", prompts="bench", rollout_batch=n, epochs=args.ppo_epochs,
                    sampling=SamplingConfig(max_new_tokens=args.max_new_tokens, gen_batch_size=n))
    cfg.train.batch_size, cfg.train.device = args.batch_size, args.device  # mini-batches of batch_size rows
    cfg.validate()
    device = torch.device(args.device)
    policy, tokenizer = build(name, args.device, max_positions=args.max_new_tokens + 32)
    reference = Reference.frozen(copy.deepcopy(policy).eval().requires_grad_(False))
    critic = ValueModel(copy.deepcopy(policy.model))  # the backbone under a zero value head, as from an RM folder
    ac = ActorCritic(policy, critic).to(args.device).eval()
    state = {"ac": ac, "tokenizer": tokenizer, "run": Steps(ac, cfg.train), "reward": load_reward("format"), "step": 0}

    def generate(st):
        k = st["step"] * n % len(PROMPTS)
        st["batch"] = rollout(policy, tokenizer, (PROMPTS * 2)[k : k + n], max_new_tokens=cfg.sampling.max_new_tokens,
                              seed=st["step"], batch_size=n).to(args.device)

    def score(st):
        b = st["batch"]
        raw = torch.as_tensor(st["reward"](b.prompts, b.responses), dtype=torch.float32).to(args.device)
        empty = torch.tensor([not r.strip() for r in b.responses], device=args.device)
        _, scores = sequence_scores(raw, empty, b.ended, cfg)
        with autocast(device, cfg.train.precision):  # as the trainer scores (tether.trainers.ppo.PPO.score)
            st["scored"], _ = score_rollout(ac, reference, b, scores, cfg, cfg.beta)

    def update(st):
        ppo_update(ac, st["run"], st["batch"], st["scored"], cfg, st["step"], None)
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
    seconds, cpu = {stage: 0.0 for stage, _ in stages}, 0.0
    rusage = {"user": 0.0, "system": 0.0, "faults": 0.0}  # CPU time split: the system part is mostly page faults
    for it in range(args.warmup + args.iters):
        for stage, fn in stages:
            tick, cpu_tick, use = time.perf_counter(), time.process_time(), resource.getrusage(resource.RUSAGE_SELF)
            fn(state)
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            if it >= args.warmup:
                seconds[stage] += time.perf_counter() - tick
                cpu += time.process_time() - cpu_tick
                now = resource.getrusage(resource.RUSAGE_SELF)
                rusage["user"] += now.ru_utime - use.ru_utime
                rusage["system"] += now.ru_stime - use.ru_stime
                rusage["faults"] += now.ru_minflt - use.ru_minflt
    if args.device.startswith("cuda"):
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
    per_iter = {k: v / args.iters for k, v in seconds.items()}
    total = sum(per_iter.values())
    return {"model": name, "algo": algo, "parameters": count_parameters(state.get("model") or state["ac"].policy),
            "device": args.device,
            "samples_per_iter": args.group_size * args.prompts_per_step, "max_new_tokens": args.max_new_tokens,
            "seconds": per_iter,
            "seconds_per_iter": total, "cpu_seconds_per_iter": cpu / args.iters,
            "user_cpu_seconds_per_iter": rusage["user"] / args.iters,
            "system_cpu_seconds_per_iter": rusage["system"] / args.iters,
            "minor_faults_per_iter": rusage["faults"] / args.iters,
            "samples_per_s": args.group_size * args.prompts_per_step / total,
            "peak_memory_mb": peak_mb, "threads": torch.get_num_threads()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--models", default=",".join(MODELS), help=f"any of {', '.join([*MODELS, *REAL_SHAPES])}")
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
    if (args.group_size * args.prompts_per_step) % args.batch_size:
        ap.error(f"--batch-size ({args.batch_size}) must divide --group-size x --prompts-per-step "
                 f"({args.group_size * args.prompts_per_step}): an optimiser step (GRPO/RLOO) or a mini-batch (PPO) is "
                 "whole micro-batches")
    if args.one:
        name, algo = args.one.split(":")
        print(json.dumps(run_one(name, algo, args)))
        return
    shared = ["--device", args.device, "--group-size", str(args.group_size), "--prompts-per-step",
              str(args.prompts_per_step), "--max-new-tokens", str(args.max_new_tokens), "--batch-size",
              str(args.batch_size), "--inner-iters", str(args.inner_iters), "--ppo-epochs", str(args.ppo_epochs),
              "--iters", str(args.iters),
              "--warmup", str(args.warmup)]
    print(f"{'algo':<6}{'model':<14}{'params':>12}{'device':>8}{'samples/s':>11}{'s/iter':>9}{'CPU-s/iter':>11}"
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
              f"{r['seconds_per_iter']:>9.2f}{r['cpu_seconds_per_iter']:>11.2f}{s['generate']:>10.2f}{s['score']:>8.2f}"
              f"{s['update']:>8.2f}"
              f"{r['peak_memory_mb']:>9,.0f}")


if __name__ == "__main__":
    main()
