"""Pretraining and SFT as a user runs them: through the command line, into an output folder."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from tether.cli import main
from tether.data.collate import encode_sft, pack, pad
from tether.losses.lm import IGNORE_INDEX
from tether.models import load_tokenizer

from tests.conftest import CORPUS

TINY = ["--hidden-size", "32", "--layers", "2", "--heads", "2", "--intermediate-size", "64", "--vocab-size", "300"]


def invoke(*args):
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    return result


@pytest.fixture
def corpus_file(tmp_path):
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in CORPUS))
    return path


def test_pretrain_writes_a_complete_artifact_and_learns(tmp_path, corpus_file):
    out = tmp_path / "pre"
    r = invoke("pretrain", "--data", corpus_file, "--out", out, "--steps", 80, "--batch-size", 8, "--max-len", 64, "--warmup-steps", 5,
               "--eval-every", 0, "--save-every", 20, *TINY)
    assert r.exit_code == 0, r.output
    for name in ("model.safetensors", "config.json", "tokenizer.json", "tether.json", "config.yaml", "metrics.jsonl"):
        assert (out / name).exists(), name
    meta = json.loads((out / "tether.json").read_text())
    assert meta["stage"] == "pretrain" and meta["config"]["train"]["steps"] == 80
    assert len(meta["data"]["train"]["fingerprint"]) >= 16 and meta["versions"]["torch"]
    # 80 steps on a tiny regular corpus already beat the context-free unigram model
    assert meta["metrics"]["eval/loss"] < meta["metrics"]["data/unigram_entropy"]
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 80
    AutoModelForCausalLM.from_pretrained(out)  # plain transformers loads it


def test_pretraining_rows_keep_every_token_of_a_long_document(tiny_folder):
    from tether.data import load_sft
    from tether.trainers.pretrain import corpus_rows

    tokenizer = load_tokenizer(tiny_folder)
    long_doc = " ".join(CORPUS[:40])  # far longer than one row of 64 tokens
    records = load_sft([{"text": long_doc}, {"text": CORPUS[41]}])
    rows = corpus_rows(records, tokenizer, 64)
    expected = tokenizer(long_doc)["input_ids"] + [tokenizer.eos_token_id] + \
        tokenizer(CORPUS[41])["input_ids"] + [tokenizer.eos_token_id]
    assert len(expected) > 5 * 64 and all(len(r.input_ids) == 64 for r in rows[:-1])
    assert [t for r in rows for t in r.input_ids] == expected  # nothing cut away, in order
    assert all(r.labels == r.input_ids for r in rows)  # every token is trained on


def test_sft_masks_the_prompt_and_lowers_held_out_loss(tmp_path, tiny_folder, sft_file):
    out = tmp_path / "sft"
    r = invoke("sft", "--model", tiny_folder, "--data", sft_file, "--out", out, "--steps", 30, "--batch-size", 8,
               "--lr", 3e-3, "--eval-every", 10, "--save-every", 0, "--eval-fraction", 0.1)
    assert r.exit_code == 0, r.output
    lines = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [l["eval/loss"] for l in lines if "eval/loss" in l]
    assert len(evals) == 3 and evals[-1] < evals[0]
    meta = json.loads((out / "tether.json").read_text())
    assert meta["stage"] == "sft" and meta["data"]["eval"]["records"] == len(CORPUS) // 10


def test_encode_labels_only_the_completion_and_eos(tiny_folder):
    tok = load_tokenizer(tiny_folder)
    rec = type("R", (), {"prompt": "\n\nHuman: What is 2 plus 2?\n\nAssistant:", "completion": " 4. #### 4", "where": "x:1"})
    [ex], count = encode_sft([rec], tok, max_len=64)
    n_prompt = len(tok(rec.prompt).input_ids)
    assert ex.labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert ex.labels[n_prompt:] == ex.input_ids[n_prompt:] and ex.input_ids[-1] == tok.eos_token_id
    assert tok.decode(ex.input_ids[n_prompt:-1]) == rec.completion
    # over-long examples: truncated, dropped or an error, and always counted
    [cut], count = encode_sft([rec], tok, max_len=n_prompt + 2, overflow="truncate")
    assert len(cut.input_ids) == n_prompt + 2 and count.truncated == 1
    assert encode_sft([rec], tok, max_len=n_prompt + 2, overflow="drop")[1].dropped == 1
    with pytest.raises(ValueError, match="x:1: .* longer than max_len"):
        encode_sft([rec], tok, max_len=n_prompt + 2, overflow="error")
    batch = pad([ex, cut], tok.pad_token_id)
    assert batch["input_ids"].shape == (2, len(ex.input_ids)) and batch["attention_mask"][1].sum() == n_prompt + 2
    packed = pack([ex] * 10, max_len=32)
    assert all(len(r.input_ids) == 32 for r in packed[:-1])
    assert sum(l != IGNORE_INDEX for r in packed for l in r.labels) == 10 * (len(ex.input_ids) - n_prompt)


def test_bad_data_fails_before_anything_is_written(tmp_path, tiny_folder):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a", "completion": 3}\n')
    out = tmp_path / "never"
    r = CliRunner().invoke(main, ["sft", "--model", str(tiny_folder), "--data", str(bad), "--out", str(out)])
    assert r.exit_code == 1 and "bad.jsonl:2" in r.output and "completion" in r.output
    assert not out.exists()


def test_an_existing_run_is_not_overwritten_without_asking(tmp_path, tiny_folder, sft_file):
    out = tmp_path / "sft"
    args = ["sft", "--model", tiny_folder, "--data", sft_file, "--out", out, "--steps", 2, "--save-every", 0]
    assert invoke(*args).exit_code == 0
    r = CliRunner().invoke(main, [str(a) for a in args])
    assert r.exit_code == 1 and "--resume" in r.output
    assert invoke(*args, "--overwrite").exit_code == 0


@pytest.mark.slow
def test_killed_process_resumes_to_the_same_weights_bitwise(tmp_path, corpus_file):
    """SIGKILL a real `tether pretrain` after a checkpoint, resume it, compare with an uninterrupted run."""
    common = ["--data", corpus_file, "--steps", 150, "--batch-size", 4, "--max-len", 48, "--eval-every", 50,
              "--save-every", 1, "--keep-checkpoints", 2, *TINY]
    cmd = [sys.executable, "-m", "tether.cli"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([*cmd, "pretrain", "--out", tmp_path / "whole", *map(str, common)], check=True, env=env,
                   capture_output=True)

    victim = subprocess.Popen([*cmd, "pretrain", "--out", tmp_path / "killed", *map(str, common)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpts = tmp_path / "killed" / "checkpoints"
    deadline = time.time() + 120
    while time.time() < deadline and not (ckpts.exists() and any(p.name >= "step-000005" for p in ckpts.glob("step-*"))):
        time.sleep(0.01)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert not (tmp_path / "killed" / "tether.json").exists(), "the run finished before it could be killed"
    subprocess.run([*cmd, "pretrain", "--out", tmp_path / "killed", "--resume", *map(str, common)], check=True,
                   env=env, capture_output=True)

    whole = load_file(tmp_path / "whole" / "model.safetensors")
    resumed = load_file(tmp_path / "killed" / "model.safetensors")
    assert whole.keys() == resumed.keys()
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)
