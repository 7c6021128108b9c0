"""The GPU check: tether's distributed and mixed-precision paths, proved on whatever GPUs a machine has.

    python bench/gpu_check.py --out bench/results        # on a GPU machine: no network, no download, <= 10 minutes
    python bench/gpu_check.py --dry-run                   # the same code path on the CPU (gloo), tiny sizes, ~2 minutes

SFT, DPO, GRPO and PPO run at world size 1 and 2 on the same global batches (gen_batch_size divides each
rank's rows, grad_accum is a multiple of 2, so a rank trains whole micro-batches of the shapes one process
trains): in bf16 autocast (``--precision bf16``) first, then GRPO and PPO with ``--backend vllm`` where
``import vllm`` works (else the report says "vllm: not installed"), then in fp32 while the time budget lasts
(``--budget-s``; a launch that would not fit is skipped, and the report says so). Each pair is compared:
- curves: over the loss curves in metrics.jsonl (and the RL stages' mean reward: CURVE_KEYS), the largest
  |a - b| / (the curve's largest |a|): the relative distance of two curves, finite for a loss that crosses 0
  (a policy loss is measured against at least 1, the scale of its advantages: CURVE_SCALE);
- weights: the largest ``|w2 - w1| / |w1|`` over the final tensors;
- update: ``|w2 - w1| / |w1 - w0|`` over the whole model (w0: the starting weights). A short run moves the
  weights little, so this is the stringent figure.
Throughput is read from the runs' own metrics (``perf/tokens_per_s``, ``perf/samples_per_s``: medians over
the steps after the first, which pays the warm-up), beside each stage's wall time (model loading included).

Tolerances. fp32: 1e-5 on the curves and the weights (what is left is the order of floating-point sums
across ranks; tests/test_distributed.py gets about 1e-7 on the CPU), 1e-3 on the update. bf16: 1e-2 on the
curves and the weights, 5e-2 on the update. bf16 keeps 8 significant bits (unit roundoff 2^-8 = 3.9e-3):
one rounding that lands differently (a kernel that accumulates in another order, the evaluation's rows
split over ranks into other shapes) moves a loss by about 1e-3, and a few such differences compound over
the steps of a run; the mistakes this check exists for (a rank training on the wrong rows, a missing or
doubled all-reduce, a loss divided by a rank's count instead of the step's) move a loss by 1e-1 and an
update by 50-100%, an order of magnitude above the tolerance.

Processes and GPUs. World size 2 runs under ``python -m torch.distributed.run --standalone --nproc_per_node 2``
(world size 1 as one plain process): one launch per (precision, world size) runs every stage through
``tether.cli.main`` with the command-line arguments a user types (the report lists each stage's
``torchrun ... -m tether <stage> ...`` line), so the interpreter starts four times, not sixteen.
- two or more GPUs: nccl, rank r on cuda:r (the path a user takes);
- one GPU: nccl cannot put two ranks on one GPU (it fails with "Duplicate GPU detected"; NVIDIA/nccl#103,
  #231: not supported since NCCL 2.5), so world size 2 runs with TETHER_DIST_BACKEND=gloo, both ranks on
  cuda:0 (tether.distributed.setup); gloo all-reduces and broadcasts CUDA tensors, which is what DDP needs
  (the backend table of the torch.distributed docs). The equality of world size 2 with 1 is proved as well
  as under nccl (the same code, another transport), but nccl itself is not exercised (world size 1 makes
  no process group: that takes a machine with two GPUs), and world-size-2 throughput is that of two
  processes taking turns on one GPU (not a speed-up);
- ``--dry-run`` / ``--device cpu``: gloo on the CPU, a tiny model and tiny step counts.

Model: ``--model PATH`` (any Hugging Face causal LM folder), else one tether builds offline: the blocks of
the 25.8M Llama-style model the TRL comparison uses (bench/compare_trl.py: hidden 512, 8 layers, 8 heads, MLP 1376)
with Llama 2's vocabulary size, 32,000 (a BPE tokenizer trained on the gold world's corpus, which yields
about 1,200 tokens, padded with reserved tokens so that the embedding and output layer have a real model's
size), tied embeddings: about 41.7M parameters. Data: the gold world (``tether world export``). The RL
stages start from the world-size-1 SFT run of the same precision and score with a reward model on the
starting model's backbone with a fresh, seeded head (a dense function of the text: the gold reward gives
an untrained policy's unfinished answers the same score within every group, so GRPO would not move);
PPO's critic starts from that reward model, as by default.

vLLM runs with VLLM_ENABLE_V1_MULTIPROCESSING=0: tether's adapter (tether.generation.VLLMSampler.sync) copies
the weights into the engine's model runner, which must live in the training process.

Figures go to ``--out`` as gpu_check-<date>.json and .md (-dry added for a dry run); the runs themselves to
``--work`` (a temporary folder, removed at the end unless --keep-work), each launch's output in its launch.log
(TETHER_DEBUG=1: a failing stage leaves its traceback there).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("sft", "dpo", "grpo", "ppo")
TOLERANCES = {  # precision -> (curves, weights, update)
    "fp32": {"curves": 1e-5, "weights": 1e-5, "update": 1e-3},
    "bf16": {"curves": 1e-2, "weights": 1e-2, "update": 5e-2},
}
# the loss curves, and the RL stages' mean reward (the same samples scored the same). Not compared: differences of
# two large log-probabilities (DPO's implicit reward margin, a KL estimate), whose rounding is that of the
# log-probabilities (1e-7 of -114 nats is 1e-5 of a 0.01 margin), and counts such as an accuracy
CURVE_KEYS = ("train/loss", "eval/loss", "loss/policy", "loss/value", "reward/mean")
ABS_FLOOR = 1e-6  # a curve smaller than this throughout is compared in absolute terms (a policy loss that is 0)
# The size a curve is measured against is at least this: GRPO's and PPO's policy loss is a mean of advantage x ratio
# terms whose advantages are scaled to unit spread (per group, or whitened over the batch), so it rounds like terms
# of size 1 even when the mean nearly cancels (PPO: a 0.02 loss from O(1) terms)
CURVE_SCALE = {"loss/policy": 1.0}


@dataclass
class Scale:
    """Sizes of one check: the model built when --model is not given, and each stage's options."""

    vocab: int
    hidden: int
    layers: int
    heads: int
    intermediate: int
    max_positions: int
    dpo_pairs: int
    sft: list[str] = field(default_factory=list)
    dpo: list[str] = field(default_factory=list)
    grpo: list[str] = field(default_factory=list)
    ppo: list[str] = field(default_factory=list)


