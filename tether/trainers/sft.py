"""Stage 1: supervised fine-tuning. L = −mean over response tokens of log π(y_t | x, y_<t).

The prompt is masked out of the loss; ``--packing`` concatenates examples into full rows.
Evaluation reports held-out NLL per response token and its perplexity.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from tether.config import check, group, opt, to_dict
from tether.data import chat_tokenizer, fingerprint, load_sft, split_eval
from tether.data.collate import OVERFLOW_CHOICES, Encoded, encode_sft, nothing_left, pack, pad
from tether.loop import TrainConfig, TrainResult, train
from tether.errors import ConfigError
from tether.losses import labelled_tokens, summed_nll
from tether.models import LoraConfig, apply_lora, count_parameters, load_model, load_tokenizer
from tether.scoring import labelled_logprobs, token_nll
from tether.trainers.artifact import check_output, data_info, prepare_output, write_artifact

log = logging.getLogger("tether.sft")


@dataclass
class SFTConfig:
    model: str = opt("", "model to fine-tune: an earlier stage's folder, a local path or a hub name")
    data: str = opt("", "SFT data: JSONL/JSON/CSV/Parquet file, saved dataset folder or hub name")
    eval_data: str = opt("", "held-out SFT data (empty: hold out eval_fraction of data)")
    eval_fraction: float = opt(0.05, "fraction of data held out for evaluation when eval_data is empty")
    out: str = opt("runs/sft", "output folder")
    max_len: int = opt(256, "longest sequence in tokens")
    skip_invalid: bool = opt(False, "skip (and count) invalid records instead of stopping at the first")
    chat_template: bool = opt(True, "render records with the model's chat template when it has one (HH-RLHF "
                                    "transcripts become its turns); --no-chat-template: strings as given")
    overflow: str = opt("truncate", "longer examples: truncate | drop | error (always counted in the log)")
    packing: bool = opt(False, "concatenate examples into rows of max_len tokens")
    resume: bool = opt(False, "continue from the latest checkpoint in out")
    overwrite: bool = opt(False, "replace the run tether wrote in out, once the new one is complete")
    lora: LoraConfig = group(LoraConfig)
    train: TrainConfig = group(TrainConfig)

    def validate(self) -> None:
        if not self.model or not self.data:
            raise ConfigError("--model and --data are required")
        if self.overflow not in OVERFLOW_CHOICES:
            raise ConfigError(f"overflow must be one of {OVERFLOW_CHOICES}, got {self.overflow!r}")
        check("eval_fraction", self.eval_fraction, ge=0, lt=1)
        check("max_len", self.max_len, ge=2, integer=True)
        self.lora.validate()
        self.train.validate()


# --- shared with pretraining --------------------------------------------------------------


def lm_loss(model, batch: dict) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """The summed NLL of a micro-batch's labelled tokens (the step divides by all of its tokens: lm_count)."""
    nll = summed_nll(*labelled_logprobs(model, batch["input_ids"], batch["attention_mask"], batch["labels"],
                                        summed=True))
    return {"labelled": nll.total}, {"tokens": float(batch["attention_mask"].sum())}


def lm_count(batch: dict) -> dict[str, float]:
    return {"labelled": float(labelled_tokens(batch["labels"]))}


def eval_nll(model, rows: list[Encoded], pad_id: int, batch_size: int, precision: str = "fp32") -> dict[str, float]:
    """Held-out NLL per labelled token (token-weighted over the whole set) and perplexity (tether.scoring.token_nll).

    Under torchrun each rank scores its block of rows and the sums are gathered.
    """
    total, count = token_nll(model, rows, pad_id, batch_size=batch_size, precision=precision)
    nll = total / max(count, 1)
    return {"eval/loss": nll, "eval/perplexity": math.exp(min(nll, 50.0))}


def fit_causal_lm(model, tokenizer, rows: list[Encoded], eval_rows: list[Encoded], cfg: TrainConfig,
                  out: Path, *, resume: bool, desc: str, run_config: dict | None = None) -> TrainResult:
    """Minimise NLL of ``rows`` with the shared loop, evaluating on ``eval_rows``; ``run_config`` is the
    stage's config as a dict, kept in every checkpoint (see tether.loop.train)."""
    pad_id = tokenizer.pad_token_id
    return train(
        model, len(rows), lambda idx: pad([rows[i] for i in idx], pad_id), lm_loss, cfg, out, count=lm_count,
        lengths=[len(r.input_ids) for r in rows],
        eval_fn=(lambda m: eval_nll(m, eval_rows, pad_id, cfg.score_rows())) if eval_rows else None,
        resume=resume, desc=desc, run_config=run_config,
    )


# --- the stage ----------------------------------------------------------------------------


def run_sft(cfg: SFTConfig) -> Path:
    """Fine-tune ``cfg.model`` on ``cfg.data``; returns the output folder."""
    cfg.validate()
    torch.manual_seed(cfg.train.seed)
    tokenizer = load_tokenizer(cfg.model)
    records = load_sft(cfg.data, tokenizer=chat_tokenizer(tokenizer, cfg), skip_invalid=cfg.skip_invalid)
    if cfg.eval_data:
        eval_records = load_sft(cfg.eval_data, tokenizer=chat_tokenizer(tokenizer, cfg), skip_invalid=cfg.skip_invalid)
        train_records = records
    else:
        train_records, eval_records = split_eval(records, cfg.eval_fraction, cfg.train.seed)
    rows, overflow = encode_sft(train_records, tokenizer, cfg.max_len, cfg.overflow)
    eval_rows, _ = encode_sft(eval_records, tokenizer, cfg.max_len, "truncate")
    if cfg.packing:
        rows = pack(rows, cfg.max_len)
    if not rows:
        raise nothing_left(cfg.data, "examples", len(train_records), overflow, cfg.max_len, cfg.overflow,
                           held_out=0 if cfg.eval_data else len(eval_records))

    check_output(Path(cfg.out), resume=cfg.resume, overwrite=cfg.overwrite)
    model = apply_lora(load_model(cfg.model), cfg.lora)
    out = prepare_output(Path(cfg.out), resume=cfg.resume, overwrite=cfg.overwrite)  # inputs and model have loaded
    log.info("SFT of %s (%d trainable parameters) on %d rows", cfg.model, count_parameters(model, True), len(rows))
    result = fit_causal_lm(model, tokenizer, rows, eval_rows, cfg.train, out, resume=cfg.resume, desc="sft",
                           run_config=to_dict(cfg))
    metrics = {**result.train, **result.eval, "data/truncated": overflow.truncated, "data/dropped": overflow.dropped,
               "time/seconds": result.seconds}
    data = {"train": data_info(cfg.data, train_records, fingerprint(train_records))}
    if eval_records:
        data["eval"] = data_info(cfg.eval_data or f"{cfg.data} (held out)", eval_records, fingerprint(eval_records))
    return write_artifact(out, stage="sft", cfg=cfg, model=model, tokenizer=tokenizer, data=data, metrics=metrics)
