"""tether beside TRL on a real chat model: the same numbers from the same weights and the same data.

    python bench/parity_trl.py              # 8 HH-RLHF pairs, SmolLM2-135M-Instruct, CPU fp32: ~12 min, one thread
    python bench/parity_trl.py --pairs 2       # a quick look

Run it with any interpreter. When TRL TRL_VERSION (the version bench/compare_trl.py pins) is not
importable, the script makes or reuses ``.venv-bench`` (compare_trl.ensure_venv: TRL alone, torch
and transformers being the main environment's, seen through a ``.pth`` file) and runs itself again
there, with OMP_NUM_THREADS=1 unless set. Both frameworks then run in one process, each through its
own code. tether: its loaders (``load_preferences``, ``load_feedback``, ``load_sft``,
``load_prompts``), encoders, ``tether.scoring``, ``tether.losses`` and the trainers' own steps
(``lm_loss``, ``dpo_step``, ``kto_step``, the reward stage's ``pair_scores``, the GRPO stage's
``score`` and the loss call of its update). TRL: ``SFTTrainer``, ``RewardTrainer``, ``DPOTrainer``,
``KTOTrainer`` and ``GRPOTrainer`` built on a one-batch dataset, with their own tokenisation,
collators and ``compute_loss`` (``DPOTrainer.compute_ref_log_probs`` gives per-sequence log-probs).
Nothing trains: every number is one batch's loss or log-probs, without gradient. Writes
bench/results/parity_trl-YYYYMMDD.json and .md.

What is held equal.
- Weights: the policy is SmolLM2-135M-Instruct (``tether model import-gguf smollm2``, fp32),
  loaded by both. The reference of DPO, KTO and GRPO is the same model with seeded Gaussian noise
  (NOISE × each tensor's standard deviation) written once to a folder both load: with π_ref = π
  the DPO loss is log 2 and the GRPO loss 0 whatever the code does. The reward model is the
  policy's backbone with a scalar head initialised once by tether (seed 0) and saved; both load it.
- Data: the first PAIRS pairs of HH-RLHF's harmless-base test set whose tether rendering fits
  MAX_TOKENS tokens and whose replies are not empty. tether reads the raw rows with its own
  loaders (``load_preferences`` / ``load_feedback`` with the tokenizer: HH transcripts become
  chat turns); TRL gets the same rows as conversations ({"chosen": [...], "rejected": [...]}
  messages, parsed from the transcripts here) and extracts the prompt and applies the chat
  template itself. SFT trains on prompt + chosen; KTO sees each pair as a desirable and an
  undesirable example, in the same order on both sides (so both pair prompt i with completion
  i − 1 for the KL reference point). GRPO scores GROUP completions for each of the first
  GRPO_PROMPTS prompts, sampled once by tether (seed 0, temperature 1, GRPO_TOKENS new tokens)
  and handed to both (tether's stage gets a backend returning them; TRL's ``_generate_single_turn``
  is replaced by one returning them), with one deterministic reward function (distinct words / 10).
  TRL's GRPOTrainer loads its reference from the policy's path; the shared reference is swapped in
  (with TRL's ``add_fused_lm_head``, as the trainer adds it). The loss is taken on-policy (π_old =
  π: its value is β·KL, since the advantage term sums to zero over a group) and with π_old = π_ref
  (ratios ≠ 1, so the clipped surrogate and the advantages count).
- Settings: DPO sigmoid β = BETA; KTO β = BETA, weights 1; GRPO β = GRPO_BETA, ε = 0.2,
  advantages scaled by the group's std, the per-sequence mean ("grpo" in TRL), and TRL's
  ``use_bias_correction_kl`` off (its default multiplies the KL term by the ratio, which is not
  DeepSeekMath's loss; on-policy the value is the same, the gradient is not). fp32 on the CPU.

How it is compared. Each quantity is computed four times: by tether and by TRL, on tether's
token ids and on TRL's token ids (each framework's tokenisation is fed to the other through its
own collators / encoded records). On the same ids the two must agree within TOL relative
(vectors: the largest element-wise relative difference); "as rendered" (each on its own ids)
shows what the rendering differences cost, and every token-id difference is listed and
classified. The reward model is read at the last real token on both sides: TRL's figures use a
padding id no row ends with (with SmolLM2's own, the EOS, transformers would read tether's rows one
token early; that figure is recorded too). GRPO's advantages differ by design in their epsilon
(std + 1e-4 in TRL, + 1e-6 in tether): its losses are compared on tether's advantages, and on each
framework's own as an "explained" difference.
"""

from __future__ import annotations

import argparse
import gzip
import json
import logging
import os
import re
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from compare_trl import TRL_VERSION, ensure_venv  # noqa: E402  (bench/compare_trl.py: the bench venv)

DATA = ROOT / ".." / "shared" / "data" / "hh-rlhf" / "harmless-base-test.jsonl.gz"
PAIRS, MAX_TOKENS, SCAN_ROWS = 8, 256, 200
BETA, GRPO_BETA, CLIP = 0.1, 0.04, 0.2
GROUP, GRPO_PROMPTS, GRPO_TOKENS = 4, 4, 48
NOISE, SEED = 0.02, 0
TOL = 1e-4
MAX_LEN = 1024  # both frameworks' length limit: far above every row here, so nothing is truncated
NEWLINE_AFTER_EOS = "TRL keeps the '\\n' the chat template writes after <|im_end|> in the response; tether ends " \
                    "the response at <|im_end|> (tether.data.collate.response_ids)"


# --- running in the bench venv ------------------------------------------------------------


def trl_ready() -> bool:
    try:
        import trl
    except ImportError:
        return False
    return trl.__version__ == TRL_VERSION


def relaunch_in_bench_venv() -> int:
    """Run this script again under .venv-bench (made by compare_trl.ensure_venv if needed)."""
    python = ensure_venv("trl")
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "TOKENIZERS_PARALLELISM": "false",
           "HF_HUB_OFFLINE": "1", "TRL_EXPERIMENTAL_SILENCE": "1"}
    return subprocess.run([str(python), __file__, *sys.argv[1:]], env=env).returncode


# --- models and data ----------------------------------------------------------------------