# Every global batch is the same at world size 1 and 2: grad_accum is even (each rank trains whole micro-batches),
# GRPO's prompts_per_step and PPO's rollout_batch are even, and gen_batch_size divides each rank's rows.
GPU = Scale(
    vocab=32_000, hidden=512, layers=8, heads=8, intermediate=1376, max_positions=256, dpo_pairs=512,
    sft=["--steps", "30", "--batch-size", "16", "--grad-accum", "2", "--max-len", "128", "--lr", "3e-4",
         "--warmup-steps", "3", "--eval-every", "10", "--eval-fraction", "0.02"],
    dpo=["--steps", "20", "--batch-size", "8", "--grad-accum", "2", "--max-len", "128", "--lr", "5e-5",
         "--warmup-steps", "2", "--eval-every", "10", "--eval-fraction", "0.1", "--kl-prompts", "8",
         "--kl-max-new-tokens", "16"],
    # 8 prompts x 4 samples = 32 rows an iteration, one optimiser step of 4 micro-batches of 8 (2 a rank)
    grpo=["--steps", "10", "--group-size", "4", "--prompts-per-step", "8", "--batch-size", "8", "--grad-accum", "4",
          "--max-new-tokens", "32", "--gen-batch-size", "16", "--lr", "1e-4", "--eval-every", "5",
          "--eval-size", "16", "--eval-samples", "1"],
    # 16 prompts an iteration, 2 epochs over mini-batches of 8 rows (micro-batches of 4)
    ppo=["--steps", "10", "--rollout-batch", "16", "--batch-size", "4", "--grad-accum", "2", "--epochs", "2",
         "--max-new-tokens", "32", "--gen-batch-size", "8", "--lr", "1e-4", "--eval-every", "5",
         "--eval-size", "16"],
)
DRY = Scale(
    vocab=512, hidden=32, layers=2, heads=2, intermediate=64, max_positions=128, dpo_pairs=64,
    sft=["--steps", "4", "--batch-size", "4", "--grad-accum", "2", "--max-len", "64", "--lr", "3e-3",
         "--warmup-steps", "1", "--eval-every", "2", "--eval-fraction", "0.01"],
    dpo=["--steps", "3", "--batch-size", "2", "--grad-accum", "2", "--max-len", "64", "--lr", "1e-3",
         "--warmup-steps", "1", "--eval-every", "3", "--eval-fraction", "0.1", "--kl-prompts", "2",
         "--kl-max-new-tokens", "4"],
    grpo=["--steps", "2", "--group-size", "2", "--prompts-per-step", "4", "--batch-size", "2", "--grad-accum", "4",
          "--max-new-tokens", "8", "--gen-batch-size", "4", "--lr", "1e-2", "--eval-every", "2",
          "--eval-size", "4", "--eval-samples", "1"],
    ppo=["--steps", "2", "--rollout-batch", "4", "--batch-size", "1", "--grad-accum", "2", "--epochs", "2",
         "--max-new-tokens", "8", "--gen-batch-size", "2", "--lr", "1e-3", "--eval-every", "2",
         "--eval-size", "4"],
)
COMMON = ["--save-every", "0", "--keep-checkpoints", "1", "--seed", "0"]


