"""bench/gpu_check.py on the CPU (its --dry-run: gloo, a tiny model), and how tether.distributed.setup places ranks
when a machine has fewer GPUs than ranks (nccl cannot share a GPU; TETHER_DIST_BACKEND=gloo can)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import click
import pytest
import torch
import torch.distributed as dist

from tether import distributed

ROOT = Path(__file__).resolve().parents[1]


# --- fast: rank placement, with the process group and the GPUs faked --------------------------


@pytest.fixture
def fake_world(monkeypatch):
    """Rank 1 of 2 on a machine with ``gpus`` GPUs: returns the calls setup makes (no process group is made)."""

    def make(gpus: int, backend: str | None = None, rank: int = 1):
        for name, value in (("RANK", rank), ("WORLD_SIZE", 2), ("LOCAL_RANK", rank)):
            monkeypatch.setenv(name, str(value))
        if backend is None:
            monkeypatch.delenv("TETHER_DIST_BACKEND", raising=False)
        else:
            monkeypatch.setenv("TETHER_DIST_BACKEND", backend)
        calls: dict = {}
        monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
        monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.__setitem__("set_device", d))
        monkeypatch.setattr(dist, "is_initialized", lambda: False)
        monkeypatch.setattr(dist, "init_process_group",
                            lambda backend, device_id=None: calls.update(backend=backend, device_id=device_id))
        monkeypatch.setattr(dist, "get_world_size", lambda: 2)
        monkeypatch.setattr(distributed.atexit, "register", lambda fn: None)
        return calls

    return make


def test_each_rank_has_its_own_gpu_under_nccl(fake_world):
    calls = fake_world(gpus=2)
    env, device = distributed.setup("cuda")
    assert (env.rank, env.world_size) == (1, 2)
    assert device == torch.device("cuda", 1) and calls["set_device"] == device
    assert calls["backend"] == "nccl" and calls["device_id"] == device


def test_more_ranks_than_gpus_under_nccl_is_an_error_naming_the_fix(fake_world):
    calls = fake_world(gpus=1)
    with pytest.raises(RuntimeError, match=r"nccl cannot put two ranks on one GPU.*--nproc_per_node 1.*"
                                           r"TETHER_DIST_BACKEND=gloo"):
        distributed.setup("cuda")
    assert "backend" not in calls  # refused before joining: no rank waits for it


def test_gloo_shares_the_gpus_when_asked(fake_world):
    calls = fake_world(gpus=1, backend="gloo")
    _, device = distributed.setup("cuda")
    assert device == torch.device("cuda", 0)  # rank 1 on the one GPU, beside rank 0
    assert calls["backend"] == "gloo" and calls["device_id"] is None


def test_a_backend_that_does_not_fit_the_device_is_an_error(fake_world):
    fake_world(gpus=0, backend="nccl")
    with pytest.raises(ValueError, match="TETHER_DIST_BACKEND=nccl with device cpu"):
        distributed.setup("cpu")
    fake_world(gpus=0, backend="mpi")
    with pytest.raises(ValueError, match="TETHER_DIST_BACKEND=mpi"):
        distributed.setup("cpu")


def test_the_cpu_keeps_gloo(fake_world):
    calls = fake_world(gpus=0)
    _, device = distributed.setup("cpu")
    assert device == torch.device("cpu") and calls["backend"] == "gloo" and "set_device" not in calls


# --- the check's own pieces ---------------------------------------------------------------------


def _bench():
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import gpu_check
    finally:
        sys.path.pop(0)
    return gpu_check


def test_curves_are_compared_relative_to_their_own_size(tmp_path):
    gpu_check = _bench()
    for name, losses in (("a", [1.0, 0.5, -0.02]), ("b", [1.0, 0.5, -0.0201])):
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.jsonl").write_text(
            "".join(json.dumps({"step": i + 1, "train/loss": v, "perf/tokens_per_s": 100.0 * (i + 1)}) + "\n"
                    for i, v in enumerate(losses)))
    out = gpu_check.compare(tmp_path / "a", tmp_path / "b", str(tmp_path))
    assert out["points"] == 3 and out["curves"] == pytest.approx(1e-4)  # 1e-4 of the curve's size 1, not 5e-3
    assert out["curves_at"] == "train/loss step 3" and out["weights"] == math.inf  # no weights written
    assert gpu_check.throughput(tmp_path / "a") == {"tokens/s": 250.0}  # the median of steps 2 and 3
    for name, losses in (("c", [-0.02, -0.01]), ("d", [-0.0201, -0.01])):  # a policy loss: terms of size 1
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.jsonl").write_text(
            "".join(json.dumps({"step": i + 1, "loss/policy": v}) + "\n" for i, v in enumerate(losses)))
    assert gpu_check.compare(tmp_path / "c", tmp_path / "d", str(tmp_path))["curves"] == pytest.approx(1e-4)


@pytest.mark.parametrize("world", [1, 2])
@pytest.mark.parametrize("stage", ["sft", "dpo", "grpo", "ppo"])
def test_the_gpu_sizes_are_valid_options_at_both_world_sizes(stage, world, monkeypatch, tmp_path):
    """What runs only on a GPU is at least checked here: each stage's command line parses and validates (batch
    sizes divide, groups stay on one rank) at world size 1 and 2, stopping before the stage would run."""
    from tether.cli import main
    from tether.cli import rl, stages

    gpu_check = _bench()
    seen = []

    def stop(fn, cfg):
        seen.append(cfg)
        raise KeyboardInterrupt  # tether's command group turns it into click's Abort, which nothing else raises

    monkeypatch.setattr(stages, "_run", stop)
    monkeypatch.setattr(rl, "_run", stop)
    monkeypatch.setattr(distributed, "env", lambda: distributed.Env(0, world, 0))
    data = {k: tmp_path / k for k in ("sft", "prefs", "prompts", "eval_prompts", "reward")}
    args = gpu_check.stage_args(stage, gpu_check.GPU, "base", "sft", data, tmp_path / "out", "bf16", "cuda")
    with pytest.raises(click.exceptions.Abort):
        main(args, standalone_mode=False)
    cfg = seen[0]
    assert (cfg.train.precision, cfg.train.device, cfg.train.grad_accum % 2) == ("bf16", "cuda", 0)
    if stage in ("grpo", "ppo"):
        rows = cfg.prompts_per_step * cfg.group_size if stage == "grpo" else cfg.rollout_batch
        assert (rows // 2) % cfg.sampling.gen_batch_size == 0  # each rank samples in the chunks one process does


# --- slow: the whole dry run ----------------------------------------------------------------------


@pytest.mark.slow
def test_the_dry_run_proves_every_stage_equal_at_world_size_2_on_the_cpu(tmp_path):
    """SFT, DPO, GRPO and PPO at world size 1 and 2 (gloo, 2 processes), bf16 autocast and fp32: the same curves
    and weights within the check's tolerances, and a throughput figure for each (about 50 s on 2 cores)."""
    job = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--dry-run", "--out", str(tmp_path),
                          "--work", str(tmp_path / "work")], capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert job.returncode == 0, (job.stdout + job.stderr)[-5000:]
    report = json.loads(next(tmp_path.glob("gpu_check-*-dry.json")).read_text())
    assert report["dry_run"] and report["scheme"] == "gloo on the CPU"
    assert report["vllm"]["status"] == "not run (CPU dry run)"
    seen = {(e["stage"], e["precision"]) for e in report["stages"]}
    assert seen == {(s, p) for s in ("sft", "dpo", "grpo", "ppo") for p in ("bf16", "fp32")}
    for e in report["stages"]:
        where = f"{e['precision']} {e['stage']}: {e}"
        assert e["status"] == {"1": "ok", "2": "ok"}, where
        c, tol = e["compare"], report["tolerances"][e["precision"]]
        assert c["points"] >= 3 and c["missing_points"] == 0 and c["update_norm"] > 0, where  # the weights moved
        assert all(math.isfinite(c[k]) for k in ("curves", "weights", "update")), where
        assert c["curves"] <= tol["curves"] and c["weights"] <= tol["weights"], where
        assert c["update"] <= tol["update"] and e["verdict"] == "equal", where
        for world in ("1", "2"):
            figures = e["throughput"][world]
            assert figures and all(math.isfinite(v) and v > 0 for v in figures.values()), where
            assert e["wall_s"][world] > 0, where
    table = next(tmp_path.glob("gpu_check-*-dry.md")).read_text()
    assert "| stage | precision | curves |" in table
    assert "torchrun --standalone --nproc_per_node 2 -m tether ppo" in table
