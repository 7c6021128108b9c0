"""Direct preference optimisation: DPO, cDPO, robust DPO, IPO, hinge (SLiC) and SimPO.

    h = [log π(y_w|x) − log π_ref(y_w|x)] − [log π(y_l|x) − log π_ref(y_l|x)]
    sigmoid: −log σ(βh) (Rafailov et al. 2023, eq. 7; cDPO with --label-smoothing ε)
    robust: rDPO (Chowdhury et al. 2024)   ipo: (h − 1/2β)²   hinge: max(0, 1 − βh)
    simpo: −log σ(β·avg log π(y_w) − β·avg log π(y_l) − γ), no reference (Meng et al. 2024)

The losses live in tether.losses.preference; this file only gathers their inputs:

- log-probs are summed over response tokens only (prompt labels are IGNORE_INDEX);
- chosen and rejected go through one forward pass (2B rows);
- the reference log-probs of every train pair the run will visit (the data order is a pure
  function of seed and step) and every eval pair are computed once, before training,
  with no gradient, and cached (tether.scoring.cached_reference) under ``$TETHER_CACHE/ref_logps/<key>.safetensors``
  (default ``~/.cache/tether``), the key a hash of the token ids of every row, the reference
  model's identity (a folder's path, file sizes and mtimes; or a hub name) and the precision.
  A rerun (or --resume) loads them instead of loading the reference model at all; a cache
  file that is unreadable, of the wrong length or not finite is recomputed and replaced (written
  atomically, so a killed run leaves no half file). The
  reference is therefore never held in memory during training, with or without LoRA.

Evaluation on held-out pairs reports loss, implicit rewards β·log(π/π_ref) of chosen and
rejected, their margin and accuracy, and the mean log-probs of both sides (the known failure
where both fall shows there). At every evaluation, ``eval/kl`` is a Monte-Carlo estimate of
KL(π‖π_ref) = E_{y~π}[log π(y|x) − log π_ref(y|x)] on up to ``kl_prompts`` held-out prompts,
from samples of the trained policy at temperature 1, scored on the sampled token ids
(tether.instruments.kl.sampled_kl) against tether.scoring.reference_for (the policy with its
adapters off under LoRA on the reference itself, else the reference model, loaded only then).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from tether import scoring
from tether.config import check, group, opt, to_dict
from tether.data import chat_tokenizer, fingerprint, load_preferences, split_eval
from tether.data.collate import (
    OVERFLOW_CHOICES,
    EncodedPair,
    encode_pairs,
    nothing_left,
    pad_pairs_labelled,
    pair_rows,
)
from tether.errors import ConfigError
from tether.instruments.kl import HeldOutKL
from tether.loop import DataOrder, TrainConfig, train
from tether.losses import PREFERENCE_LOSSES, PreferenceOutput, labelled_tokens, sequence_sum, simpo_loss, summed_nll
from tether.models import LoraConfig, apply_lora, count_parameters, load_model, load_tokenizer
from tether.trainers.artifact import check_output, data_info, prepare_output, write_artifact

log = logging.getLogger("tether.dpo")

DPO_LOSSES = (*PREFERENCE_LOSSES, "simpo")


def _dpo_defaults() -> TrainConfig:
    return TrainConfig(steps=200, batch_size=16, lr=5e-5, warmup_steps=10, eval_every=50, save_every=100)


@dataclass
class DPOConfig:
    model: str = opt("", "policy to start from: an SFT folder, a local path or a hub name")
    ref: str = opt("", "reference model (empty: the same as --model)")
    data: str = opt("", "preference data (prompt/chosen/rejected, HH-style transcripts, or conversations)")
    eval_data: str = opt("", "held-out preference data (empty: hold out eval_fraction of data)")
    eval_fraction: float = opt(0.05, "fraction of pairs held out when eval_data is empty")
    out: str = opt("runs/dpo", "output folder")
    max_len: int = opt(256, "longest prompt + response in tokens")
    skip_invalid: bool = opt(False, "skip (and count) invalid records instead of stopping at the first")
    chat_template: bool = opt(True, "render records with the model's chat template when it has one (HH-RLHF "
                                    "transcripts become its turns); --no-chat-template: strings as given")
    overflow: str = opt("truncate", "longer pairs: truncate | drop | error (always counted in the log)")
    loss: str = opt("sigmoid", "sigmoid (DPO; cDPO with label_smoothing) | robust | ipo | hinge | simpo")
    beta: float = opt(0.1, "β: strength of the tie to the reference (SimPO: reward scale)")
    label_smoothing: float = opt(0.0, "ε, the assumed rate of flipped labels (sigmoid: cDPO, robust: rDPO)")
    simpo_gamma: float = opt(0.5, "SimPO's target reward margin γ")
    label_field: str = opt("", "a column holding each pair's soft label p = P(chosen ≻ rejected), such as "
                               "label_prob of `tether rlaif label`: the sigmoid loss then uses ε = 1 − p per pair")
    rpo_alpha: float = opt(0.0, "α of RPO (Pang et al. 2024): add α × the per-token NLL of the chosen responses "
                                "to the loss, so chosen log-probs cannot fall with rejected ones (0: off)")
    kl_prompts: int = opt(64, "held-out prompts sampled at every evaluation to estimate KL(π‖π_ref) (0: skip)")
    kl_max_new_tokens: int = opt(64, "longest sample for the KL estimate")
    resume: bool = opt(False, "continue from the latest checkpoint in out")
    overwrite: bool = opt(False, "replace the run tether wrote in out, once the new one is complete")
    lora: LoraConfig = group(LoraConfig)
    train: TrainConfig = group(_dpo_defaults)

    def validate(self) -> None:
        if not self.model or not self.data:
            raise ConfigError("--model and --data are required")
        if self.overflow not in OVERFLOW_CHOICES:
            raise ConfigError(f"overflow must be one of {OVERFLOW_CHOICES}, got {self.overflow!r}")
        if self.loss not in DPO_LOSSES:
            raise ConfigError(f"loss must be one of {DPO_LOSSES}, got {self.loss!r}")
        check("beta", self.beta, gt=0)
        check("simpo_gamma", self.simpo_gamma, ge=0)
        check("max_len", self.max_len, ge=2, integer=True)
        check("kl_prompts", self.kl_prompts, ge=0, integer=True, note="0: skip")
        check("kl_max_new_tokens", self.kl_max_new_tokens, ge=1, integer=True)
        if self.label_smoothing and self.loss not in ("sigmoid", "robust"):
            raise ConfigError(f"label_smoothing applies to the sigmoid (cDPO) and robust losses, not {self.loss!r}")
        check("label_smoothing", self.label_smoothing, ge=0, lt=0.5)
        if self.label_field and (self.loss != "sigmoid" or self.label_smoothing):
            raise ConfigError("label_field gives each pair its own ε: it needs --loss sigmoid and no --label-smoothing")
        check("eval_fraction", self.eval_fraction, ge=0, lt=1)
        check("rpo_alpha", self.rpo_alpha, ge=0, note="0: off")
        self.lora.validate()
        self.train.validate()


# --- the preference step ------------------------------------------------------------------


def preference_output(cfg: DPOConfig, policy_chosen: torch.Tensor, policy_rejected: torch.Tensor,
                      ref_chosen: torch.Tensor, ref_rejected: torch.Tensor,
                      soft_label: torch.Tensor | None = None) -> PreferenceOutput:
    """The configured loss on gathered log-probs, each (B,). SimPO has no reference, so its own signature.
    ``soft_label`` (B,): each pair's P(chosen ≻ rejected) with ``label_field``, i.e. ε = 1 − p per pair."""
    if cfg.loss == "simpo":
        return simpo_loss(policy_chosen, policy_rejected, cfg.beta, cfg.simpo_gamma)
    smoothing = 1.0 - soft_label if soft_label is not None else cfg.label_smoothing
    return PREFERENCE_LOSSES[cfg.loss](policy_chosen, policy_rejected, ref_chosen, ref_rejected, cfg.beta, smoothing)