# --- the inputs: data and model ------------------------------------------------------------


def prepare_data(work: Path, pairs: int) -> dict[str, Path]:
    """The gold world's files (tether world export), written once into ``work/data``, and its first ``pairs``
    preference pairs (DPO scores its reference on every pair before the first step: a short run needs few)."""
    folder = work / "data"
    if not (folder / "world.json").exists():
        from tether.world import WorldConfig, export

        export(str(folder), WorldConfig(), overwrite=folder.exists())
    lines = (folder / "preferences_train.jsonl").read_text().splitlines(keepends=True)
    (folder / "preferences_check.jsonl").write_text("".join(lines[:pairs]))
    return {"sft": folder / "sft_train.jsonl", "prefs": folder / "preferences_check.jsonl",
            "prompts": folder / "prompts_train.jsonl", "eval_prompts": folder / "prompts_eval.jsonl",
            "corpus": folder / "pretrain.jsonl"}


def build_model(folder: Path, scale: Scale, corpus: Path) -> dict:
    """A Llama-style model with ``scale``'s sizes and a BPE tokenizer trained on the world's corpus, its vocabulary
    padded to ``scale.vocab`` entries with reserved tokens that no text encodes to (entries of the BPE model's own
    vocabulary, so the tokenizer loads as fast as any); random weights (the SFT stage trains it first)."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    from tether.models import TinyConfig, build_tiny, count_parameters, save_model, train_tokenizer
    from tether.models.tiny import EOS, PAD

    texts = [json.loads(line)["text"] for line in corpus.read_text().splitlines() if line.strip()]
    tokenizer = train_tokenizer(texts, vocab_size=scale.vocab)
    learned = len(tokenizer)
    if learned < scale.vocab:  # the corpus has fewer merges than a real vocabulary: reserve the rest
        spec = json.loads(tokenizer.backend_tokenizer.to_str())
        vocab = spec["model"]["vocab"]
        for i in range(max(vocab.values()) + 1, scale.vocab):
            vocab[f"\u0120reserved{i}"] = i  # "Ġ": a space in the byte-level alphabet, so each decodes to text
        padded = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)), eos_token=EOS,
                                         pad_token=PAD)
        padded.chat_template, padded.padding_side = tokenizer.chat_template, tokenizer.padding_side
        tokenizer = padded
    model = build_tiny(tokenizer, TinyConfig(vocab_size=scale.vocab, hidden_size=scale.hidden, layers=scale.layers,
                                             heads=scale.heads, intermediate_size=scale.intermediate,
                                             max_positions=scale.max_positions))
    save_model(model, tokenizer, folder)
    return {"path": str(folder), "built": True, "parameters": count_parameters(model), "vocab": len(tokenizer),
            "learned_tokens": learned, "hidden": scale.hidden, "layers": scale.layers}


def build_reward(model: str, folder: Path) -> str:
    """A reward model on ``model``'s backbone with a fresh scalar head (tether.models.reward: std 1/sqrt(d + 1),
    seeded): a fixed, dense function of the text, so that every GRPO group and PPO batch has rewards that differ
    (the gold reward gives an untrained policy's unfinished answers one score each, and nothing to learn)."""
    import torch

    from tether.models import load_tokenizer, save_model
    from tether.models.reward import load_reward_model, mark_trained

    if not (folder / "config.json").exists():
        tokenizer = load_tokenizer(model)
        with torch.random.fork_rng():
            torch.manual_seed(0)
            rm = load_reward_model(model, tokenizer)
        mark_trained(rm)
        save_model(rm, tokenizer, folder)
    return str(folder)


def describe_model(path: str) -> dict:
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(path)
    return {"path": path, "built": False, "vocab": getattr(cfg, "vocab_size", None),
            "hidden": getattr(cfg, "hidden_size", None), "layers": getattr(cfg, "num_hidden_layers", None)}


# --- what each launch runs -------------------------------------------------------------------


def stage_args(stage: str, scale: Scale, base: str, sft_model: str, data: dict[str, Path], out: Path,
               precision: str, device: str, backend: str = "tether") -> list[str]:
    """The tether command line of one stage (without the program name). The RL stages score with the reward
    model in ``data["reward"]``, which PPO's critic starts from (its default)."""
    own = getattr(scale, stage)
    if stage == "sft":
        inputs = ["--model", base, "--data", str(data["sft"])]
    elif stage == "dpo":
        inputs = ["--model", sft_model, "--data", str(data["prefs"])]
    else:
        inputs = ["--model", sft_model, "--prompts", str(data["prompts"]), "--eval-prompts", str(data["eval_prompts"]),
                  "--reward", str(data["reward"]), "--backend", backend]
    return [stage, *inputs, "--out", str(out), *own, *COMMON, "--precision", precision, "--device", device,
            "--strategy", "ddp"]


def launch(runs: list[dict], world: int, folder: Path, env: dict, timeout: float) -> tuple[dict, float, str]:
    """Run ``runs`` (each {"name", "args"}) in one launch of ``world`` processes; returns ({name: result},
    wall seconds, note). A launch that outlives ``timeout`` is stopped; its unfinished runs say so."""
    folder.mkdir(parents=True, exist_ok=True)
    plan, results, log = folder / "plan.json", folder / "results.json", folder / "launch.log"
    plan.write_text(json.dumps({"runs": runs, "results": str(results)}, indent=1))
    results.unlink(missing_ok=True)
    worker = [str(Path(__file__).resolve()), "--worker", str(plan)]
    cmd = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(world), *worker]
           if world > 1 else [sys.executable, *worker])
    t0, note = time.perf_counter(), ""
    with open(log, "w") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        job = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=str(ROOT), start_new_session=True)
        try:
            rc = job.wait(timeout=max(timeout, 1))
            if rc:
                note = f"launch exited with {rc} (see {log})"
        except subprocess.TimeoutExpired:
            os.killpg(job.pid, 9)  # this launch's own process group (start_new_session)
            job.wait()
            note = f"launch stopped after {timeout:.0f} s (the time budget)"
    wall = time.perf_counter() - t0
    done = json.loads(results.read_text()) if results.exists() else {}
    for r in runs:
        done.setdefault(r["name"], {"status": "not run", "error": note or f"no result (see {log})"})
    return done, wall, note


