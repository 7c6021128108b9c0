"""Tiny runs of the stages, for tests/test_distributed.py: the same script at world size 1
(``python tests/distributed_runner.py ...``) and 2 (``torchrun --nproc_per_node 2 tests/distributed_runner.py ...``).

    distributed_runner.py MODEL DATA_DIR OUT_DIR STAGE [STAGE ...]

STAGE is one of RUNS below; each writes OUT_DIR/STAGE. Every global batch is the same at every
world size, so the loss curves must agree.
"""

from __future__ import annotations

import sys
from pathlib import Path


def digits(prompts, responses):
    """A dense reward a random tiny model can climb: the share of characters that are digits (tests/toy.py's,
    repeated: this file also runs as a script under torchrun, where the tests package is not importable)."""
    return [sum(c.isdigit() for c in r) / max(len(r), 1) for r in responses]


def _train(cfg, **kw):
    base = dict(steps=4, batch_size=4, grad_accum=1, lr=3e-3, warmup_steps=1, eval_every=2, save_every=2,
                keep_checkpoints=2, device="cpu")
    for k, v in {**base, **kw}.items():
        setattr(cfg.train, k, v)
    return cfg


def sft(model, data, out, strategy, resume=False, batch_size=4, grad_accum=1):
    """Through the command line, as a user runs it."""
    from tether.cli import main

    # grad_accum 1 at world size 2: every micro-batch of 4 is split, the loss divided by the step's global token count
    args = ["sft", "--model", model, "--data", data / "sft.jsonl", "--out", out, "--eval-fraction", 0.1, "--max-len", 64,
            "--steps", 4, "--batch-size", batch_size, "--grad-accum", grad_accum, "--lr", 3e-3, "--warmup-steps", 1, "--eval-every", 2,
            "--save-every", 2, "--keep-checkpoints", 2, "--device", "cpu", "--strategy", strategy]
    main([str(a) for a in args] + (["--resume"] if resume else []), standalone_mode=False)


def rm(model, data, out, strategy):
    from tether.trainers.reward import RMConfig, run_rm

    run_rm(_train(RMConfig(model=model, data=str(data / "prefs.jsonl"), out=str(out), eval_fraction=0.2, max_len=64,
                           norm_prompts=4, norm_max_new_tokens=8), lr=1e-3, strategy=strategy))


def dpo(model, data, out, strategy):
    from tether.trainers.dpo import DPOConfig, run_dpo

    # grad_accum 2 at world size 2: each rank takes one whole micro-batch of every step
    run_dpo(_train(DPOConfig(model=model, data=str(data / "prefs.jsonl"), out=str(out), eval_fraction=0.2, max_len=64,
                             kl_prompts=4, kl_max_new_tokens=8), batch_size=2, grad_accum=2, lr=1e-3, strategy=strategy))


def kto(model, data, out, strategy):
    from tether.trainers.kto import KTOConfig, run_kto

    # z0 is a statistic of a micro-batch: under torchrun each rank takes whole ones (grad_accum 2)
    run_kto(_train(KTOConfig(model=model, data=str(data / "prefs.jsonl"), out=str(out), eval_fraction=0.2, max_len=64,
                             kl_prompts=0), batch_size=4, grad_accum=2, lr=1e-3, strategy=strategy))


def grpo(model, data, out, strategy, stage="grpo", lora=0):
    from tether.trainers.grpo import GRPOConfig, run_grpo
    from tether.trainers.rloo import RLOOConfig, run_rloo

    # 8 rows an iteration, 2 optimiser steps of 4 (each on one rank's rows: the other runs a zero-weight pass)
    config, run = (GRPOConfig, run_grpo) if stage == "grpo" else (RLOOConfig, run_rloo)
    cfg = _train(config(model=model, prompts=str(data / "prompts.jsonl"), eval_prompts=str(data / "eval_prompts.jsonl"),
                        out=str(out), group_size=4, prompts_per_step=2, eval_samples=2),
                 steps=3, lr=1e-2, warmup_steps=0, schedule="constant", strategy=strategy)
    cfg.sampling.max_new_tokens, cfg.sampling.gen_batch_size = 8, 4
    cfg.lora.r = lora
    run(cfg, digits)