def preference_metrics(out: PreferenceOutput, policy_chosen: torch.Tensor, policy_rejected: torch.Tensor) -> dict[str, float]:
    rc, rr = out.chosen_rewards, out.rejected_rewards
    return {"reward_chosen": rc.mean().item(), "reward_rejected": rr.mean().item(),
            "reward_margin": (rc - rr).mean().item(), "reward_accuracy": (rc > rr).float().mean().item(),
            "logp_chosen": policy_chosen.detach().mean().item(), "logp_rejected": policy_rejected.detach().mean().item()}


def dpo_step(model, batch: dict, cfg: DPOConfig) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """One micro-batch: a single forward over 2B rows (chosen then rejected), then the loss summed over pairs.

    ``batch`` holds input_ids, attention_mask, labels (2B, T) and ref_chosen, ref_rejected (B,).
    With ``rpo_alpha`` the loss is RPO's  L = L_pref + α · L_NLL(chosen)  (Pang et al. 2024, Eq. 3),
    L_pref a mean over the step's pairs and L_NLL ``sft_nll`` over its chosen rows' response tokens
    (:func:`pair_count` gives both counts).
    """
    logp, labels = scoring.labelled_logprobs(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
    logps = sequence_sum(logp, labels, average=cfg.loss == "simpo")  # (2B,)
    chosen, rejected = logps.chunk(2)  # (B,), (B,)
    out = preference_output(cfg, chosen, rejected, batch["ref_chosen"], batch["ref_rejected"], batch.get("soft_label"))
    metrics = {**preference_metrics(out, chosen, rejected), "tokens": float(batch["attention_mask"].sum())}
    if not cfg.rpo_alpha:
        return {"pairs": out.losses.sum()}, metrics
    n = chosen.numel()
    nll = summed_nll(logp[:n], labels[:n])
    return ({"pairs": out.losses.sum(), "chosen_tokens": cfg.rpo_alpha * nll.total},
            {**metrics, "nll_chosen": nll.mean().item()})


def pair_count(batch: dict) -> dict[str, float]:
    """Pairs in a batch of 2B rows (chosen first), and the chosen rows' labelled tokens (RPO's NLL term)."""
    n = len(batch["input_ids"]) // 2
    return {"pairs": float(n), "chosen_tokens": float(labelled_tokens(batch["labels"][:n]))}


def evaluate_pairs(model, pairs: list[EncodedPair], ref_chosen: torch.Tensor, ref_rejected: torch.Tensor,
                   cfg: DPOConfig, pad_id: int) -> dict[str, float]:
    """Loss, implicit rewards, margin, accuracy and log-probs over held-out pairs (pair-weighted means)."""
    logps = scoring.sequence_logprobs(model, pair_rows(pairs), pad_id, batch_size=cfg.train.score_rows(),
                              precision=cfg.train.precision, average=cfg.loss == "simpo")
    chosen, rejected = logps.chunk(2)
    soft = torch.tensor([p.label for p in pairs]) if cfg.label_field else None
    out = preference_output(cfg, chosen, rejected, ref_chosen, ref_rejected, soft)
    return {"eval/loss": out.loss.item(), **{f"eval/{k}": v for k, v in preference_metrics(out, chosen, rejected).items()}}


# --- the stage ----------------------------------------------------------------------------


def run_dpo(cfg: DPOConfig) -> Path:
    """Train ``cfg.model`` on preference pairs with the configured direct loss; returns the output folder."""
    cfg.validate()
    torch.manual_seed(cfg.train.seed)
    ref = cfg.ref or cfg.model
    tokenizer = load_tokenizer(cfg.model)
    records = load_preferences(cfg.data, tokenizer=chat_tokenizer(tokenizer, cfg), skip_invalid=cfg.skip_invalid)
    if cfg.eval_data:
        eval_records = load_preferences(cfg.eval_data, tokenizer=chat_tokenizer(tokenizer, cfg), skip_invalid=cfg.skip_invalid)
        train_records = records
    else:
        train_records, eval_records = split_eval(records, cfg.eval_fraction, cfg.train.seed)
    pairs, overflow = encode_pairs(train_records, tokenizer, cfg.max_len, cfg.overflow, label_field=cfg.label_field)
    eval_pairs, _ = encode_pairs(eval_records, tokenizer, cfg.max_len, "truncate", label_field=cfg.label_field)
    if not pairs:
        raise nothing_left(cfg.data, "pairs", len(train_records), overflow, cfg.max_len, cfg.overflow,
                           held_out=0 if cfg.eval_data else len(eval_records))

    check_output(Path(cfg.out), resume=cfg.resume, overwrite=cfg.overwrite)
    pad_id, n, m = tokenizer.pad_token_id, len(pairs), len(eval_pairs)
    # only the pairs this run's data order will visit (all of them once it passes an epoch)
    order = DataOrder(n, cfg.train.batch_size, cfg.train.seed)
    seen = sorted({i for k in range(cfg.train.steps * cfg.train.grad_accum) for i in order.indices(k)})
    ref_c, ref_r = torch.full((n,), float("nan")), torch.full((n,), float("nan"))  # (n,), (n,)
    if cfg.loss == "simpo":  # no reference model at all
        eval_ref_c = eval_ref_r = torch.zeros(m)
        hit = False
    else:
        ref_logps, hit = scoring.cached_reference(ref, pair_rows([pairs[i] for i in seen]) + pair_rows(eval_pairs), pad_id,
                                          cfg.train)
        k = len(seen)
        ref_c[seen], ref_r[seen] = ref_logps[:k], ref_logps[k : 2 * k]
        eval_ref_c, eval_ref_r = ref_logps[2 * k : 2 * k + m], ref_logps[2 * k + m :]  # (m,), (m,)

    model = apply_lora(load_model(cfg.model), cfg.lora)
    kl = HeldOutKL(cfg, tokenizer, eval_records)  # eval/kl at every evaluation (its reference is checked here)
    out = prepare_output(Path(cfg.out), resume=cfg.resume, overwrite=cfg.overwrite)  # inputs and models have loaded
    log.info("DPO (%s, β=%g) of %s against %s: %d trainable parameters, %d pairs", cfg.loss, cfg.beta, cfg.model,
             "no reference" if cfg.loss == "simpo" else ref, count_parameters(model, True), n)

    soft_labels = torch.tensor([p.label for p in pairs])  # (n,): 1 unless label_field gives soft labels

    def collate(idx: list[int]) -> dict:
        batch = {**pad_pairs_labelled([pairs[i] for i in idx], pad_id), "ref_chosen": ref_c[idx], "ref_rejected": ref_r[idx]}
        return {**batch, "soft_label": soft_labels[idx]} if cfg.label_field else batch

    def eval_fn(m_) -> dict[str, float]:
        return {**evaluate_pairs(m_, eval_pairs, eval_ref_c, eval_ref_r, cfg, pad_id), **kl(m_)}

    result = train(model, n, collate, lambda m_, b: dpo_step(m_, b, cfg), cfg.train, out, count=pair_count,
                   lengths=[p.width for p in pairs],
                   eval_fn=eval_fn if eval_pairs else None, resume=cfg.resume, desc=f"dpo {cfg.loss}",
                   run_config=to_dict(cfg))
    metrics = {**result.train, **result.eval, "ref/cache_hit": float(hit), "data/truncated": overflow.truncated,
               "data/dropped": overflow.dropped, "time/seconds": result.seconds}
    if "eval/kl" in metrics:
        log.info("KL(π‖π_ref) on %d held-out prompts: %.4f nats", len(kl.prompts), metrics["eval/kl"])
    data = {"train": data_info(cfg.data, train_records, fingerprint(train_records))}
    if eval_records:
        data["eval"] = data_info(cfg.eval_data or f"{cfg.data} (held out)", eval_records, fingerprint(eval_records))
    return write_artifact(out, stage="dpo", cfg=cfg, model=model, tokenizer=tokenizer, data=data, metrics=metrics)