def worker(plan_file: str) -> None:
    """Inside a launch: every run of the plan through tether's command line, in order; rank 0 records each
    run's status and wall time as soon as it ends (so a launch stopped for time keeps what finished)."""
    plan = json.loads(Path(plan_file).read_text())
    from tether.cli import main as tether_main

    rank = int(os.environ.get("RANK", "0"))
    results: dict[str, dict] = {}
    for run in plan["runs"]:
        t0 = time.perf_counter()
        try:
            tether_main(run["args"], standalone_mode=False)
            status, error = "ok", ""
        except KeyboardInterrupt:
            raise
        except BaseException as e:  # noqa: BLE001 (SystemExit from click included): recorded, and the next run goes on
            traceback.print_exc()
            status, error = "failed", f"{type(e).__name__}: {e}".strip()[:2000]
        results[run["name"]] = {"status": status, "error": error, "wall_s": time.perf_counter() - t0}
        if rank == 0:
            tmp = Path(plan["results"] + ".tmp")
            tmp.write_text(json.dumps(results, indent=1))
            tmp.replace(plan["results"])
        sys.stdout.flush()


# --- comparing two runs ----------------------------------------------------------------------


def read_metrics(folder: Path) -> list[dict]:
    path = folder / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def curves(folder: Path) -> dict[tuple[int, str], float]:
    return {(r["step"], k): float(v) for r in read_metrics(folder) for k, v in r.items()
            if k in CURVE_KEYS and isinstance(v, (int, float))}


def compare(w1: Path, w2: Path, start: str) -> dict:
    """World size 2 (``w2``) against 1 (``w1``): curves, final weights and the update from ``start``'s weights."""
    from safetensors.torch import load_file

    c1, c2 = curves(w1), curves(w2)
    shared = sorted(set(c1) & set(c2))
    out: dict = {"points": len(shared), "missing_points": len(set(c1) ^ set(c2)), "curves": math.inf,
                 "curves_at": "no common points"}
    size: dict[str, float] = {}  # each curve's own size: max over its steps of |value|, in either run
    for step, key in shared:
        size[key] = max(size.get(key, CURVE_SCALE.get(key, ABS_FLOOR)), abs(c1[step, key]), abs(c2[step, key]))
    gaps = {(step, key): abs(c1[step, key] - c2[step, key]) / size[key]
            if math.isfinite(c1[step, key]) and math.isfinite(c2[step, key]) else math.inf for step, key in shared}
    if gaps:
        worst = max(gaps, key=gaps.get)
        out["curves"], out["curves_at"] = gaps[worst], f"{worst[1]} step {worst[0]}"
    f1, f2, f0 = w1 / "model.safetensors", w2 / "model.safetensors", Path(start) / "model.safetensors"
    if not (f1.exists() and f2.exists()):
        return {**out, "weights": math.inf, "update": math.inf}
    a, b = load_file(str(f1)), load_file(str(f2))
    initial = load_file(str(f0)) if f0.exists() else {}
    weights, diff2, step2 = 0.0, 0.0, 0.0
    for k in a:
        if k not in b or a[k].shape != b[k].shape:
            return {**out, "weights": math.inf, "update": math.inf}
        x, y = a[k].double(), b[k].double()
        weights = max(weights, float((y - x).norm() / x.norm().clamp_min(1e-30)))
        diff2 += float((y - x).pow(2).sum())
        if k in initial and initial[k].shape == x.shape:
            step2 += float((x - initial[k].double()).pow(2).sum())
    out["weights"] = weights
    out["update"] = math.sqrt(diff2) / math.sqrt(step2) if step2 > 0 else (0.0 if diff2 == 0 else math.inf)
    out["update_norm"] = math.sqrt(step2)
    return out


