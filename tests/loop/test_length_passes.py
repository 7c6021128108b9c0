"""Micro-batches run as passes of like-length rows: the cut that computes the fewest tokens, and the same update."""

from __future__ import annotations

import itertools
import random

import pytest

from tether.loop import length_passes


def _cost(lengths, passes, cost):
    return sum(cost + len(p) * max(lengths[i] for i in p) for p in passes)


def _cheapest(lengths, cost):
    """Every cut of the rows sorted by length into runs, by brute force."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    best = None
    for k in range(len(order)):
        for cuts in itertools.combinations(range(1, len(order)), k):
            bounds = (0, *cuts, len(order))
            c = _cost(lengths, [order[a:b] for a, b in zip(bounds, bounds[1:])], cost)
            best = c if best is None else min(best, c)
    return best


@pytest.mark.parametrize("seed", range(20))
def test_the_cut_is_the_cheapest_and_keeps_every_row_once(seed):
    rng = random.Random(seed)
    lengths = [rng.choice([rng.randint(5, 20), rng.randint(40, 90)]) for _ in range(rng.randint(1, 9))]
    cost = rng.choice([0, 8, 64, 128, 1000])
    passes = length_passes(lengths, cost)
    assert sorted(i for p in passes for i in p) == list(range(len(lengths)))
    if cost == 0:
        assert passes == [list(range(len(lengths)))]
    else:
        assert _cost(lengths, passes, cost) == _cheapest(lengths, cost)


def test_rows_of_one_length_stay_one_pass_in_their_order():
    assert length_passes([30] * 16, 1) == [list(range(16))]
    assert length_passes([40, 10, 12, 90], 10_000) == [[0, 1, 2, 3]]  # a pass costs more than all the padding


def test_short_and_long_rows_are_cut_apart():
    lengths = [90, 12, 11, 88, 10, 13, 91, 12]
    assert sorted(map(sorted, length_passes(lengths, 128))) == [[0, 3, 6], [1, 2, 4, 5, 7]]


def test_sft_in_passes_of_like_length_rows_trains_the_same_weights(tiny_folder, tmp_path, monkeypatch):
    """The supervised loop with each micro-batch cut into passes (pass_cost 1) and whole (0): the same weights, and
    the cut ran more, narrower passes."""
    import json

    import torch
    from safetensors.torch import load_file

    import tether.loop.supervised as supervised
    from tether.loop import TrainConfig
    from tether.trainers.sft import SFTConfig, run_sft

    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"\n\nHuman: Count to {n}.\n\nAssistant:",
                                        "completion": " " + " ".join(map(str, range(1, n + 1))) + "."}) + "\n"
                            for n in (1, 2, 3, 12, 14, 1, 2, 16) * 2))
    passes = {}
    real = supervised.accumulate

    def spy(module, batches, *args, **kwargs):
        passes[cost].append([tuple(b["input_ids"].shape) for b in batches])
        return real(module, batches, *args, **kwargs)

    monkeypatch.setattr(supervised, "accumulate", spy)
    weights = {}
    for cost in (0, 1):
        passes[cost] = []
        train = TrainConfig(steps=3, batch_size=8, lr=1e-3, warmup_steps=0, eval_every=0, save_every=0, pass_cost=cost)
        out = run_sft(SFTConfig(model=str(tiny_folder), data=str(data), out=str(tmp_path / f"cost{cost}"), train=train))
        weights[cost] = load_file(str(out / "model.safetensors"))
    for k in weights[0]:
        torch.testing.assert_close(weights[1][k], weights[0][k], rtol=1e-4, atol=1e-6)
    assert all(len(step) == 1 for step in passes[0]) and any(len(step) > 1 for step in passes[1])
    computed = {c: sum(r * w for step in passes[c] for r, w in step) for c in passes}
    assert computed[1] < 0.8 * computed[0]
