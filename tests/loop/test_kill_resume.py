"""`kill -9` at the worst moments of every training stage, then `--resume`: the same weights, bitwise.

Each case runs the real command line (tests/loop/kill_runner.py), which SIGKILLs itself at one moment
of its writes: after a checkpoint is complete, halfway through the first checkpoint's model file
(no checkpoint to resume from), halfway through a later checkpoint's model file, with a
checkpoint's tensors written and its state.json half written, halfway through the final
model.safetensors, with the final model written but tether.json half written, halfway through
the reference log-prob cache (DPO, KTO) and halfway through a line of metrics.jsonl (SFT, PPO).
The same command with ``--resume`` must then finish, leave no half-written file, and end with
weights equal, bitwise, to those of one uninterrupted run of the same options; a second test asks
the same of what the run recorded (metrics.jsonl line by line, PPO's samples.jsonl, the final
metrics in tether.json; timings aside). A third kills an ``--overwrite`` run: the old run must be
there byte for byte, and the same command again must replace it.

Every stage takes 4 steps with a checkpoint every 2 (checkpoints at steps 2 and 4; the default
keep_checkpoints=1 prunes the older one once the newer is in place). Runs are forked from one
server process that has imported tether once (tests/loop/kill_runner.py --serve), since a fresh
interpreter spends longer importing torch and transformers than a tiny run takes.
pretrain is covered by tests/cli/test_stages.py::test_killed_process_resumes_to_the_same_weights_bitwise.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import CORPUS

RUNNER = Path(__file__).with_name("kill_runner.py")
TRAIN = ["--steps", "4", "--save-every", "2", "--eval-every", "0", "--warmup-steps", "1", "--seed", "0"]
# the reward model of the "rm" stage's uninterrupted run ({rm}): an untrained policy's answers all get the
# same gold or verifiable reward, so that GRPO and RLOO would not move at all
RL_SAMPLING = ["--reward", "{rm}", "--max-new-tokens", "6", "--lr", "1e-3", "--batch-size", "4"]
TINY = ["--hidden-size", "32", "--layers", "2", "--heads", "2", "--intermediate-size", "64", "--vocab-size", "300"]
STAGES = {  # stage -> (data file it reads, options); every one writes checkpoints at steps 2 and 4
    "pretrain": ("sft", ["pretrain", "--model", "tiny", *TINY, "--batch-size", "4", "--max-len", "48"]),
    "sft": ("sft", ["sft", "--batch-size", "4", "--max-len", "48", "--eval-fraction", "0.1"]),
    "sft-lora": ("sft", ["sft", "--batch-size", "4", "--max-len", "48", "--eval-fraction", "0.1", "--r", "4"]),
    "rm": ("pairs", ["rm", "--batch-size", "4", "--max-len", "48", "--norm-prompts", "4",
                     "--norm-max-new-tokens", "4"]),
    "rm-ensemble": ("pairs", ["rm", "--batch-size", "4", "--max-len", "48", "--norm-prompts", "4",
                              "--norm-max-new-tokens", "4", "--ensemble", "2", "--bootstrap"]),
    "dpo": ("pairs", ["dpo", "--batch-size", "4", "--max-len", "48", "--kl-prompts", "2",
                      "--kl-max-new-tokens", "4"]),
    "kto": ("pairs", ["kto", "--batch-size", "4", "--max-len", "48", "--kl-prompts", "2",
                      "--kl-max-new-tokens", "4"]),
    "ppo": ("prompts", ["ppo", *RL_SAMPLING, "--rollout-batch", "4", "--epochs", "2", "--kl-target", "1.0",
                        "--eval-prompts", "{prompts}", "--eval-size", "2"]),
    "grpo": ("prompts", ["grpo", *RL_SAMPLING, "--group-size", "2", "--prompts-per-step", "2", "--inner-iters", "2",
                         "--eval-prompts", "{prompts}", "--eval-samples", "1"]),
    "rloo": ("prompts", ["rloo", *RL_SAMPLING, "--group-size", "2", "--prompts-per-step", "2", "--inner-iters", "2",
                         "--eval-prompts", "{prompts}", "--eval-samples", "1"]),
    "grpo-lora": ("prompts", ["grpo", *RL_SAMPLING, "--group-size", "2", "--prompts-per-step", "2", "--r", "4"]),
}
# moment -> (the runner's WHEN, which occurrence of it to kill at; see tests/loop/kill_runner.py)
MOMENTS = {
    "after-checkpoint": ("after-checkpoint", 1),  # step 2 is in place: resume trains steps 3 and 4
    "first-checkpoint": ("checkpoint-model", 1),  # step 2's model file half written: no checkpoint yet, start over
    "checkpoint-model": ("checkpoint-model", 2),  # step 4's model file half written: resume from step 2
    "checkpoint-state": ("checkpoint-state", 2),  # step 4's tensors written, its state.json half: from step 2
    "final-model": ("final-model", 1),            # every checkpoint written, the final model.safetensors half
    "final-meta": ("final-meta", 1),              # the final model written, tether.json half written
    "reference-cache": ("reference-cache", 1),    # DPO / KTO: the reference log-prob cache half written
    "metrics-line": ("metrics-line", 3),          # the third line of metrics.jsonl half written
}
ONLY = {"reference-cache": ("dpo", "kto"), "metrics-line": ("sft", "ppo")}  # moments tried on some stages only
SOME = {  # stages tried at some moments only: pretrain's kill after a checkpoint is in test_stages.py
    "pretrain": ("checkpoint-model", "final-model", "final-meta"),
    "sft-lora": ("after-checkpoint", "final-model"),  # the final write: the adapter, then the merged model
    "grpo-lora": ("after-checkpoint",),  # the reference: the policy with its adapters off
}
# an ensemble writes 2 checkpoints, then a final model and a tether.json, per member, then the
# ensemble's own tether.json
ENSEMBLE_MOMENTS = {
    "after-checkpoint": ("after-checkpoint", 3),  # member 0 complete, member 1's step 2 in place
    "first-checkpoint": ("checkpoint-model", 1),  # member 0's step 2 half written
    "checkpoint-model": ("checkpoint-model", 2),  # member 0's step 4 half written
    "checkpoint-state": ("checkpoint-state", 4),  # member 1's step 4: state.json half written
    "final-model": ("final-model", 2),            # member 1's final model half written
    "final-meta": ("final-meta", 3),              # both members written, the ensemble's tether.json half
}
FAST = {("sft", "checkpoint-model"), ("dpo", "final-meta")}  # the rest is marked slow
# (stage, moment) -> why the resumed run does not match today (xfail, strict: it flips once fixed):
# of the weights and files, and of the records (metrics.jsonl, samples.jsonl, tether.json's final metrics)
KNOWN_DEFECTS: dict[tuple[str, str], str] = {}
# fixed: a run resumed from its final checkpoint records the final metrics (each checkpoint carries its step's
# metrics: tether.loop.checkpoint_metrics), and one that starts over logs step 0 once (tether.loop.logged_until)
KNOWN_RECORD_DEFECTS: dict[tuple[str, str], str] = {}


# --- the fork server -------------------------------------------------------------------------------


class Server:
    """tests/loop/kill_runner.py --serve: one forked `tether` run per job."""

    def __init__(self, folder: Path):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "TETHER_DEBUG": "1"}
        self.folder = folder
        self.proc = subprocess.Popen([sys.executable, str(RUNNER), "--serve"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=env, cwd=folder,
                                     start_new_session=True)  # its own process group: the server and its runs
        self._answer(timeout=300)

    def _answer(self, timeout: float) -> dict:
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            self.close()
            raise RuntimeError(f"the kill runner gave no answer within {timeout} s (rc {self.proc.returncode})")
        return json.loads(line)

    def run(self, when: str, n: int, args: list, out: Path, log: Path) -> dict:
        """``tether ARGS --out OUT`` killed at ``when`` (``n``-th occurrence); returns {"signal"} or {"exit"}."""
        job = {"when": when, "n": n, "args": [str(a) for a in [*args, "--out", out]], "log": str(log),
               "env": {"TETHER_CACHE": f"{out}-cache",  # DPO's reference cache: one per run, kept on resume
                       "KILL_RUNNER_NOTE": f"{out}-kill.json"}}
        self.proc.stdin.write(json.dumps(job) + "\n")
        self.proc.stdin.flush()
        return self._answer(timeout=300)

    def close(self) -> None:
        """Stop the server and any run it forked (one that hangs included); between jobs it holds nothing,
        so this does not wait for torch to unload."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        self.proc.stdin.close()
        self.proc.stdout.close()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """The inputs every stage reads, written once."""
    root = tmp_path_factory.mktemp("kill")
    with open(root / "sft.jsonl", "w") as f:
        for text in CORPUS[::4]:
            prompt, completion = text.split("\n\nAssistant:")
            f.write(json.dumps({"prompt": prompt + "\n\nAssistant:", "completion": completion}) + "\n")
    with open(root / "pairs.jsonl", "w") as f:
        for a in range(0, 12, 2):
            for b in range(0, 12, 3):
                prompt = f"\n\nHuman: What is {a} plus {b}?\n\nAssistant:"
                f.write(json.dumps({"prompt": prompt, "chosen": f" {a} plus {b} is {a + b}. #### {a + b}",
                                    "rejected": f" {a} plus {b} is {a + b + 1}. I am not sure."}) + "\n")
    with open(root / "prompts.jsonl", "w") as f:
        for a, b in [(1, 2), (3, 4), (5, 6), (7, 1), (2, 9), (8, 3), (4, 4), (6, 0)]:
            f.write(json.dumps({"prompt": f"\n\nHuman: What is {a} plus {b}?\n\nAssistant:",
                                "answer": str(a + b)}) + "\n")
    return root