def throughput(folder: Path) -> dict:
    """The run's own throughput figures: medians over the steps after the first (which pays warm-up)."""
    rows = [r for r in read_metrics(folder) if r.get("step", 0) > 0]
    figures = {}
    for key, unit in (("perf/tokens_per_s", "tokens/s"), ("perf/samples_per_s", "samples/s")):
        values = [r[key] for r in rows if isinstance(r.get(key), (int, float))]
        if values:
            figures[unit] = statistics.median(values[1:] or values)
    return figures


def verdict(cmp: dict, precision: str) -> str:
    tol = TOLERANCES[precision]
    ok = cmp.get("points", 0) > 0 and all(cmp.get(k, math.inf) <= tol[k] for k in ("curves", "weights", "update"))
    return "equal" if ok else "DIFFERENT"


# --- the check --------------------------------------------------------------------------------


def machine(device: str) -> dict:
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "host": platform.node(),
            "cpus": os.cpu_count(), "device": device}
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    if device == "cuda":
        info.update(gpus=torch.cuda.device_count(), gpu=torch.cuda.get_device_name(0), cuda=torch.version.cuda,
                    bf16=torch.cuda.is_bf16_supported())
        try:
            info["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
        except Exception as e:  # noqa: BLE001 (a build without nccl: world size 2 then needs gloo)
            info["nccl"] = f"unavailable ({type(e).__name__})"
    return info


def scheme(device: str) -> dict:
    """How world size 2 runs here: the backend and where the ranks live, and the environment that says so."""
    if device == "cpu":  # no GPU visible: "auto" (what a config's validate() joins the world with) means the CPU too
        return {"world2": "gloo on the CPU", "env": {"CUDA_VISIBLE_DEVICES": ""}}
    import torch

    gpus = torch.cuda.device_count()
    if gpus >= 2:
        return {"world2": f"nccl, rank r on cuda:r ({gpus} GPUs)", "env": {}}
    return {"world2": "gloo, both ranks on cuda:0 (one GPU: nccl refuses two ranks on one GPU, 'Duplicate GPU "
                      "detected'); nccl is exercised at world size 1 only", "env": {"TETHER_DIST_BACKEND": "gloo"}}


def vllm_status() -> str:
    """'installed <version>' or why not; imported in a child process (vLLM is heavy and touches CUDA)."""
    probe = subprocess.run([sys.executable, "-c", "import vllm; print(vllm.__version__)"], capture_output=True,
                           text=True, timeout=300)
    if probe.returncode == 0:
        return f"installed {probe.stdout.strip().splitlines()[-1]}"
    last = (probe.stderr.strip().splitlines() or ["?"])[-1]
    return "not installed" if "ModuleNotFoundError" in last else f"import fails: {last[:300]}"


def torchrun_line(world: int, args: list[str]) -> str:
    prefix = f"torchrun --standalone --nproc_per_node {world} -m tether" if world > 1 else "python -m tether"
    return f"{prefix} " + " ".join(args)


class Check:
    """One check: its inputs, the environment of its launches, the time budget, and the report it fills."""

    def __init__(self, a):
        self.a, self.started = a, time.perf_counter()
        self.dry = a.dry_run or a.device == "cpu"
        self.device = "cpu" if self.dry else "cuda"
        self.scale = DRY if self.dry else GPU
        self.stages = [s for s in a.stages.split(",") if s]
        self.precisions = [p for p in a.precisions.split(",") if p]
        for s in self.stages:
            if s not in STAGES:
                raise SystemExit(f"gpu_check: --stages takes {','.join(STAGES)}, got {s!r}")
        for p in self.precisions:
            if p not in TOLERANCES:
                raise SystemExit(f"gpu_check: --precisions takes {','.join(TOLERANCES)}, got {p!r}")
        import torch

        if self.device == "cuda" and not torch.cuda.is_available():
            raise SystemExit("gpu_check: no CUDA device is visible (--dry-run checks the code path on the CPU)")
        self.work = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="gpu_check-"))
        self.work.mkdir(parents=True, exist_ok=True)
        self.data = prepare_data(self.work, self.scale.dpo_pairs)
        if a.model:
            self.model = describe_model(a.model)
        elif (self.work / "model" / "config.json").exists():
            self.model = {**describe_model(str(self.work / "model")), "built": True}
        else:
            self.model = build_model(self.work / "model", self.scale, self.data["corpus"])
        self.data["reward"] = Path(build_reward(self.model["path"], self.work / "reward"))
        how = scheme(self.device)
        self.env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
                    "CUBLAS_WORKSPACE_CONFIG": ":4096:8", "TETHER_DEBUG": "1",  # tracebacks in each launch.log
                    "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH", "")])),
                    **how["env"]}
        self.report: dict = {"date": datetime.date.today().isoformat(), "dry_run": self.dry,
                             "machine": machine(self.device), "scheme": how["world2"], "scheme_env": how["env"],
                             "model": self.model, "reward_model": str(self.data["reward"]), "tolerances": TOLERANCES,
                             "abs_floor": ABS_FLOOR, "budget_s": a.budget_s, "work": str(self.work), "stages": [],
                             "vllm": {}, "launches": [], "notes": []}
        if how["env"].get("TETHER_DIST_BACKEND") == "gloo":
            self.report["notes"].append("world size 2 shares one GPU (gloo): its throughput is two processes taking "
                                        "turns on one device, not a speed-up; nccl was not exercised (world size 1 "
                                        "makes no process group)")

    def left(self) -> float:
        return self.a.budget_s - (time.perf_counter() - self.started)

    def launch(self, runs: list[dict], world: int, folder: Path, name: str, need: float, cap: float,
               extra_env: dict | None = None) -> tuple[dict, float]:
        """One launch, unless less than ``need`` seconds of the budget are left; stopped after ``cap`` seconds."""
        if self.left() < need:
            self.report["launches"].append({"name": name, "status": f"skipped: {max(self.left(), 0):.0f} s of the "
                                                                   f"budget left, about {need:.0f} s needed"})
            print(f"  {name}: skipped (time budget)", flush=True)
            return {r["name"]: {"status": "skipped (time budget)", "error": ""} for r in runs}, 0.0
        res, wall, note = launch(runs, world, folder, {**self.env, **(extra_env or {})},
                                 timeout=min(self.left(), cap))
        self.report["launches"].append({"name": name, "world": world, "wall_s": round(wall, 1), "status": note or "ok"})
        print(f"  {name}: {wall:.0f} s {note}", flush=True)
        return res, wall

    def pair(self, precision: str, need: float) -> float:
        """Every stage at world size 1, then 2, in ``precision``; compared. Returns the pair's wall time."""
        base = self.work / precision
        sft1 = str(base / "w1" / "sft") if "sft" in self.stages else self.model["path"]
        results, walls = {}, {}
        for world in (1, 2):
            runs = [{"name": s, "args": stage_args(s, self.scale, self.model["path"], sft1, self.data,
                                                   base / f"w{world}" / s, precision, self.device)}
                    for s in self.stages]
            if world == 2 and not walls[1]:  # world size 1 was skipped: nothing to compare with
                results[2], walls[2] = {r["name"]: {"status": "skipped (time budget)", "error": ""} for r in runs}, 0.0
                continue
            # a hung launch (a collective waiting for a rank that died) is stopped well before the budget ends
            cap = 300.0 if world == 1 else max(120.0, 3 * walls[1])
            results[world], walls[world] = self.launch(runs, world, base / f"w{world}", f"{precision} world size "
                                                       f"{world}", need / 2 if world == 1 else 0.8 * walls[1], cap)
        for s in self.stages:
            r1, r2 = results[1][s], results[2][s]
            entry = {"stage": s, "precision": precision, "status": {"1": r1["status"], "2": r2["status"]},
                     "errors": {w: r["error"] for w, r in (("1", r1), ("2", r2)) if r.get("error")},
                     "wall_s": {"1": r1.get("wall_s"), "2": r2.get("wall_s")},
                     "throughput": {"1": throughput(base / "w1" / s), "2": throughput(base / "w2" / s)},
                     "command": torchrun_line(2, stage_args(s, self.scale, self.model["path"], sft1, self.data,
                                                            base / "w2" / s, precision, self.device))}
            if r1["status"] == r2["status"] == "ok":
                entry["compare"] = compare(base / "w1" / s, base / "w2" / s, self.model["path"] if s == "sft" else sft1)
                entry["verdict"] = verdict(entry["compare"], precision)
            else:
                skipped = "skipped" in r1["status"] + r2["status"]
                entry["verdict"] = "not compared (a run " + ("was skipped" if skipped else "failed") + ")"
            self.report["stages"].append(entry)
            print(f"  {precision} {s}: {entry['verdict']}", flush=True)
        return walls[1] + walls[2]

    def vllm(self) -> dict:
        """GRPO and PPO with --backend vllm (training in bf16 autocast where asked; vLLM serves the policy), each
        run its own launch (one engine a process): world size 1, then GRPO at 2. Reported, not judged: vLLM
        samples from another random stream than tether's sampler, so its runs are compared with each other."""
        if self.device != "cuda" or self.a.no_vllm:
            return {"status": "not run (" + ("CPU dry run" if self.device != "cuda" else "--no-vllm") + ")"}
        status = vllm_status()
        print(f"  vllm: {status}", flush=True)
        if not status.startswith("installed"):
            return {"status": status}
        precision = "bf16" if "bf16" in self.precisions else self.precisions[0]
        sft1 = str(self.work / precision / "w1" / "sft")
        if not (Path(sft1) / "model.safetensors").exists():
            sft1 = self.model["path"]
        # tether's adapter copies the weights into vLLM's in-process model runner: keep the engine in this process
        extra = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
        out: dict = {"status": status, "env": extra, "runs": []}
        for stage, world in (("grpo", 1), ("ppo", 1), ("grpo", 2)):
            if stage not in self.stages:
                continue
            folder = self.work / "vllm" / f"{stage}-w{world}"
            args = stage_args(stage, self.scale, self.model["path"], sft1, self.data, folder / "run", precision,
                              self.device, backend="vllm")
            res, _ = self.launch([{"name": stage, "args": args}], world, folder, f"vllm {stage} world size {world}",
                                 need=60.0, cap=180.0, extra_env=extra)
            r = res[stage]
            rewards = [m["reward/mean"] for m in read_metrics(folder / "run") if "reward/mean" in m]
            out["runs"].append({"stage": stage, "world": world, "status": r["status"], "error": r.get("error", ""),
                                "wall_s": r.get("wall_s"), "throughput": throughput(folder / "run"),
                                "tether_backend_throughput": throughput(self.work / precision / f"w{world}" / stage),
                                "reward_mean_last": rewards[-1] if rewards else None,
                                "command": torchrun_line(world, args)})
            print(f"  vllm {stage} world size {world}: {r['status']} {r.get('error', '')[:200]}", flush=True)
        one, two = (self.work / "vllm" / f"grpo-w{w}" / "run" for w in (1, 2))
        if (one / "model.safetensors").exists() and (two / "model.safetensors").exists():
            out["grpo_world2_vs_1"] = compare(one, two, sft1)
        return out

    def run(self) -> dict:
        """bf16 first (the point), then the vLLM runs, then fp32 while the budget lasts."""
        need = 0.0
        for i, precision in enumerate(self.precisions):
            need = self.pair(precision, need)
            if i == 0:
                self.report["vllm"] = self.vllm()
        self.report["wall_s"] = round(time.perf_counter() - self.started, 1)
        return self.report