def ppo(model, data, out, strategy, resume=False, ptx=False):
    from tether.rollout import SamplingConfig
    from tether.trainers.ppo import PPOConfig, run_ppo

    # 4 prompts an iteration, 2 a rank (sampled in chunks of 2: the same seeds as one process), 2 epochs of 2
    # mini-batches of 2 rows: the global permutation puts a mini-batch on one rank or across both
    cfg = _train(PPOConfig(model=model, prompts=str(data / "prompts.jsonl"), eval_prompts=str(data / "eval_prompts.jsonl"),
                           out=str(out), rollout_batch=4, epochs=2, sampling=SamplingConfig(max_new_tokens=8, gen_batch_size=2),
                           kl_target=1.0, reward_norm="batch", resume=resume),
                 steps=3, batch_size=1, grad_accum=2, lr=1e-3, warmup_steps=0, schedule="constant", save_every=1,
                 strategy=strategy)
    if ptx:  # PPO-ptx: the 2 ptx micro-batches of every mini-batch are one global stream, one a rank
        cfg.ptx_data, cfg.ptx_coef, cfg.max_len = str(data / "sft.jsonl"), 0.5, 64
    run_ppo(cfg, digits)


def resumed(stage, run, other):
    """The world-size-2 run of ``stage`` (already written in OUT), cut back to its first checkpoint and
    resumed under the ``other`` strategy: a checkpoint moves between DDP and FSDP2."""
    import shutil

    from tether import distributed

    def go(model, data, out):
        if distributed.env().main:
            shutil.copytree(out.parent / stage, out)
            for path in sorted((out / "checkpoints").glob("step-*"))[1:]:
                shutil.rmtree(path)  # as if the run died after its first checkpoint
            (out / "model.safetensors").unlink()
        distributed.barrier()
        run(model, data, out, other, resume=True)
    return go


RUNS = {
    "sft_ddp": lambda *a: sft(*a, "ddp"),
    "sft_fsdp2": lambda *a: sft(*a, "fsdp2"),
    # the same global batch of 4 as 4 micro-batches of 1 row, 2 a rank: the gradient does not depend on the split
    "sft_split_ddp": lambda *a: sft(*a, "ddp", batch_size=1, grad_accum=4),
    "rm_ddp": lambda *a: rm(*a, "ddp"),
    "dpo_ddp": lambda *a: dpo(*a, "ddp"),
    "dpo_fsdp2": lambda *a: dpo(*a, "fsdp2"),
    "kto_ddp": lambda *a: kto(*a, "ddp"),
    "kto_fsdp2": lambda *a: kto(*a, "fsdp2"),
    "grpo_ddp": lambda *a: grpo(*a, "ddp"),
    "grpo_fsdp2": lambda *a: grpo(*a, "fsdp2"),
    "grpo_lora_ddp": lambda *a: grpo(*a, "ddp", lora=4),
    "grpo_lora_fsdp2": lambda *a: grpo(*a, "fsdp2", lora=4),
    "rloo_ddp": lambda *a: grpo(*a, "ddp", stage="rloo"),
    "rloo_fsdp2": lambda *a: grpo(*a, "fsdp2", stage="rloo"),
    "ppo_ddp": lambda *a: ppo(*a, "ddp"),
    "ppo_fsdp2": lambda *a: ppo(*a, "fsdp2"),
    "ppo_ptx_ddp": lambda *a: ppo(*a, "ddp", ptx=True),
    # (world size 2 only) checkpoints that change strategy on resume; compared with the uninterrupted runs
    "sft_ddp_to_fsdp2": resumed("sft_ddp", sft, "fsdp2"),
    "sft_fsdp2_to_ddp": resumed("sft_fsdp2", sft, "ddp"),
    "ppo_ddp_to_fsdp2": resumed("ppo_ddp", ppo, "fsdp2"),
    "ppo_fsdp2_to_ddp": resumed("ppo_fsdp2", ppo, "ddp"),
}

if __name__ == "__main__":
    model, data, out, *stages = sys.argv[1:]
    for stage in stages:
        RUNS[stage](model, Path(data), Path(out) / stage)