@pytest.fixture(scope="module")
def server(workdir):
    s = Server(workdir)
    yield s
    s.close()


def stage_args(stage: str, workdir: Path, tiny_folder: Path, rm: Path | None = None) -> list[str]:
    data, options = STAGES[stage]
    flag = "--prompts" if data == "prompts" else "--data"
    options = [str(rm) if o == "{rm}" else str(workdir / "prompts.jsonl") if o == "{prompts}" else o for o in options]
    model = [] if "--model" in options else ["--model", str(tiny_folder)]
    return [options[0], *model, flag, str(workdir / f"{data}.jsonl"), *options[1:], *TRAIN]


@pytest.fixture(scope="module")
def reference(server, workdir, tiny_folder):
    """The uninterrupted run of each stage, made once and shared by every kill moment."""
    done: dict[str, Path] = {}

    def get(stage: str) -> Path:
        if stage not in done:
            out = workdir / f"{stage}-whole"
            rm = get("rm") if "{rm}" in STAGES[stage][1] else None
            answer = server.run("none", 0, stage_args(stage, workdir, tiny_folder, rm), out,
                                workdir / f"{stage}-whole.log")
            assert answer == {"exit": 0}, _log(workdir / f"{stage}-whole.log")
            start = load_file(tiny_folder / "model.safetensors")
            for path in model_files(out):  # else an equal result would prove nothing
                trained = load_file(path)
                assert any(not torch.equal(trained[k], start[k]) for k in trained if k in start), f"{path} did not move"
            done[stage] = out
        return done[stage]

    return get