# --- the report --------------------------------------------------------------------------------


def fmt(x, spec=".1e") -> str:
    if x is None:
        return "—"
    if isinstance(x, float) and not math.isfinite(x):
        return "inf"
    return format(x, spec)


def tput(figures: dict) -> str:
    return ", ".join(f"{v:,.0f} {k}" for k, v in figures.items()) or "—"


def markdown(r: dict) -> str:
    m = r["machine"]
    params = format(r["model"]["parameters"], ",") if "parameters" in r["model"] else "?"
    where = "CPU" if r["dry_run"] else f"{m.get('gpu')} × {m.get('gpus')}"
    head = (f"# tether GPU check, {r['date']}{' (dry run on the CPU)' if r['dry_run'] else ''}\n\n"
            f"Machine: {where}, torch {m['torch']}"
            f"{', CUDA ' + str(m['cuda']) + ', NCCL ' + str(m.get('nccl')) if m.get('cuda') else ''}, "
            f"{m['cpus']} CPUs. "
            f"World size 2: {r['scheme']}.\n\n"
            f"Model: {r['model']['path']} ({params}"
            f" parameters, vocabulary {r['model'].get('vocab')}). Whole check: {r['wall_s']} s "
            f"(budget {r['budget_s']} s).\n\n"
            "Differences of world size 2 from 1: curves = largest |a − b| / (the curve's largest |a|) over the "
            f"curves {', '.join(CURVE_KEYS)} (loss/policy against at least 1, its advantages' scale), weights = "
            "largest "
            "|w2 − w1| / |w1| over tensors, update = |w2 − w1| / |w1 − w0| over the model. Tolerances: "
            + "; ".join(f"{p}: curves {t['curves']:g}, weights {t['weights']:g}, update {t['update']:g}"
                        for p, t in r["tolerances"].items()) + ".\n\n")
    rows = ["| stage | precision | curves | weights | update | verdict | WS1 throughput | WS2 throughput | WS1 wall s "
            "| WS2 wall s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for e in r["stages"]:
        c = e.get("compare", {})
        rows.append(f"| {e['stage']} | {e['precision']} | {fmt(c.get('curves'))} | {fmt(c.get('weights'))} | "
                    f"{fmt(c.get('update'))} | {e['verdict']} | {tput(e['throughput']['1'])} | "
                    f"{tput(e['throughput']['2'])} | {fmt(e['wall_s']['1'], '.1f')} | {fmt(e['wall_s']['2'], '.1f')} |")
    body = "\n".join(rows) + "\n"
    errors = [f"- {e['precision']} {e['stage']} world size {w}: {msg}" for e in r["stages"]
              for w, msg in e["errors"].items()]
    if errors:
        body += "\nErrors:\n\n" + "\n".join(errors) + "\n"
    v = r["vllm"]
    body += f"\nvLLM backend: {v.get('status')}"
    if v.get("env"):
        body += f" (run with {' '.join(f'{k}={x}' for k, x in v['env'].items())})"
    body += "\n"
    if v.get("runs"):
        body += ("\n| stage | world size | status | throughput (vllm) | throughput (tether sampler) | last reward "
                 "| wall s |\n"
                 "|---|---|---|---|---|---|---|\n")
        for x in v["runs"]:
            status = x["status"] + (f": {x['error'][:160]}" if x.get("error") else "")
            body += (f"| {x['stage']} | {x['world']} | {status} | {tput(x['throughput'])} | "
                     f"{tput(x['tether_backend_throughput'])} | {fmt(x['reward_mean_last'], '.3f')} | "
                     f"{fmt(x['wall_s'], '.1f')} |\n")
        if "grpo_world2_vs_1" in v:
            c = v["grpo_world2_vs_1"]
            body += (f"\nvLLM GRPO, world size 2 against 1 (reported, not judged): curves {fmt(c['curves'])}, weights "
                     f"{fmt(c['weights'])}, update {fmt(c['update'])}.\n")
    skipped = [x for x in r["launches"] if x["status"].startswith("skipped")]
    for x in skipped:
        body += f"\nSkipped: {x['name']}: {x['status']}.\n"
    for note in r["notes"]:
        body += f"\nNote: {note}.\n"
    body += "\nCommands (world size 2; world size 1 is `python -m tether` with the same options):\n\n"
    seen = set()
    for e in r["stages"]:
        if e["stage"] not in seen:
            seen.add(e["stage"])
            body += f"    {e['command']}\n"
    return head + body


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"), help="folder for gpu_check-<date>.json and .md")
    ap.add_argument("--work", default="", help="folder for the runs (default: a new temporary folder)")
    ap.add_argument("--model", default="", help="a Hugging Face causal LM folder (default: build the 41.7M "
                                                "check model)")
    ap.add_argument("--dry-run", action="store_true", help="the same code path on the CPU with gloo, tiny sizes")
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="cpu: as --dry-run")
    ap.add_argument("--stages", default=",".join(STAGES), help="comma-separated subset of " + ",".join(STAGES))
    ap.add_argument("--precisions", default="bf16,fp32", help="bf16 first (the point of the check), fp32 where the "
                                                              "budget allows")
    ap.add_argument("--budget-s", type=float, default=570.0, help="stop launching runs past this many seconds")
    ap.add_argument("--no-vllm", action="store_true", help="skip the vLLM backend runs")
    ap.add_argument("--keep-work", action="store_true", help="keep the temporary run folder")
    ap.add_argument("--worker", default="", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        worker(a.worker)
        return
    sys.path.insert(0, str(ROOT))
    report = Check(a).run()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"gpu_check-{report['date'].replace('-', '')}{'-dry' if report['dry_run'] else ''}"
    Path(f"{stem}.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    text = markdown(report)
    Path(f"{stem}.md").write_text(text)
    print(text)
    print(f"figures in {stem}.json and {stem}.md")
    if not a.work and not a.keep_work:
        shutil.rmtree(report["work"], ignore_errors=True)


if __name__ == "__main__":
    main()
