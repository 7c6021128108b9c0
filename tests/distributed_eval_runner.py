"""`tether eval`, `tether bon` and `tether rlaif label` through the command line, for tests/test_distributed_eval.py:
the same script at world size 1 (``python tests/distributed_eval_runner.py ...``, or :data:`RUNS` in-process) and
2 (``python -m torch.distributed.run --standalone --nproc_per_node 2 tests/distributed_eval_runner.py ...``).

    distributed_eval_runner.py ROOT OUT_DIR COMMAND [COMMAND ...]

ROOT holds world/ (an exported gold world), base/, policy/ (tiny causal LMs of one tokenizer) and rm/ (a reward
model). COMMAND is one of RUNS below; each writes OUT_DIR/COMMAND. The sizes are chosen so that every rank gets
work at world size 2, in blocks of whole chunks of each batch (tether.instruments.shard): the results must be
those of one process.
"""

from __future__ import annotations

import sys
from pathlib import Path


def _cli(args: list) -> None:
    from tether.cli import main

    main([str(a) for a in args], standalone_mode=False)


def eval_(root: Path, out: Path) -> None:
    # 40 held-out prompts: KL chunks of 16 (rank 0: 32 rows, rank 1: 8), base samples and judge batches of 32
    # (32 | 8), RM accuracy on 40 pairs, hacking probes on 40 contexts, best-of-4 on 10 prompts (40 rows: 32 | 8),
    # two gradient-ascent prompts (one a rank)
    _cli(["eval", "--policy", root / "policy", "--base", root / "base", "--world", root / "world", "--rm", root / "rm",
          "--judge", f"llm:{root / 'base'}", "--refusal-judge", f"llm:{root / 'base'}", "--prompts", 40,
          "--probe-limit", 4, "--max-new-tokens", 8, "--bon-pool", 4, "--bon-prompts", 10, "--ascent-prompts", 2,
          "--ascent-steps", 3, "--seed", 3, "--device", "cpu", "--out", out])


def bon(root: Path, out: Path) -> None:
    # 6 prompts x a pool of 8 = 48 rows in generation batches of 16: rank 0 samples and scores 32, rank 1 16
    _cli(["bon", "--model", root / "policy", "--prompts", root / "world" / "prompts_test.jsonl", "--reward", root / "rm",
          "--n", 4, "--pool", 8, "--limit", 6, "--max-new-tokens", 8, "--gen-batch-size", 16, "--seed", 5,
          "--device", "cpu", "--out", out])


def label(root: Path, out: Path) -> None:
    # 12 prompts x 2 samples = 24 rows in generation batches of 8 (16 | 8); up to 12 pairs judged in batches of 4
    _cli(["rlaif", "label", "--policy", root / "policy", "--prompts", root / "world" / "prompts_test.jsonl",
          "--judge", root / "base", "--samples", 2, "--limit", 12, "--max-new-tokens", 8, "--gen-batch-size", 8,
          "--batch-size", 4, "--gold", "--seed", 1, "--out", out / "labels.jsonl"])


RUNS = {"eval": eval_, "bon": bon, "label": label}

if __name__ == "__main__":
    root, out, *commands = sys.argv[1:]
    for command in commands:
        RUNS[command](Path(root), Path(out) / command)
