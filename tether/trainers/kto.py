"""Kahneman–Tversky optimisation on unpaired feedback (Ethayarajh et al. 2024).

    r(x, y) = log π(y|x) − log π_ref(y|x),    z0 = max(0, mean over the batch of r(x_i, y_{i−1})), detached
    L = λ_D (1 − σ(β(r − z0)))  for a desirable y,   λ_U (1 − σ(β(z0 − r)))  for an undesirable y

The loss is tether.losses.kto_loss; this file gathers its inputs. Data comes from
tether.data.load_feedback ({"prompt","completion","label"} rows; a preference pair gives one
desirable and one undesirable record).

The reference point z0 is estimated per micro-batch as in the paper (Sec. 4.1): each prompt is
paired with the completion of the previous example in the batch (a shift by one), and z0 is the
mean log-ratio over those mismatched pairs, clamped at 0 and detached. Since it carries no
gradient, the mismatched rows go through a no-grad forward of the policy. Their reference
log-probs, like those of every matched row, are computed once before training: the data order
is a pure function of (seed, micro-batch), so every micro-batch the run will see is known in
advance. They are cached as DPO's (tether.scoring.cached_reference; a changed seed, batch size or step count
is a different key). Held-out evaluation estimates z0 over the whole held-out set the same way.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from tether import distributed, scoring
from tether.config import check, check_fields, group, opt, to_dict
from tether.data import chat_tokenizer, fingerprint, load_feedback, split_eval
from tether.data.collate import (
    OVERFLOW_CHOICES,
    Encoded,
    EncodedFeedback,
    encode_feedback,
    feedback_row,
    nothing_left,
    pad,
)
from tether.errors import ConfigError
from tether.instruments.kl import HeldOutKL
from tether.loop import DataOrder, TrainConfig, train
from tether.losses import KTOOutput, kto_loss, sequence_sum
from tether.models import LoraConfig, apply_lora, count_parameters, load_model, load_tokenizer
from tether.trainers.artifact import check_output, data_info, prepare_output, write_artifact

log = logging.getLogger("tether.kto")


def _kto_defaults() -> TrainConfig:
    return TrainConfig(steps=200, batch_size=16, lr=5e-5, warmup_steps=10, eval_every=50, save_every=100)


@dataclass
class KTOConfig:
    model: str = opt("", "policy to start from: an SFT folder, a local path or a hub name")
    ref: str = opt("", "reference model (empty: the same as --model)")
    data: str = opt("", "feedback data (prompt/completion/label; preference pairs are split into both labels)")
    eval_data: str = opt("", "held-out feedback data (empty: hold out eval_fraction of data)")
    eval_fraction: float = opt(0.05, "fraction of examples held out when eval_data is empty")
    out: str = opt("runs/kto", "output folder")
    max_len: int = opt(256, "longest prompt + completion in tokens")
    skip_invalid: bool = opt(False, "skip (and count) invalid records instead of stopping at the first")
    chat_template: bool = opt(True, "render records with the model's chat template when it has one (HH-RLHF "
                                    "transcripts become its turns); --no-chat-template: strings as given")
    overflow: str = opt("truncate", "longer examples: truncate | drop | error (always counted in the log)")
    beta: float = opt(0.1, "β: strength of the tie to the reference")
    desirable_weight: float = opt(1.0, "λ_D, weight of desirable examples")
    undesirable_weight: float = opt(1.0, "λ_U, weight of undesirable examples")
    kl_prompts: int = opt(64, "held-out prompts sampled at every evaluation to estimate KL(π‖π_ref) (0: skip)")
    kl_max_new_tokens: int = opt(64, "longest sample for the KL estimate")
    resume: bool = opt(False, "continue from the latest checkpoint in out")
    overwrite: bool = opt(False, "replace the run tether wrote in out, once the new one is complete")
    lora: LoraConfig = group(LoraConfig)
    train: TrainConfig = group(_kto_defaults)

    def validate(self) -> None:
        if not self.model or not self.data:
            raise ConfigError("--model and --data are required")
        if self.overflow not in OVERFLOW_CHOICES:
            raise ConfigError(f"overflow must be one of {OVERFLOW_CHOICES}, got {self.overflow!r}")
        check_fields(self, "beta desirable_weight undesirable_weight", gt=0)
        check("max_len", self.max_len, ge=2, integer=True)
        check("kl_prompts", self.kl_prompts, ge=0, integer=True, note="0: skip")
        check("kl_max_new_tokens", self.kl_max_new_tokens, ge=1, integer=True)
        if self.train.batch_size < 2:
            raise ConfigError(f"--batch-size must be at least 2 for KTO (its reference point comes from mismatched "
                              f"pairs), got {self.train.batch_size}")
        check("eval_fraction", self.eval_fraction, ge=0, lt=1)
        self.lora.validate()
        self.train.validate()


def matched_rows(examples: list[EncodedFeedback], max_len: int) -> list[Encoded]:
    return [feedback_row(e.prompt, e.completion, max_len) for e in examples]


def mismatched_rows(examples: list[EncodedFeedback], max_len: int) -> list[Encoded]:
    """Prompt i with the completion of example i − 1 (cyclically): the pairs z0 is estimated on."""
    return [feedback_row(e.prompt, examples[j - 1].completion, max_len) for j, e in enumerate(examples)]


def kto_metrics(out: KTOOutput, policy_logps: torch.Tensor, labels: torch.Tensor, z0: torch.Tensor) -> dict[str, float]:
    """Means over desirable and undesirable examples (a side absent from the batch is left out)."""
    m = {"kl_ref_point": z0.item()}
    if labels.any():
        m["reward_desirable"] = out.chosen_rewards.mean().item()
        m["logp_desirable"] = policy_logps[labels].detach().mean().item()
    if (~labels).any():
        m["reward_undesirable"] = out.rejected_rewards.mean().item()
        m["logp_undesirable"] = policy_logps[~labels].detach().mean().item()
    if labels.any() and (~labels).any():
        m["reward_margin"] = m["reward_desirable"] - m["reward_undesirable"]
    return m


def kto_step(model, batch: dict, cfg: KTOConfig) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """One micro-batch. ``batch``: input_ids, attention_mask, labels (B, T) of matched rows and
    kl_input_ids, kl_attention_mask, kl_labels (B, T') of mismatched rows; ref, ref_kl, label (B,)."""
    policy = sequence_sum(*scoring.labelled_logprobs(model, batch["input_ids"], batch["attention_mask"],
                                                     batch["labels"]))  # (B,)
    with torch.no_grad():  # z0 is detached: its rows need no graph
        kl = sequence_sum(*scoring.labelled_logprobs(model, batch["kl_input_ids"], batch["kl_attention_mask"],
                                                     batch["kl_labels"]))  # (B,)
        z0 = (kl - batch["ref_kl"]).mean().clamp(min=0)  # ()
    labels = batch["label"].bool()
    out = kto_loss(policy, batch["ref"], labels, z0, cfg.beta, cfg.desirable_weight, cfg.undesirable_weight)
    # summed over examples (the step divides by all of them); z0 is this micro-batch's own estimate
    return {"rows": out.losses.sum()}, {**kto_metrics(out, policy, labels, z0), "tokens": float(batch["attention_mask"].sum())}


def run_kto(cfg: KTOConfig) -> Path:
    """Train ``cfg.model`` on unpaired feedback with KTO; returns the output folder."""
    cfg.validate()
    torch.manual_seed(cfg.train.seed)
    ref = cfg.ref or cfg.model
    tokenizer = load_tokenizer(cfg.model)
    records = load_feedback(cfg.data, tokenizer=chat_tokenizer(tokenizer, cfg), skip_invalid=cfg.skip_invalid)
    if cfg.eval_data:
        eval_records = load_feedback(cfg.eval_data, tokenizer=chat_tokenizer(tokenizer, cfg), skip_invalid=cfg.skip_invalid)
        train_records = records
    else:
        train_records, eval_records = split_eval(records, cfg.eval_fraction, cfg.train.seed)
    examples, overflow = encode_feedback(train_records, tokenizer, cfg.max_len, cfg.overflow)
    eval_examples, _ = encode_feedback(eval_records, tokenizer, cfg.max_len, "truncate")
    if len(examples) < 2:  # z0 compares each example with another one's completion
        raise nothing_left(cfg.data, "examples", len(train_records), overflow, cfg.max_len, cfg.overflow,
                           held_out=0 if cfg.eval_data else len(eval_records), need=2)

    world = distributed.env().world_size
    if world > 1 and cfg.train.grad_accum % world:  # z0 is a statistic of a whole micro-batch
        raise ValueError(f"under torchrun KTO trains whole micro-batches on each rank (its reference point z0 is "
                         f"estimated per micro-batch): --grad-accum must be a multiple of the world size {world}")
    check_output(Path(cfg.out), resume=cfg.resume, overwrite=cfg.overwrite)
    pad_id, n, m, mx = tokenizer.pad_token_id, len(examples), len(eval_examples), cfg.max_len
    order = DataOrder(n, cfg.train.batch_size, cfg.train.seed)
    micro = list(dict.fromkeys(tuple(order.indices(k)) for k in range(cfg.train.steps * cfg.train.grad_accum)))
    where = {idx: k * cfg.train.batch_size for k, idx in enumerate(micro)}  # micro-batch -> offset of its KL rows
    kl_rows = [r for idx in micro for r in mismatched_rows([examples[i] for i in idx], mx)]
    rows = matched_rows(examples, mx) + matched_rows(eval_examples, mx) + mismatched_rows(eval_examples, mx) + kl_rows
    reference, hit = scoring.cached_reference(ref, rows, pad_id, cfg.train)
    ref_train, ref_eval, ref_eval_kl, ref_kl = reference.cached.split([n, m, m, len(kl_rows)])

    model = apply_lora(load_model(cfg.model), cfg.lora)
    kl = HeldOutKL(cfg, tokenizer, eval_records)  # eval/kl at every evaluation (its reference is checked here)
    out = prepare_output(Path(cfg.out), resume=cfg.resume, overwrite=cfg.overwrite)  # inputs and models have loaded
    log.info("KTO (β=%g) of %s against %s: %d trainable parameters, %d examples (%d desirable)", cfg.beta,
             cfg.model, ref, count_parameters(model, True), n, sum(e.label for e in examples))

    def collate(idx: list[int]) -> dict:
        batch_examples = [examples[i] for i in idx]
        kl = pad(mismatched_rows(batch_examples, mx), pad_id)
        k = where[tuple(idx)]
        return {**pad(matched_rows(batch_examples, mx), pad_id),
                **{f"kl_{name}": t for name, t in kl.items()},
                "ref": ref_train[idx], "ref_kl": ref_kl[k : k + len(idx)],
                "label": torch.tensor([e.label for e in batch_examples])}

    def eval_fn(model_) -> dict[str, float]:
        bs = cfg.train.score_rows()
        logps = scoring.sequence_logprobs(model_, matched_rows(eval_examples, mx) + mismatched_rows(eval_examples, mx),
                                          pad_id, batch_size=bs, precision=cfg.train.precision)
        policy, policy_kl = logps.split([m, m])
        z0 = (policy_kl - ref_eval_kl).mean().clamp(min=0)
        labels = torch.tensor([e.label for e in eval_examples])
        o = kto_loss(policy, ref_eval, labels, z0, cfg.beta, cfg.desirable_weight, cfg.undesirable_weight)
        return {"eval/loss": o.loss.item(), **{f"eval/{k}": v for k, v in kto_metrics(o, policy, labels, z0).items()},
                **kl(model_)}

    result = train(model, n, collate, lambda m_, b: kto_step(m_, b, cfg), cfg.train, out,
                   count=lambda b: {"rows": float(len(b["label"]))},
                   eval_fn=eval_fn if m >= 2 else None, resume=cfg.resume, desc="kto",
                   run_config=to_dict(cfg))
    metrics = {**result.train, **result.eval, "ref/cache_hit": float(hit), "data/truncated": overflow.truncated,
               "data/dropped": overflow.dropped, "time/seconds": result.seconds}
    data = {"train": data_info(cfg.data, train_records, fingerprint(train_records))}
    if eval_records:
        data["eval"] = data_info(cfg.eval_data or f"{cfg.data} (held out)", eval_records, fingerprint(eval_records))
    return write_artifact(out, stage="kto", cfg=cfg, model=model, tokenizer=tokenizer, data=data, metrics=metrics)