def prepare_models(cache: Path) -> tuple[Path, Path, Path]:
    """(policy, reference, reward model) folders under ``cache``, each written once and reused."""
    import torch

    from tether.models import load_model, load_tokenizer
    from tether.models.gguf import import_gguf
    from tether.models.reward import load_reward_model

    policy = cache / "smollm2"
    if not (policy / "model.safetensors").exists():
        print(f"importing SmolLM2-135M-Instruct into {policy} ...", flush=True)
        import_gguf("smollm2", policy)
    ref = cache / f"smollm2-ref-noise{NOISE:g}-seed{SEED}"
    if not (ref / "model.safetensors").exists():
        model, gen = load_model(policy), torch.Generator().manual_seed(SEED)
        with torch.no_grad():
            for _, p in sorted(model.named_parameters()):
                p.add_(torch.randn(p.shape, generator=gen) * p.std() * NOISE)
        model.save_pretrained(ref)
        load_tokenizer(policy).save_pretrained(ref)
    rm = cache / f"smollm2-rm-seed{SEED}"
    if not (rm / "model.safetensors").exists():
        tok = load_tokenizer(policy)
        torch.manual_seed(SEED)
        load_reward_model(policy, tok).save_pretrained(rm)  # the head: tether's initialisation, saved once
        tok.save_pretrained(rm)
    return policy, ref, rm


TURN = re.compile(r"\n\n(Human|Assistant):")


def hh_messages(text: str) -> list[dict]:
    """An HH-RLHF transcript as chat messages (written here, independently of tether's loader)."""
    parts = TURN.split(text)
    roles = {"Human": "user", "Assistant": "assistant"}
    messages = [{"role": roles[r], "content": c.strip()} for r, c in zip(parts[1::2], parts[2::2])]
    if messages and messages[-1]["role"] == "assistant" and not messages[-1]["content"]:
        messages.pop()  # a transcript cut at "Assistant:" is a prompt
    return messages


def read_rows(path: Path, n: int) -> list[dict]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for _, line in zip(range(n), f)]


def select_pairs(rows: list[dict], tok, n: int) -> tuple[list[int], list[dict]]:
    """Indices of the first ``n`` rows with non-empty replies whose tether rendering fits MAX_TOKENS; the skipped."""
    from tether.data import load_preferences
    from tether.data.collate import encode_pairs

    records = load_preferences(rows, tokenizer=tok, skip_invalid=True)
    by_row = {int(r.where.rsplit("row ", 1)[1]) - 1: r for r in records}
    keep, skipped = [], []
    for i, row in enumerate(rows):
        if len(keep) == n:
            break
        c, r = hh_messages(row["chosen"]), hh_messages(row["rejected"])
        if i not in by_row:
            skipped.append({"row": i, "why": "tether's loader rejected it"})
        elif c[-1]["role"] != "assistant" or r[-1]["role"] != "assistant" or not by_row[i].chosen.strip() \
                or not by_row[i].rejected.strip():
            skipped.append({"row": i, "why": "an empty reply"})
        else:
            pair = encode_pairs([by_row[i]], tok, 10**6)[0][0]
            longest = max(len(pair.chosen), len(pair.rejected))
            if longest > MAX_TOKENS:
                skipped.append({"row": i, "why": f"{longest} tokens > {MAX_TOKENS}"})
            else:
                keep.append(i)
    if len(keep) < n:
        sys.exit(f"only {len(keep)} usable pairs in the first {len(rows)} rows")
    return keep, skipped


def hh_prompt(transcript: str) -> str:
    """The transcript up to and including its last "\\n\\nAssistant:" (a prompt-only record)."""
    cut = transcript.rfind("\n\nAssistant:")
    return transcript[: cut + len("\n\nAssistant:")]


# --- comparing ----------------------------------------------------------------------------


def as_list(x) -> list[float]:
    import torch

    if isinstance(x, torch.Tensor):
        return [float(v) for v in x.detach().reshape(-1).tolist()]
    return [float(v) for v in x] if isinstance(x, (list, tuple)) else [float(x)]


def rel_diff(a, b, scale: str = "element") -> float:
    """Largest relative difference: element-wise (|a − b| / max(|a|, |b|)), or over the largest magnitude ("max")."""
    a, b = as_list(a), as_list(b)
    if len(a) != len(b):
        return float("inf")
    if scale == "max":
        top = max(max(abs(x) for x in a + b), 1e-12)
        return max(abs(x - y) for x, y in zip(a, b)) / top
    return max(abs(x - y) / max(abs(x), abs(y), 1e-12) for x, y in zip(a, b))


def summary(v, absolute: bool = False) -> float:
    """One number for the table: the value, or the mean of a vector (of its magnitudes with ``absolute``)."""
    v = [abs(x) for x in as_list(v)] if absolute else as_list(v)
    return sum(v) / len(v)


# --- token ids: what each framework renders -----------------------------------------------


def diff_ids(tok, a: list[int], b: list[int]) -> dict | None:
    """None when equal; else where ``a`` (tether's) and ``b`` (TRL's) part and what each holds from there."""
    if a == b:
        return None
    k = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return {"at": k, "tether_len": len(a), "trl_len": len(b), "tether_tail": tok.decode(a[k:k + 12]),
            "trl_tail": tok.decode(b[k:k + 12]), "tether_ids": a[k:k + 12], "trl_ids": b[k:k + 12]}


def explain(tok, a: list[int], b: list[int], part: str) -> str | None:
    """Why tether's ids ``a`` and TRL's ``b`` differ: None when they do not, "UNEXPLAINED" when no known reason fits."""
    if a == b:
        return None
    if part != "prompt" and a[-1:] == [tok.eos_token_id] and b == a + tok.encode("\n", add_special_tokens=False):
        return NEWLINE_AFTER_EOS
    return "UNEXPLAINED"


def sequences(kind: str, row: dict) -> dict[str, list[int]]:
    """The token sequences of one row of ``kind`` by part (an SFT row is split at its labels)."""
    if kind != "sft":
        return {k: v for k, v in row.items() if k != "label"}
    n = sum(label != -100 for label in row["labels"])
    cut = len(row["input_ids"]) - n
    return {"prompt": row["input_ids"][:cut], "completion": row["input_ids"][cut:]}


