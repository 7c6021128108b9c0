"""`tether eval`, `tether bon` and `tether rlaif label` at world size 2 (torchrun, gloo, 2 CPU processes) against
world size 1.

One torchrun job runs the three commands (tests/distributed_eval_runner.py) while the world-size-1 runs happen in
this process. Each rank samples and scores a block of whole chunks of every batch, seeded from the chunks' global
positions (tether.instruments.shard), so the text must be the same and the figures equal to a relative 1e-5;
rank 0 alone writes (and speaks). The fast tests below check the blocks and the seeding in one process.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tether.instruments.shard import block, map_blocks

from tests import distributed_eval_runner
from tests.conftest import eval_world

RTOL = 1e-5


@pytest.fixture(scope="module")
def eval_root(tmp_path_factory) -> Path:
    """A small exported world, a tokenizer trained on it, two tiny models (base, policy) and a reward model."""
    root = tmp_path_factory.mktemp("distevalworld")
    eval_world(root, pretrain_docs=200, sft_train=20, sft_eval=10, pref_train=20, pref_test=40, feedback=10)
    return root


@pytest.fixture(scope="module")
def runs(eval_root, tmp_path_factory):
    """(world-size-1 folder, world-size-2 folder, torchrun's output), every command run in both."""
    out = tmp_path_factory.mktemp("disteval")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(Path(distributed_eval_runner.__file__)), str(eval_root), str(out / "w2"), *distributed_eval_runner.RUNS]
    job = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        # meanwhile, world size 1 here, with the arithmetic of the ranks, which run the model whole: one process
        # would run a shared prompt once (scoring.shared_prefix_hidden), scores equal to 1e-7 but not bit for bit,
        # and the over-optimisation fit's peak KL amplifies that past RTOL
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("TETHER_SHARED_PREFIX", "0")
            for name, run in distributed_eval_runner.RUNS.items():
                run(eval_root, out / "w1" / name)
        output, _ = job.communicate(timeout=600)
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode == 0, output[-5000:]
    return out / "w1", out / "w2", output


def assert_same(a, b, path: str = "") -> None:
    """Equal structures: text and integers exactly, floats to a relative 1e-5 (NaN equals NaN)."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), path
        for k in a:
            assert_same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}[{i}]")
    elif isinstance(a, float) and not isinstance(b, bool):
        assert isinstance(b, (int, float)), path
        assert (math.isnan(a) and math.isnan(b)) or b == pytest.approx(a, rel=RTOL, abs=1e-7), (path, a, b)
    else:
        assert a == b, (path, a, b)


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.slow
def test_eval_report_at_world_size_2_is_the_one_process_report(runs):
    w1, w2, output = runs
    r1, r2 = (json.loads((w / "eval" / "report.json").read_text()) for w in (w1, w2))
    for key in ("config", "seconds"):  # the output folder and the time differ
        r1.pop(key), r2.pop(key)
    assert_same(r1, r2)
    assert len(r1["sections"]["kl"]["per_response"]["exact"]) == 40  # both ranks' samples, once each
    assert len(r1["sections"]["hacking"]["ascent"]) == 2 and "overoptimisation_bon" in r1["sections"]
    assert sorted(p.name for p in (w2 / "eval").iterdir()) == ["report.html", "report.json"]
    assert output.count("report: ") == 1  # rank 0 speaks


@pytest.mark.slow
def test_bon_at_world_size_2_chooses_the_one_process_responses(runs):
    w1, w2, _ = runs
    rows1, rows2 = _jsonl(w1 / "bon" / "responses.jsonl"), _jsonl(w2 / "bon" / "responses.jsonl")
    assert len(rows1) == 6
    assert_same(rows1, rows2)
    m1, m2 = (json.loads((w / "bon" / "tether.json").read_text()) for w in (w1, w2))
    assert_same(m1["metrics"], m2["metrics"])
    assert_same(m1["curve"], m2["curve"])


@pytest.mark.slow
def test_rlaif_label_at_world_size_2_writes_the_one_process_rows(runs):
    w1, w2, output = runs
    rows1, rows2 = (_jsonl(w / "label" / "labels.jsonl") for w in (w1, w2))
    assert len(rows1) >= 6  # most of the 12 pairs differ
    assert_same(rows1, rows2)
    s1, s2 = (json.loads((w / "label" / "labels.summary.json").read_text()) for w in (w1, w2))
    for s in (s1, s2):
        s.pop("file"), s["config"].pop("out")
    assert_same(s1, s2)
    assert output.count("preferences in") == 1


# --- fast, in one process ---------------------------------------------------------------------


@pytest.mark.parametrize("n,chunk,world", [(40, 16, 2), (48, 16, 2), (5, 8, 2), (0, 4, 3), (100, 7, 4), (9, 1, 4)])
def test_blocks_are_whole_chunks_that_cover_every_row_once(n, chunk, world):
    bounds = [block(n, chunk, r, world) for r in range(world)]
    assert bounds[0][0] == 0 and bounds[-1][1] == n
    for (lo, hi), (lo2, _) in zip(bounds, bounds[1:]):
        assert hi == lo2 and lo <= hi
    assert all(lo % chunk == 0 or lo == n for lo, _ in bounds)  # a block starts where a chunk starts


def test_blocks_of_40_rows_in_chunks_of_16_over_2_ranks():
    assert [block(40, 16, r, 2) for r in range(2)] == [(0, 32), (32, 40)]
    assert [block(5, 8, r, 2) for r in range(2)] == [(0, 5), (5, 5)]  # one chunk: rank 1 has none


def test_map_blocks_in_one_process_is_one_call_at_position_0():
    calls = []
    assert map_blocks(lambda part, lo: calls.append((part, lo)) or [x * 2 for x in part], [1, 2, 3], 2) == [2, 4, 6]
    assert calls == [([1, 2, 3], 0)]
    with pytest.raises(RuntimeError, match="2 results for 3 items"):
        map_blocks(lambda part, lo: part[:2], [1, 2, 3])


def test_samples_of_two_blocks_of_whole_chunks_are_the_samples_of_one_call(tiny_folder):
    """What makes world size 2 equal one process: a block that starts at a chunk boundary, sampled with its global
    position as index_offset, draws what one call over every prompt draws there."""
    from tether.models import load_model, load_tokenizer
    from tether.rollout import sample

    model, tok = load_model(tiny_folder).eval(), load_tokenizer(tiny_folder)
    prompts = [f"\n\nHuman: What is {i} plus {i % 3}?\n\nAssistant:" for i in range(10)]
    kw = dict(max_new_tokens=6, batch_size=4, seed=7)
    whole = sample(model, tok, prompts, index_offset=0, **kw)
    parts = []
    for rank in range(2):
        lo, hi = block(len(prompts), 4, rank, 2)
        parts += sample(model, tok, prompts[lo:hi], index_offset=lo, **kw)
    assert parts == whole
    assert [block(10, 4, r, 2) for r in range(2)] == [(0, 8), (8, 10)]