# --- what is compared ------------------------------------------------------------------------------


def _log(path: Path, tail: int = 3000) -> str:
    return path.read_text(errors="replace")[-tail:] if path.exists() else f"(no log at {path})"


def model_files(out: Path) -> list[Path]:
    """The final model file(s) a run leaves: one, or one per ensemble member."""
    meta = json.loads((out / "tether.json").read_text())
    return [out / m / "model.safetensors" for m in meta.get("members", [])] or [out / "model.safetensors"]


def metric_lines(out: Path) -> list[dict]:
    """metrics.jsonl without the timings (of every member of an ensemble)."""
    timing = ("time/", "perf/", "perf/samples_per_s")
    files = sorted(out.glob("member-*/metrics.jsonl")) or [out / "metrics.jsonl"]
    return [{k: v for k, v in json.loads(line).items() if not k.startswith(timing)}
            for f in files for line in f.read_text().splitlines() if line.strip()]


def final_metrics(out: Path) -> dict[str, dict]:
    """The final metrics tether.json records (of the ensemble and of each member), timings aside, and
    whether DPO's reference log-probs came from the cache (a resumed run finds the killed one's)."""
    timing = ("time/", "perf/", "perf/samples_per_s", "ref/cache_hit")

    def strip(d: dict) -> dict:
        return {k: strip(v) if isinstance(v, dict) else v for k, v in d.items() if not k.startswith(timing)}

    return {str(f.relative_to(out)): strip(json.loads(f.read_text())["metrics"])
            for f in [out / "tether.json", *sorted(out.glob("member-*/tether.json"))]}


def half_written(out: Path) -> list[str]:
    """Temporary or partial files a finished run should not have left behind."""
    return sorted(str(p.relative_to(out)) for p in out.rglob("*") if ".tmp" in p.name or p.name.endswith(".old"))