def compare_rendering(tok, tether_ids: dict, trl_ids: dict) -> dict:
    """Every token-id difference between the two renderings, row by row and part by part, with its explanation."""
    out = {}
    for kind in ("pairs", "sft", "kto", "rm"):
        out[kind] = []
        for k, (t, r) in enumerate(zip(tether_ids[kind], trl_ids[kind], strict=True)):
            a, b = sequences(kind, t), sequences(kind, r)
            for part in a:
                why = explain(tok, a[part], b[part], part)
                if why:
                    out[kind].append({"row": k, "part": part, "why": why, **diff_ids(tok, a[part], b[part])})
            if t.get("label") != r.get("label"):
                out[kind].append({"row": k, "part": "label", "why": "UNEXPLAINED", "tether": t["label"],
                                  "trl": r["label"]})
    return out


def string_path_rendering(tok, dpo_trainer, rows: list[dict]) -> list[dict]:
    """Without a chat template (HH transcripts as plain strings): tether's split and TRL's, pair by pair.

    tether cuts the prompt after the last "\\n\\nAssistant:" the two transcripts share; TRL's
    implicit-prompt extraction takes their whole common prefix (less a trailing space), so the
    words both replies start with go to its prompt.
    """
    from datasets import Dataset

    from tether.data import load_preferences
    from tether.data.collate import encode_pairs

    pairs, _ = encode_pairs(load_preferences(rows), tok, MAX_LEN)
    strings = Dataset.from_list([{"chosen": r["chosen"], "rejected": r["rejected"]} for r in rows])
    trl = dpo_trainer._prepare_dataset(strings, dpo_trainer.processing_class, dpo_trainer.args, "strings")
    out = []
    for k, (p, r) in enumerate(zip(pairs, trl)):
        t_prompt = p.chosen[: p.prompt_len]
        same_full = p.chosen == r["prompt_ids"] + r["chosen_ids"] and p.rejected == r["prompt_ids"] + r["rejected_ids"]
        entry = {"pair": k, "prompt_equal": t_prompt == r["prompt_ids"], "full_sequences_equal": same_full}
        if t_prompt != r["prompt_ids"]:
            moved = r["prompt_ids"][len(t_prompt):] if r["prompt_ids"][: len(t_prompt)] == t_prompt else None
            entry["why"] = ("TRL's implicit prompt takes the common prefix of both transcripts: the words both "
                            f"replies start with ({tok.decode(moved)!r}) are in TRL's prompt, in tether's responses"
                            if moved is not None and same_full else "UNEXPLAINED")
            entry["trl_prompt_tail"] = tok.decode(r["prompt_ids"][-8:])
            entry["tether_prompt_tail"] = tok.decode(t_prompt[-8:])
        elif not same_full:
            entry["why"] = "UNEXPLAINED"
        out.append(entry)
    return out


# --- tether's side ------------------------------------------------------------------------


def tether_ids(tok, rows: list[dict]) -> dict:
    """tether's token ids of the chosen rows: its loaders render, its encoders tokenise."""
    from tether.data import load_feedback, load_preferences, load_sft
    from tether.data.collate import encode_feedback, encode_pairs, encode_sft

    records = load_preferences(rows, tokenizer=tok)
    pairs, _ = encode_pairs(records, tok, MAX_LEN)
    sft_records = load_sft([{"prompt": r.prompt, "completion": r.chosen} for r in records], tokenizer=tok)
    sft, _ = encode_sft(sft_records, tok, MAX_LEN)
    feedback, _ = encode_feedback(load_feedback(rows, tokenizer=tok), tok, MAX_LEN)
    return {
        "rendered_as_chat": all(r.prompt.rstrip().endswith("<|im_start|>assistant") for r in records),
        "records": [{"prompt": r.prompt, "chosen": r.chosen, "rejected": r.rejected} for r in records],
        "pairs": [{"prompt": p.chosen[: p.prompt_len], "chosen": p.chosen[p.prompt_len:],
                   "rejected": p.rejected[p.prompt_len:]} for p in pairs],
        "sft": [{"input_ids": e.input_ids, "labels": e.labels} for e in sft],
        "kto": [{"prompt": e.prompt, "completion": e.completion, "label": bool(e.label)} for e in feedback],
        "rm": [{"chosen": p.chosen, "rejected": p.rejected} for p in pairs],
    }


def tether_quantities(model, rm, ref_dir: Path, tok, ids: dict) -> dict:
    """SFT NLL, log-probs, RM, DPO and KTO losses on ``ids``, through tether's own functions."""
    import torch

    from tether import scoring
    from tether.data.collate import Encoded, EncodedFeedback, EncodedPair, pad, pad_pairs_labelled, pair_rows
    from tether.loop import TrainConfig
    from tether.losses import bradley_terry_loss
    from tether.trainers.dpo import DPOConfig, dpo_step, pair_count
    from tether.trainers.kto import KTOConfig, kto_step, matched_rows, mismatched_rows
    from tether.trainers.reward import pair_scores
    from tether.trainers.sft import lm_count, lm_loss

    pad_id, out = tok.pad_token_id, {}
    cfg = TrainConfig(batch_size=len(ids["pairs"]), device="cpu", precision="fp32")
    with torch.no_grad():
        rows = [Encoded(r["input_ids"], r["labels"]) for r in ids["sft"]]
        total, count = scoring.token_nll(model, rows, pad_id, batch_size=len(rows))  # the SFT stage's eval loss
        batch = pad(rows, pad_id)
        parts, _ = lm_loss(model, batch)  # the SFT stage's training loss (summed; the step divides by lm_count)
        out["sft_nll"] = float(parts["labelled"]) / lm_count(batch)["labelled"]
        out["sft_nll_eval"] = total / count

        pairs = [EncodedPair(p["prompt"] + p["chosen"], p["prompt"] + p["rejected"], len(p["prompt"]))
                 for p in ids["pairs"]]
        logps = scoring.sequence_logprobs(model, pair_rows(pairs), pad_id, batch_size=2 * len(pairs))
        out["logp_chosen"], out["logp_rejected"] = logps.chunk(2)
        ref, _ = scoring.cached_reference(str(ref_dir), pair_rows(pairs), pad_id, cfg)  # the DPO stage's reference pass
        out["ref_logp_chosen"], out["ref_logp_rejected"] = ref.cached.chunk(2)
        batch = {**pad_pairs_labelled(pairs, pad_id), "ref_chosen": out["ref_logp_chosen"],
                 "ref_rejected": out["ref_logp_rejected"]}
        parts, _ = dpo_step(model, batch, DPOConfig(model="-", data="-", loss="sigmoid", beta=BETA))
        out["dpo_loss"] = float(parts["pairs"]) / pair_count(batch)["pairs"]

        rm_pairs = [EncodedPair(p["chosen"], p["rejected"], 0) for p in ids["rm"]]
        r_w, r_l = pair_scores(rm, rm_pairs, pad_id)  # the RM stage's scoring: the head at the last kept position
        out["rm_reward_chosen"], out["rm_reward_rejected"] = r_w, r_l
        out["rm_loss"] = float(bradley_terry_loss(r_w, r_l).loss)

        examples = [EncodedFeedback(e["prompt"], e["completion"], e["label"]) for e in ids["kto"]]
        matched, kl_rows = matched_rows(examples, MAX_LEN), mismatched_rows(examples, MAX_LEN)
        ref, _ = scoring.cached_reference(str(ref_dir), matched + kl_rows, pad_id, cfg)
        ref_m, ref_kl = ref.cached.split([len(matched), len(kl_rows)])
        kl = pad(kl_rows, pad_id)
        batch = {**pad(matched, pad_id), **{f"kl_{k}": v for k, v in kl.items()}, "ref": ref_m, "ref_kl": ref_kl,
                 "label": torch.tensor([e.label for e in examples])}
        parts, metrics = kto_step(model, batch, KTOConfig(model="-", data="-", beta=BETA))
        out["kto_loss"] = float(parts["rows"]) / len(examples)
        out["kto_kl_ref_point"] = metrics["kl_ref_point"]
    return out


