"""Stage 0: causal language modelling on text. L = −mean over all tokens of log π(x_t | x_<t).

With ``--model tiny`` (the default) tether first trains a byte-level BPE tokenizer on the corpus
and builds the tiny Llama-style model (tether.models.tiny); with a path or hub name it continues
pretraining that model. Text is packed into rows of ``max_len`` tokens, documents separated by EOS;
a document longer than a row continues into the next one (nothing is cut away).
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from tether.config import check, group, opt, to_dict
from tether.data import fingerprint, load_sft, split_eval
from tether.data.collate import Encoded, OverflowCount, encode_sft, nothing_left, pack
from tether.errors import ConfigError
from tether.loop import TrainConfig
from tether.models import TinyConfig, build_tiny, count_parameters, load_model, load_tokenizer, train_tokenizer
from tether.trainers.artifact import check_output, data_info, prepare_output, write_artifact
from tether.trainers.sft import fit_causal_lm

log = logging.getLogger("tether.pretrain")


def _pretrain_defaults() -> TrainConfig:
    return TrainConfig(steps=600, batch_size=16, lr=3e-3, warmup_steps=30, weight_decay=0.01, eval_every=100, save_every=200)


@dataclass
class PretrainConfig:
    model: str = opt("tiny", "tiny (build the tiny default and its tokenizer from the corpus), a folder or a hub name")
    data: str = opt("", "text corpus: records with a 'text' field (or prompt/completion, trained on in full)")
    eval_fraction: float = opt(0.05, "fraction of documents held out for evaluation")
    out: str = opt("runs/pretrain", "output folder")
    max_len: int = opt(128, "row length in tokens (documents are packed into rows)")
    resume: bool = opt(False, "continue from the latest checkpoint in out")
    overwrite: bool = opt(False, "replace the run tether wrote in out, once the new one is complete")
    tiny: TinyConfig = group(TinyConfig, "sizes of the tiny default")
    train: TrainConfig = group(_pretrain_defaults)

    def validate(self) -> None:
        if not self.data:
            raise ConfigError("--data is required")
        check("eval_fraction", self.eval_fraction, ge=0, lt=1)
        check("max_len", self.max_len, ge=2, integer=True)
        self.tiny.validate()
        if self.model == "tiny" and self.max_len > self.tiny.max_positions:
            raise ConfigError(f"max_len={self.max_len} exceeds the tiny model's max_positions={self.tiny.max_positions}")
        self.train.validate()


def unigram_entropy(rows: list[Encoded]) -> float:
    """Entropy (nats) of the corpus's token frequencies: the loss of the best model that ignores context."""
    counts = Counter(t for r in rows for t in r.input_ids)
    n = sum(counts.values())
    return -sum(c / n * math.log(c / n) for c in counts.values())


def corpus_rows(records: list, tokenizer, max_len: int) -> list[Encoded]:
    """Every document in full (+ EOS), trained on throughout, packed into rows of ``max_len`` tokens.

    Documents are not truncated to ``max_len`` first: packing splits a long one across rows.
    """
    docs, _ = encode_sft(records, tokenizer, max_len=2**62, train_on_prompt=True)
    return pack(docs, max_len)


def run_pretrain(cfg: PretrainConfig) -> Path:
    """Pretrain (or continue pretraining) a causal LM on ``cfg.data``; returns the output folder."""
    cfg.validate()
    torch.manual_seed(cfg.train.seed)
    records = load_sft(cfg.data)
    train_records, eval_records = split_eval(records, cfg.eval_fraction, cfg.train.seed)
    if not train_records:
        raise nothing_left(cfg.data, "documents", 0, OverflowCount(), cfg.max_len, "", held_out=len(eval_records))
    if cfg.model == "tiny":
        tokenizer = train_tokenizer((r.prompt + r.completion for r in train_records), cfg.tiny.vocab_size,
                                    cfg.tiny.split_digits)
    else:
        tokenizer = load_tokenizer(cfg.model)
    rows, eval_rows = corpus_rows(train_records, tokenizer, cfg.max_len), corpus_rows(eval_records, tokenizer, cfg.max_len)
    entropy = unigram_entropy(rows)

    check_output(Path(cfg.out), resume=cfg.resume, overwrite=cfg.overwrite)
    model = build_tiny(tokenizer, cfg.tiny, seed=cfg.train.seed) if cfg.model == "tiny" else load_model(cfg.model)
    out = prepare_output(Path(cfg.out), resume=cfg.resume, overwrite=cfg.overwrite)  # inputs and model have loaded
    log.info("pretraining a %d-parameter model on %d rows of %d tokens", count_parameters(model), len(rows), cfg.max_len)
    result = fit_causal_lm(model, tokenizer, rows, eval_rows, cfg.train, out, resume=cfg.resume, desc="pretrain",
                           run_config=to_dict(cfg))
    metrics = {**result.train, **result.eval, "data/unigram_entropy": entropy, "model/parameters": count_parameters(model),
               "time/seconds": result.seconds}
    data = {"train": data_info(cfg.data, train_records, fingerprint(train_records)),
            "eval": data_info(f"{cfg.data} (held out)", eval_records, fingerprint(eval_records))}
    return write_artifact(out, stage="pretrain", cfg=cfg, model=model, tokenizer=tokenizer, data=data, metrics=metrics)