@pytest.fixture(scope="module")
def resumed(server, reference, workdir, tiny_folder):
    """Each (stage, moment): the run killed there, then resumed to the end; made once for both tests below."""
    done: dict[tuple[str, str], Path | str] = {}  # the output folder, or why the kill or the resume failed

    def get(stage: str, moment: str) -> Path:
        if (stage, moment) not in done:
            try:
                done[stage, moment] = kill_and_resume(stage, moment)
            except AssertionError as failure:
                done[stage, moment] = str(failure)
                raise
        if isinstance(done[stage, moment], str):
            pytest.fail(f"killing or resuming {stage} at {moment} failed (see the first test that tried): "
                        f"{done[stage, moment][:2000]}")
        return done[stage, moment]

    def kill_and_resume(stage: str, moment: str) -> Path:
        args = stage_args(stage, workdir, tiny_folder, reference("rm") if "{rm}" in STAGES[stage][1] else None)
        out, log = workdir / f"{stage}-{moment}", workdir / f"{stage}-{moment}.log"
        when, n = (ENSEMBLE_MOMENTS if stage == "rm-ensemble" else MOMENTS)[moment]
        killed = server.run(when, n, args, out, log)
        assert killed == {"signal": 9}, f"the run was not killed at {when} #{n}: {killed}\n{_log(log)}"
        note = json.loads(Path(f"{out}-kill.json").read_text())  # what the runner cut, just before the kill
        assert note["when"] == when
        if when == "after-checkpoint":
            assert (Path(note["checkpoint"]) / "state.json").exists()
        else:  # the half-written file is there for the resumed run to face
            cut = Path(note["file"])
            assert cut.exists() and ("checkpoints" in cut.parts) == when.startswith("checkpoint-"), cut
        answer = server.run("none", 0, [*args, "--resume"], out, log.with_suffix(".resume.log"))
        assert answer == {"exit": 0}, f"the resumed run failed:\n{_log(log.with_suffix('.resume.log'))}"
        return out

    return get


def _cases(defects: dict[tuple[str, str], str]) -> list:
    def marks(stage: str, moment: str) -> list:
        found = [] if (stage, moment) in FAST else [pytest.mark.slow]
        if (stage, moment) in defects:
            found.append(pytest.mark.xfail(strict=True, reason=defects[stage, moment]))
        return found

    return [pytest.param(stage, moment, marks=marks(stage, moment), id=f"{stage}-{moment}")
            for stage in STAGES for moment in MOMENTS
            if stage in ONLY.get(moment, STAGES) and moment in SOME.get(stage, MOMENTS)]


@pytest.mark.parametrize("stage, moment", _cases(KNOWN_DEFECTS))
def test_a_run_killed_at_any_moment_resumes_to_the_same_weights(reference, resumed, stage, moment):
    whole, out = reference(stage), resumed(stage, moment)
    meta = json.loads((out / "tether.json").read_text())
    assert meta["stage"] == json.loads((whole / "tether.json").read_text())["stage"]
    assert not half_written(out), half_written(out)
    for mine, theirs in zip(model_files(out), model_files(whole), strict=True):
        a, b = load_file(mine), load_file(theirs)
        assert a.keys() == b.keys()
        differ = [k for k in a if not torch.equal(a[k], b[k])]
        assert not differ, f"{mine}: {len(differ)} of {len(a)} tensors differ from an uninterrupted run: {differ[:3]}"


@pytest.mark.parametrize("stage, moment", _cases(KNOWN_RECORD_DEFECTS))
def test_a_resumed_run_keeps_the_records_of_an_uninterrupted_one(reference, resumed, stage, moment):
    """metrics.jsonl line by line, PPO's samples.jsonl, and the final metrics in tether.json, timings aside."""
    whole, out = reference(stage), resumed(stage, moment)
    assert metric_lines(out) == metric_lines(whole)
    if (whole / "samples.jsonl").exists():  # PPO's evaluation samples
        assert (out / "samples.jsonl").read_text() == (whole / "samples.jsonl").read_text()
    assert final_metrics(out) == final_metrics(whole)


def files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.slow
@pytest.mark.parametrize("moment", ["after-checkpoint", "final-model", "final-meta"])
def test_an_overwrite_killed_midway_leaves_the_old_run_and_the_next_overwrite_replaces_it(
        server, reference, workdir, tiny_folder, moment):
    """`--overwrite` writes the new run beside the old one and swaps it in at the end (tether.trainers.artifact):
    killed before the swap, the old run is there byte for byte; the same command again replaces it."""
    args = stage_args("sft", workdir, tiny_folder)
    out, log = workdir / f"sft-overwrite-{moment}", workdir / f"sft-overwrite-{moment}.log"
    assert server.run("none", 0, [*args, "--seed", "1"], out, log) == {"exit": 0}, _log(log)  # the old run
    old = files(out)
    when, n = MOMENTS[moment]
    killed = server.run(when, n, [*args, "--overwrite"], out, log)
    assert killed == {"signal": 9}, f"the run was not killed at {when} #{n}: {killed}\n{_log(log)}"
    note = json.loads(Path(f"{out}-kill.json").read_text())
    assert out not in Path(note.get("file") or note["checkpoint"]).parents  # the new run was written elsewhere
    assert files(out) == old
    answer = server.run("none", 0, [*args, "--overwrite"], out, log)
    assert answer == {"exit": 0}, _log(log)
    a, b = load_file(out / "model.safetensors"), load_file(reference("sft") / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in b) and a.keys() == b.keys()
    assert not [p.name for p in workdir.glob(f"{out.name}.*") if p != log]  # no staging folder left beside it