# --- TRL's side ---------------------------------------------------------------------------


def trl_common(out_dir: str, batch: int) -> dict:
    return dict(output_dir=out_dir, per_device_train_batch_size=batch, per_device_eval_batch_size=batch,
                report_to="none", save_strategy="no", use_cpu=True, bf16=False, fp16=False, seed=SEED,
                disable_tqdm=True, dataloader_num_workers=0)


def trl_trainers(policy: Path, ref: Path, rm: Path, rows: list[dict], out_dir: str) -> dict:
    """TRL's SFT, reward, DPO and KTO trainers on the chosen rows (as conversations): TRL tokenises them itself."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    from trl import DPOConfig, DPOTrainer, KTOConfig, KTOTrainer, RewardConfig, RewardTrainer, SFTConfig, SFTTrainer
    from trl.data_utils import extract_prompt

    def lm(path):
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()

    tok = AutoTokenizer.from_pretrained(policy)
    convs = [{"chosen": hh_messages(r["chosen"]), "rejected": hh_messages(r["rejected"])} for r in rows]
    split = [extract_prompt(c) for c in convs]  # TRL's own implicit-prompt extraction (message level here)
    n = len(rows)
    common = trl_common(out_dir, n)
    sft_data = Dataset.from_list([{"prompt": s["prompt"], "completion": s["chosen"]} for s in split])
    kto_data = Dataset.from_list([{"prompt": s["prompt"], "completion": s[side], "label": side == "chosen"}
                                  for s in split for side in ("chosen", "rejected")])  # tether's order: interleaved
    rm_model = AutoModelForSequenceClassification.from_pretrained(rm, num_labels=1, dtype=torch.float32).eval()
    return {
        "sft": SFTTrainer(model=lm(policy), args=SFTConfig(**common, max_length=MAX_LEN), train_dataset=sft_data,
                          processing_class=tok),
        "rm": RewardTrainer(model=rm_model, args=RewardConfig(**common, max_length=MAX_LEN),
                            train_dataset=Dataset.from_list(convs), processing_class=tok),
        "dpo": DPOTrainer(model=lm(policy), ref_model=lm(ref),
                          args=DPOConfig(**common, beta=BETA, loss_type=["sigmoid"], max_length=MAX_LEN),
                          train_dataset=Dataset.from_list(convs), processing_class=tok),
        "kto": KTOTrainer(model=lm(policy), ref_model=lm(ref),
                          args=KTOConfig(**{**common, "per_device_train_batch_size": 2 * n}, beta=BETA,
                                         max_length=MAX_LEN),
                          train_dataset=kto_data, processing_class=tok),
    }


def trl_ids(trainers: dict) -> dict:
    """TRL's token ids, read from each trainer's prepared dataset."""
    dpo, sft, kto, rm = (trainers[k].train_dataset for k in ("dpo", "sft", "kto", "rm"))
    return {
        "pairs": [{"prompt": r["prompt_ids"], "chosen": r["chosen_ids"], "rejected": r["rejected_ids"]} for r in dpo],
        "sft": [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in sft],
        "kto": [{"prompt": r["prompt_ids"], "completion": r["completion_ids"], "label": bool(r["label"])} for r in kto],
        "kto_kl_completions": [r["KL_completion_ids"] for r in kto],
        "rm": [{"chosen": r["chosen_ids"], "rejected": r["rejected_ids"]} for r in rm],
    }


def trl_quantities(trainers: dict, ids: dict) -> dict:
    """The same quantities through TRL's collators and compute_loss, on ``ids`` (either framework's)."""
    import torch

    out = {}
    with torch.no_grad():
        t = trainers["sft"]
        out["sft_nll"] = float(t.compute_loss(t.model, t.data_collator([dict(r) for r in ids["sft"]])))
        out["sft_nll_eval"] = out["sft_nll"]  # TRL evaluates with the same compute_loss

        t = trainers["dpo"]
        batch = t.data_collator([{"prompt_ids": p["prompt"], "chosen_ids": p["chosen"], "rejected_ids": p["rejected"]}
                                 for p in ids["pairs"]])
        out["logp_chosen"], out["logp_rejected"] = t.compute_ref_log_probs(t.model, batch)  # any model: the policy here
        out["ref_logp_chosen"], out["ref_logp_rejected"] = t.compute_ref_log_probs(t.ref_model, batch)
        out["dpo_loss"] = float(t.compute_loss(t.model, batch))

        t = trainers["rm"]
        examples = [{"chosen_ids": p["chosen"], "rejected_ids": p["rejected"]} for p in ids["rm"]]
        ends = {p[side][-1] for p in ids["rm"] for side in ("chosen", "rejected")}
        # transformers' classifier reads the last token that is not the padding id: with TRL's default padding id
        # (the EOS) that is one token early on rows ending with the EOS; a padding id no row ends with reads the last
        unused = min(set(range(len(ends) + 1)) - ends)
        for suffix, pad_id in (("_default_pad", t.data_collator.pad_token_id), ("", unused)):
            saved = t.model.config.pad_token_id, t.data_collator.pad_token_id
            t.model.config.pad_token_id = t.data_collator.pad_token_id = pad_id
            try:
                loss, outputs = t.compute_loss(t.model, t.data_collator(examples), return_outputs=True)
            finally:
                t.model.config.pad_token_id, t.data_collator.pad_token_id = saved
            out[f"rm_reward_chosen{suffix}"], out[f"rm_reward_rejected{suffix}"] = outputs.logits.squeeze(-1).chunk(2)
            out[f"rm_loss{suffix}"] = float(loss)

        t = trainers["kto"]
        completions = [e["completion"] for e in ids["kto"]]
        kl = ids.get("kto_kl_completions") or completions[-1:] + completions[:-1]  # completion i − 1 for prompt i
        batch = t.data_collator([{"prompt_ids": e["prompt"], "completion_ids": e["completion"], "KL_completion_ids": k,
                                  "label": e["label"]} for e, k in zip(ids["kto"], kl)])
        out["kto_loss"] = float(t.compute_loss(t.model, batch))
        out["kto_kl_ref_point"] = t._metrics["eval" if not t.model.training else "train"]["kl"][-1]
    return out


# --- GRPO: fixed completions, one reward, both frameworks' scoring and loss ----------------


def distinct_words(prompts, completions, **_) -> list[float]:
    """The GRPO reward in both frameworks: distinct words in the response / 10 (TRL passes chat messages)."""
    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
    return [len(set(t.split())) / 10 for t in texts]


class FixedCompletions:
    """A tether generation backend that returns completions sampled beforehand (the same ones TRL scores)."""

    def __init__(self, tok, completions: dict[str, list[list[int]]]):
        self.tok, self.completions = tok, completions

    def sample(self, prompts, **_):
        from tether.data.collate import prompt_ids

        taken: dict[str, int] = {}
        out = []
        for p in prompts:
            k = taken.get(p, 0)
            taken[p] = k + 1
            out.append((prompt_ids(self.tok, p), list(self.completions[p][k])))
        return out

    def sync(self, model) -> None:
        pass


def grpo(policy: Path, ref: Path, raw_prompts: list[str], out_dir: str) -> dict:
    """GRPO's rewards, advantages, reference log-probs and loss on the same completions, from both frameworks."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig as TRLGRPOConfig
    from trl import GRPOTrainer
    from trl.trainer.utils import add_fused_lm_head

    from tether.data import load_prompts
    from tether.data.collate import prompt_ids
    from tether.generation import make_backend
    from tether.loop import TrainConfig
    from tether.losses import grpo_loss
    from tether.models import load_model, load_tokenizer
    from tether.rewards import load_reward
    from tether.rollout import rollout
    from tether.scoring import Reference, response_logprobs
    from tether.trainers.grpo import CriticFree, GRPOConfig
    from tether.trainers.rl import Inputs

    tok = load_tokenizer(policy)
    model, ref_model = load_model(policy).eval(), load_model(ref).eval()
    prompts = [r.prompt for r in load_prompts([{"prompt": p} for p in raw_prompts], tokenizer=tok)]  # rendered
    repeated = [p for p in prompts for _ in range(GROUP)]
    n = len(repeated)
    sampled = make_backend("tether", model, tok).sample(repeated, max_new_tokens=GRPO_TOKENS, temperature=1.0,
                                                        batch_size=n, seed=SEED)
    completions: dict[str, list[list[int]]] = {}
    for p, (_, response) in zip(repeated, sampled):
        completions.setdefault(p, []).append(response)

    # tether: the GRPO stage's own scoring (rewards, advantages, reference log-probs) and its loss call
    cfg = GRPOConfig(model=str(policy), prompts="-", group_size=GROUP, prompts_per_step=len(prompts), beta=GRPO_BETA,
                     clip_eps=CLIP, scale="group", aggregation="sequence")
    cfg.sampling.max_new_tokens, cfg.sampling.gen_batch_size = GRPO_TOKENS, n
    cfg.train = TrainConfig(batch_size=n, grad_accum=1, device="cpu", precision="fp32")
    backend = FixedCompletions(tok, completions)
    inputs = Inputs(tok, [], [], prompts, [], load_reward(distinct_words), cfg)
    stage = CriticFree(cfg, inputs, model, model, Reference.frozen(ref_model), backend, Path(out_dir),
                       torch.device("cpu"))
    with torch.no_grad():
        batch = rollout(model, tok, repeated, max_new_tokens=GRPO_TOKENS, batch_size=n, seed=SEED, backend=backend)
        scored, _, _ = stage.score(batch)
        logp = response_logprobs(model, batch, cfg.sampling.temperature)  # what the update's first pass computes
        old = scored.old_logp if scored.old_logp is not None else logp  # on-policy: π_old is the sampling policy

        def tether_loss(old_logp, advantages):
            return float(grpo_loss(logp, old_logp, scored.ref_logp, advantages, batch.mask,
                                   max_tokens=GRPO_TOKENS, **stage.loss_args()).loss)

        t = {"rewards": scored.rewards, "advantages": scored.advantages,
             "ref_logp": (scored.ref_logp * batch.mask).sum(-1),
             "loss_on_policy": tether_loss(old, scored.advantages),
             "loss_old_is_ref": tether_loss(scored.ref_logp, scored.advantages)}
    t_prompt_ids = [prompt_ids(tok, p) for p in repeated]  # what the stage's sampler is given

    # TRL: GRPOTrainer with its sampler replaced by one that returns the same completions, row by row
    trl_tok = AutoTokenizer.from_pretrained(policy)
    messages = [hh_messages(p) for p in raw_prompts]
    args = TRLGRPOConfig(**trl_common(out_dir, n), num_generations=GROUP, num_generations_eval=GROUP,
                         max_completion_length=GRPO_TOKENS, beta=GRPO_BETA, epsilon=CLIP, loss_type="grpo",
                         scale_rewards="group", use_bias_correction_kl=False, temperature=1.0, shuffle_dataset=False)
    trainer = GRPOTrainer(model=AutoModelForCausalLM.from_pretrained(policy, dtype=torch.float32).eval(),
                          reward_funcs=[distinct_words], args=args,
                          train_dataset=Dataset.from_list([{"prompt": m} for m in messages]), processing_class=trl_tok)
    # TRL builds its reference from the policy's own path; swap in the shared one, with TRL's fused head as it adds it
    trl_ref = AutoModelForCausalLM.from_pretrained(ref, dtype=torch.float32).eval()
    add_fused_lm_head(trl_ref, temperature=args.temperature)
    trainer.ref_model = trl_ref
    fixed = [completions[p][g] for p in prompts for g in range(GROUP)]
    seen_prompt_ids = []

    def fixed_turn(prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        seen_prompt_ids.extend(list(x) for x in prompt_ids)
        return [list(c) for c in fixed], None

    trainer._generate_single_turn = fixed_turn
    with torch.no_grad():
        inputs_trl = trainer._generate_and_score_completions([{"prompt": m} for m in messages for _ in range(GROUP)])
        mask = inputs_trl["completion_mask"]
        r = {"rewards": list(trainer._logs["rewards"]["distinct_words"])[-n:], "advantages": inputs_trl["advantages"],
             "ref_logp": (inputs_trl["ref_per_token_logps"] * mask).sum(-1),
             "loss_on_policy": float(trainer._compute_loss(trainer.model, inputs_trl)),
             "loss_old_is_ref": float(trainer._compute_loss(
                 trainer.model, {**inputs_trl, "old_per_token_logps": inputs_trl["ref_per_token_logps"]})),
             "loss_on_policy_tether_adv": float(trainer._compute_loss(
                 trainer.model, {**inputs_trl, "advantages": scored.advantages.to(mask.device)})),
             "loss_old_is_ref_tether_adv": float(trainer._compute_loss(
                 trainer.model, {**inputs_trl, "old_per_token_logps": inputs_trl["ref_per_token_logps"],
                                 "advantages": scored.advantages.to(mask.device)}))}
    id_diffs = [{"row": k, **diff_ids(tok, a, b), "why": "UNEXPLAINED"}
                for k, (a, b) in enumerate(zip(t_prompt_ids, seen_prompt_ids)) if a != b]
    return {"tether": t, "trl": r, "prompt_id_differences": id_diffs,
            "completion_lengths": [len(c) for c in fixed],
            "completions_ended": [bool(c) and c[-1] == tok.eos_token_id for c in fixed],
            "prompts_rendered": prompts}


# --- the run ------------------------------------------------------------------------------


QUANTITIES = [  # key, label, vector scale ("element" or "max")
    ("sft_nll", "SFT token NLL (mean over response tokens; tether: the training loss, lm_loss)", "element"),
    ("sft_nll_eval", "SFT held-out NLL (tether: scoring.token_nll; TRL: compute_loss)", "element"),
    ("logp_chosen", "log π(chosen), per sequence", "element"),
    ("logp_rejected", "log π(rejected), per sequence", "element"),
    ("ref_logp_chosen", "log π_ref(chosen), per sequence", "element"),
    ("ref_logp_rejected", "log π_ref(rejected), per sequence", "element"),
    ("rm_reward_chosen", "RM reward r(chosen), per pair", "element"),
    ("rm_reward_rejected", "RM reward r(rejected), per pair", "element"),
    ("rm_loss", "RM Bradley–Terry loss", "element"),
    ("dpo_loss", f"DPO sigmoid loss (β = {BETA})", "element"),
    ("kto_kl_ref_point", "KTO reference point z0", "element"),
    ("kto_loss", f"KTO loss (β = {BETA})", "element"),
]
RM_POOLING = ("transformers' sequence classifier, which TRL's RewardTrainer calls, reads the score at the last token "
              "that is not the padding id; SmolLM2's padding id is its EOS <|im_end|>, so on tether's ids (ending with "
              "<|im_end|>) it would read the token before it. TRL's RM figures therefore run with a padding id no row "
              "ends with (model config and collator alike), which reads the last real token, as tether's raw_scores "
              "does; with its default padding id TRL's loss on tether's ids is")
GRPO_EPS = "advantages divide by the group's std + ε: ε = 1e-4 in TRL, 1e-6 in tether (tether.losses.grpo_advantages)"


def compare_all(t_on_t, trl_on_t, t_on_trl, trl_on_trl) -> list[dict]:
    rows = []
    for key, label, scale in QUANTITIES:
        row = {"key": key, "quantity": label,
               "tether_ids": {"tether": as_list(t_on_t[key]), "trl": as_list(trl_on_t[key])},
               "trl_ids": {"tether": as_list(t_on_trl[key]), "trl": as_list(trl_on_trl[key])}}
        row["tether_ids"]["rel_diff"] = rel_diff(t_on_t[key], trl_on_t[key], scale)
        row["trl_ids"]["rel_diff"] = rel_diff(t_on_trl[key], trl_on_trl[key], scale)
        row["as_rendered_rel_diff"] = rel_diff(t_on_t[key], trl_on_trl[key], scale)
        if key.startswith("rm_"):  # TRL's scores with its default padding id (the EOS), for the record
            row["tether_ids"]["trl_default_pad"] = as_list(trl_on_t[key + "_default_pad"])
            row["tether_ids"]["trl_default_pad_rel_diff"] = rel_diff(t_on_t[key], trl_on_t[key + "_default_pad"], scale)
        row["pass"] = row["trl_ids"]["rel_diff"] <= TOL and row["tether_ids"]["rel_diff"] <= TOL
        rows.append(row)
    return rows


def grpo_rows(g: dict) -> list[dict]:
    t, r = g["tether"], g["trl"]
    spec = [("rewards", "GRPO rewards", t["rewards"], r["rewards"], "element", None),
            ("advantages", "GRPO advantages, mean magnitude (each framework's own)", t["advantages"], r["advantages"],
             "max", GRPO_EPS),
            ("ref_logp", "GRPO log π_ref(completion), per completion", t["ref_logp"], r["ref_logp"], "element", None),
            ("loss_on_policy", f"GRPO loss, on-policy (β = {GRPO_BETA}; = β·KL: the advantage term sums to 0 in a "
             "group; tether's advantages in both)",
             t["loss_on_policy"], r["loss_on_policy_tether_adv"], "element", None),
            ("loss_old_is_ref", "GRPO loss, π_old = π_ref (ratios ≠ 1, clipping; tether's advantages in both)",
             t["loss_old_is_ref"], r["loss_old_is_ref_tether_adv"], "element", None),
            ("loss_on_policy_own_adv", "GRPO loss, on-policy, each framework's own advantages",
             t["loss_on_policy"], r["loss_on_policy"], "element", GRPO_EPS),
            ("loss_old_is_ref_own_adv", "GRPO loss, π_old = π_ref, each framework's own advantages",
             t["loss_old_is_ref"], r["loss_old_is_ref"], "element", GRPO_EPS)]
    rows = []
    for key, label, a, b, scale, why in spec:
        d = rel_diff(a, b, scale)
        row = {"key": f"grpo_{key}", "quantity": label, "tether": as_list(a), "trl": as_list(b), "rel_diff": d,
               "pass": d <= TOL or why is not None}
        if why:
            row["explained"] = why
        rows.append(row)
    return rows


def versions() -> dict:
    import platform

    import torch
    import transformers
    import trl

    def git(*cmd):
        try:
            return subprocess.run(["git", *cmd], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return None

    status = git("status", "--porcelain", "--", "tether")
    return {"torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__,
            "tether_commit": git("rev-parse", "HEAD"), "tether_worktree_modified": bool(status),
            "python": platform.python_version(), "threads": torch.get_num_threads()}


def fmt(v) -> str:
    return f"{v:.6g}"


def markdown(res: dict) -> str:
    v, s = res["versions"], res["settings"]
    lines = [f"# tether vs TRL {v['trl']}: parity on SmolLM2-135M-Instruct ({res['date']})", "",
             f"torch {v['torch']}, transformers {v['transformers']}, TRL {v['trl']}, tether {v['tether_commit']}"
             f"{' (with uncommitted changes under tether/)' if v['tether_worktree_modified'] else ''}; "
             f"CPU fp32, {v['threads']} thread(s). {s['pairs']} HH-RLHF harmless-base test pairs (rows "
             f"{res['data']['rows']}); tolerance {TOL:g} relative. "
             f"Overall: **{'PASS' if res['pass'] else 'FAIL'}**.", "",
             "Each quantity on the same token ids from both frameworks (tether's ids, then TRL's), and each on its own "
             "ids (\"as rendered\"). Vectors show their mean; the relative difference is the largest element-wise one "
             "(advantages: over the largest magnitude).", "",
             "| quantity | tether (tether ids) | TRL (tether ids) | rel. diff | tether (TRL ids) | TRL (TRL ids) | "
             "rel. diff | as rendered | pass |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for row in res["quantities"]:
        a, b = row["tether_ids"], row["trl_ids"]
        mark = "*" if "trl_default_pad" in a else ""
        lines.append(f"| {row['quantity']} | {fmt(summary(a['tether']))} | {fmt(summary(a['trl']))} | "
                     f"{a['rel_diff']:.1e}{mark} | {fmt(summary(b['tether']))} | {fmt(summary(b['trl']))} | "
                     f"{b['rel_diff']:.1e} | {row['as_rendered_rel_diff']:.1e} | {'yes' if row['pass'] else 'NO'} |")
    nl = res["newline_after_eos_logp"]
    rm = next(q for q in res["quantities"] if q["key"] == "rm_loss")["tether_ids"]
    lines += ["", f"\\* {RM_POOLING} {fmt(summary(rm['trl_default_pad']))} "
              f"(rel. diff {rm['trl_default_pad_rel_diff']:.1e}).",
              "", "As rendered, TRL's responses hold one more token, the '\\n' the template writes after <|im_end|> "
              "(see below): it adds log π('\\n' | ... <|im_end|>) to each sequence log-prob (tether's own scoring "
              "of it: mean "
              f"{summary(nl):.2g}, smallest {min(nl):.2g} nats), so the log-probs, DPO and KTO barely move, while "
              "each row's NLL mean gains a nearly free token (the SFT difference). The RM reads TRL's score at that "
              "'\\n' and tether's at <|im_end|>: different tokens, different scores.",
              "", f"GRPO: {s['grpo_prompts']} prompts × {s['group']} completions of at most {s['grpo_tokens']} tokens "
              "(the same ids in both; sampled once by tether).", "",
              "| quantity | tether | TRL | rel. diff | pass |", "|---|---:|---:|---:|---|"]
    for row in res["grpo"]["rows"]:
        note = " (explained)" if "explained" in row and row["rel_diff"] > TOL else ""
        absolute = row["key"] == "grpo_advantages"  # they sum to 0 in each group
        lines.append(f"| {row['quantity']} | {fmt(summary(row['tether'], absolute))} | "
                     f"{fmt(summary(row['trl'], absolute))} | {row['rel_diff']:.1e} | "
                     f"{'yes' if row['pass'] else 'NO'}{note} |")
    explained = {row["explained"] for row in res["grpo"]["rows"] if "explained" in row and row["rel_diff"] > TOL}
    lines += [""] + [f"Explained: {e}." for e in sorted(explained)]
    lines += ["", "## Token ids after the chat template", ""]
    r = res["rendering"]
    lines.append(f"tether's load_preferences rendered the HH transcripts as chat turns: "
                 f"{r['tether_rendered_as_chat']}.")
    for kind in ("pairs", "sft", "kto", "rm"):
        diffs = r["differences"][kind]
        whys: dict[str, int] = {}
        for d in diffs:
            whys[d["why"]] = whys.get(d["why"], 0) + 1
        listed = "; ".join(f"{n}× {why}" for why, n in whys.items()) or "identical"
        lines.append(f"- {kind}: {len(diffs)} difference(s): {listed}")
    g = res["grpo"]["prompt_id_differences"]
    lines.append(f"- GRPO prompts: {len(g)} difference(s){': UNEXPLAINED' if g else ' (identical)'}")
    lines.append(f"- KTO's mismatched pairs for z0 (prompt i with completion i − 1): "
                 f"{'the same in both' if r['kto_kl_pairing_equal'] else 'DIFFERENT'}")
    sp = r["string_path"]
    moved = [e for e in sp if not e["prompt_equal"]]
    lines += ["", f"Without a chat template (plain HH strings, TRL's string path): {len(moved)} of {len(sp)} prompts "
              "differ" + (": " + "; ".join(f"pair {e['pair']}: {e['why']}" for e in moved) if moved else "") + "."]
    unexplained = res["unexplained_id_differences"]
    lines += ["", f"Unexplained token-id differences: {unexplained}."]
    return "\n".join(lines) + "\n"


def run(a) -> int:
    import torch

    import datasets
    import transformers

    logging.disable(logging.WARNING)
    warnings.filterwarnings("ignore")
    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    os.environ["TETHER_CACHE"] = tempfile.mkdtemp(prefix="parity-cache-")  # reference log-probs: computed, not reused
    t0 = time.time()

    from tether.models import load_model, load_tokenizer
    from tether.models.reward import load_reward_model

    policy, ref, rm = prepare_models(Path(a.cache))
    tok = load_tokenizer(policy)
    raw = read_rows(Path(a.data), SCAN_ROWS)
    keep, skipped = select_pairs(raw, tok, a.pairs)
    rows = [raw[i] for i in keep]
    print(f"pairs: rows {keep} (skipped {len(skipped)}) [{time.time() - t0:.0f}s]", flush=True)

    ids_t = tether_ids(tok, rows)
    work = tempfile.mkdtemp(prefix="parity-trl-")
    trainers = trl_trainers(policy, ref, rm, rows, work)
    ids_r = trl_ids(trainers)
    rendering = {"tether_rendered_as_chat": ids_t["rendered_as_chat"],
                 "differences": compare_rendering(tok, ids_t, ids_r),
                 "string_path": string_path_rendering(tok, trainers["dpo"], rows),
                 # TRL's KL completions for KTO: its completions rotated by one, as tether's mismatched_rows pairs them
                 "kto_kl_pairing_equal": ids_r["kto_kl_completions"] == [
                     e["completion"] for e in ids_r["kto"][-1:] + ids_r["kto"][:-1]]}
    print(f"token ids compared [{time.time() - t0:.0f}s]", flush=True)

    model, rm_model = load_model(policy).eval(), load_reward_model(rm, tok).eval()
    t_on_t = tether_quantities(model, rm_model, ref, tok, ids_t)
    print(f"tether on tether's ids [{time.time() - t0:.0f}s]", flush=True)
    t_on_r = tether_quantities(model, rm_model, ref, tok, ids_r)
    print(f"tether on TRL's ids [{time.time() - t0:.0f}s]", flush=True)
    r_on_t = trl_quantities(trainers, ids_t)
    print(f"TRL on tether's ids [{time.time() - t0:.0f}s]", flush=True)
    r_on_r = trl_quantities(trainers, ids_r)
    print(f"TRL on TRL's ids [{time.time() - t0:.0f}s]", flush=True)
    del trainers, model, rm_model

    g = grpo(policy, ref, [hh_prompt(r["chosen"]) for r in rows[: a.grpo_prompts]], work)
    print(f"GRPO [{time.time() - t0:.0f}s]", flush=True)

    quantities = compare_all(t_on_t, r_on_t, t_on_r, r_on_r)
    # tether's log-probs on TRL's ids less those on its own: the log-prob of the '\n' TRL's responses end with
    newline_logp = [x - y for x, y in zip(as_list(t_on_r["logp_chosen"]) + as_list(t_on_r["logp_rejected"]),
                                          as_list(t_on_t["logp_chosen"]) + as_list(t_on_t["logp_rejected"]))]
    g_rows = grpo_rows(g)
    unexplained = sum(d["why"] == "UNEXPLAINED" for kind in rendering["differences"].values() for d in kind)
    unexplained += sum(e.get("why") == "UNEXPLAINED" for e in rendering["string_path"])
    unexplained += len(g["prompt_id_differences"]) + (not rendering["kto_kl_pairing_equal"])
    res = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "versions": versions(),
           "settings": {"pairs": a.pairs, "max_tokens": MAX_TOKENS, "beta": BETA, "grpo_beta": GRPO_BETA, "clip": CLIP,
                        "group": GROUP, "grpo_prompts": a.grpo_prompts, "grpo_tokens": GRPO_TOKENS,
                        "reference_noise": NOISE, "seed": SEED, "tolerance": TOL, "device": "cpu", "dtype": "float32"},
           "data": {"source": str(a.data), "rows": keep, "skipped": skipped,
                    "tether_records": ids_t["records"], "trl_conversations": trainers_split(rows)},
           "rendering": rendering, "quantities": quantities,
           "grpo": {"rows": g_rows, **{k: v for k, v in g.items() if k not in ("tether", "trl")}},
           "unexplained_id_differences": unexplained, "seconds": time.time() - t0,
           "newline_after_eos_logp": newline_logp}
    res["pass"] = all(q["pass"] for q in quantities) and all(q["pass"] for q in g_rows) and unexplained == 0
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"parity_trl-{time.strftime('%Y%m%d')}"
    Path(f"{stem}.json").write_text(json.dumps(res, indent=1, ensure_ascii=False, default=str))
    md = markdown(res)
    Path(f"{stem}.md").write_text(md)
    print(md)
    print(f"written: {stem}.json and .md")
    return 0 if res["pass"] else 1


def trainers_split(rows: list[dict]) -> list[dict]:
    """The conversations TRL was given (for the record)."""
    return [{"chosen": hh_messages(r["chosen"]), "rejected": hh_messages(r["rejected"])} for r in rows]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=PAIRS)
    ap.add_argument("--grpo-prompts", type=int, default=GRPO_PROMPTS)
    ap.add_argument("--data", default=str(DATA.resolve()))
    ap.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "parity"),
                    help="folder for the imported model, the reference and the reward model (reused when present)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    a = ap.parse_args()
    if not trl_ready():
        sys.exit(relaunch_in_bench_venv())
    sys.exit(run(a))


if __name__ == "__main__":
    main()
