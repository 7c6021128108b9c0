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
  with no gradient, and cached under ``$TETHER_CACHE/ref_logps/<key>.safetensors``
  (default ``~/.cache/tether``), the key a hash of the token ids of every row, the reference
  model's identity (a folder's path, file sizes and mtimes; or a hub name) and the precision.
  A rerun (or --resume) loads them instead of loading the reference model at all; a cache
  file that is unreadable, of the wrong length or not finite is recomputed and replaced (written
  atomically, so a killed run leaves no half file). The
  reference is therefore never held in memory during training, with or without LoRA.

Evaluation on held-out pairs reports loss, implicit rewards β·log(π/π_ref) of chosen and
rejected, their margin and accuracy, and the mean log-probs of both sides (the known failure
where both fall shows there). At the end, ``eval/kl_to_ref`` is a Monte-Carlo estimate of
KL(π‖π_ref) = E_{y~π}[log π(y|x) − log π_ref(y|x)] on up to ``kl_prompts`` held-out prompts,
from samples of the trained policy at temperature 1. Departure: tether.rollout.generate returns
text, so a sample is re-tokenised before scoring; where a tokenizer's round trip is not exact the
scored tokens differ slightly from the sampled ones.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from tether import distributed
from tether.config import check, group, opt, to_dict
from tether.data import fingerprint, load_preferences
from tether.data.collate import (
    OVERFLOW_CHOICES,
    Encoded,
    EncodedPair,
    encode_pairs,
    nothing_left,
    pad,
    pad_pairs_labelled,
    pair_rows,
    prompt_ids,
)
from tether.errors import ConfigError
from tether.loop import DataOrder, TrainConfig, autocast, resolve_device, train
from tether.losses import PREFERENCE_LOSSES, PreferenceOutput, sequence_logprobs, sft_nll, simpo_loss
from tether.models import LoraConfig, apply_lora, count_parameters, load_model, load_tokenizer
from tether.trainers.artifact import check_output, data_info, prepare_output, write_artifact
from tether.trainers.sft import split_eval

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
    overflow: str = opt("truncate", "longer pairs: truncate | drop | error (always counted in the log)")
    loss: str = opt("sigmoid", "sigmoid (DPO; cDPO with label_smoothing) | robust | ipo | hinge | simpo")
    beta: float = opt(0.1, "β: strength of the tie to the reference (SimPO: reward scale)")
    label_smoothing: float = opt(0.0, "ε, the assumed rate of flipped labels (sigmoid: cDPO, robust: rDPO)")
    simpo_gamma: float = opt(0.5, "SimPO's target reward margin γ")
    label_field: str = opt("", "a column holding each pair's soft label p = P(chosen ≻ rejected), such as "
                               "label_prob of `tether rlaif label`: the sigmoid loss then uses ε = 1 − p per pair")
    rpo_alpha: float = opt(0.0, "α of RPO (Pang et al. 2024): add α × the per-token NLL of the chosen responses "
                                "to the loss, so chosen log-probs cannot fall with rejected ones (0: off)")
    kl_prompts: int = opt(64, "held-out prompts sampled at the end to estimate KL(π‖π_ref) (0: skip)")
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


# --- shared with KTO: log-probs, the reference cache, KL to the reference -----------------


@torch.no_grad()
def batched_logps(model, rows: list[Encoded], pad_id: int, batch_size: int, *, precision: str = "fp32",
                  average: bool = False) -> torch.Tensor:
    """Sequence log-probs of labelled rows, batched by length. Shape: N rows -> (N,) on the CPU.

    Under torchrun each rank scores its block of rows and the results are gathered (every rank
    must call this).
    """
    device = next(model.parameters()).device

    def logps(part: list[Encoded]) -> torch.Tensor:
        order = sorted(range(len(part)), key=lambda i: len(part[i].input_ids))
        out = torch.zeros(len(part))
        for s in range(0, len(order), batch_size):
            idx = order[s : s + batch_size]
            batch = {k: v.to(device) for k, v in pad([part[i] for i in idx], pad_id).items()}
            with autocast(device, precision):
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (b, T, V)
            out[idx] = sequence_logprobs(logits, batch["labels"], average=average).float().cpu()
        return out

    return distributed.map_rows(logps, rows)


def cache_dir() -> Path:
    return Path(os.environ.get("TETHER_CACHE") or Path.home() / ".cache" / "tether")


def model_identity(name: str) -> str:
    """A folder: its path and every file's size and mtime; otherwise the (hub) name."""
    path = Path(name)
    if not path.is_dir():
        return name
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in (".safetensors", ".bin", ".json"))
    return json.dumps([str(path.resolve())] + [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files])


def reference_logps(ref: str, rows: list[Encoded], pad_id: int, cfg: TrainConfig) -> tuple[torch.Tensor, bool]:
    """log π_ref of every row (N,), computed once and cached on disk; returns (log-probs, cache hit)."""
    device = resolve_device(cfg.device)
    h = hashlib.sha256()
    h.update(json.dumps([model_identity(ref), device.type, cfg.precision]).encode())
    for r in rows:
        h.update(json.dumps([r.input_ids, r.labels], separators=(",", ":")).encode())
    path = cache_dir() / "ref_logps" / f"{h.hexdigest()[:24]}.safetensors"
    logps, problem = read_reference_cache(path, len(rows))
    hit = logps is not None
    if distributed.all_reduce(torch.tensor(float(hit)), "min").item():  # under torchrun: only if every rank has it
        log.info("reference log-probs of %d rows: cache hit (%s)", len(rows), path)
        return logps, True
    if problem:
        log.warning("reference log-probs cache %s is unusable (%s): recomputing it", path, problem)
    else:
        log.info("reference log-probs of %d rows: computing once (cache miss, %s)", len(rows), path)
    model = load_model(ref, device=device).eval()
    logps = batched_logps(model, rows, pad_id, max(cfg.batch_size, 32), precision=cfg.precision)
    del model
    if distributed.env().main:
        write_reference_cache(path, logps)
    return logps, False


def read_reference_cache(path: Path, n: int) -> tuple[torch.Tensor | None, str]:
    """(log-probs, "") from a cache file that holds ``n`` finite float log-probs; (None, why not) otherwise.

    A missing file is a plain miss (why = ""); an unreadable, truncated, wrong-shaped or non-finite
    one is reported, and the caller recomputes and replaces it.
    """
    if not path.exists():
        return None, ""
    try:
        logps = load_file(str(path)).get("logps")
    except Exception as e:  # safetensors raises its own error type for a truncated or garbage file
        return None, f"unreadable: {type(e).__name__}: {' '.join(str(e).split())[:120]}"
    if logps is None:
        return None, "no 'logps' tensor"
    if logps.shape != (n,) or not logps.is_floating_point():
        return None, f"{tuple(logps.shape)} {logps.dtype} where ({n},) float log-probs were expected"
    if not torch.isfinite(logps).all():
        return None, f"{int((~torch.isfinite(logps)).sum())} non-finite value(s)"
    return logps.float(), ""


def write_reference_cache(path: Path, logps: torch.Tensor) -> None:
    """Write the cache atomically: a temporary file, flushed to disk, then renamed over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    try:
        save_file({"logps": logps.contiguous()}, str(tmp))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def sample_rows(tokenizer, prompts: list[str], responses: list[str], max_new_tokens: int, max_len: int) -> list[Encoded]:
    """Re-tokenise sampled responses for scoring; EOS is appended where the sample stopped before the limit."""
    rows = []
    for p, r in zip(prompts, responses):
        prompt = prompt_ids(tokenizer, p)
        resp = tokenizer(r, add_special_tokens=False)["input_ids"]
        if len(resp) < max_new_tokens:
            resp = resp + [tokenizer.eos_token_id]
        ids = (prompt + resp)[:max_len]
        rows.append(Encoded(ids, ([-100] * len(prompt) + resp)[:max_len]))
    return rows


def kl_prompt_set(records: list, tokenizer, n: int, max_len: int, max_new_tokens: int) -> list[str]:
    """Up to ``n`` distinct held-out prompts that leave room for a whole sample within ``max_len``.

    A sample is scored on prompt + response cut to ``max_len`` tokens, so a longer prompt would
    have its sample cut short and the KL estimate biased: such prompts are passed over (counted).
    """
    prompts = list(dict.fromkeys(r.prompt for r in records))
    fits = [p for p in prompts if len(prompt_ids(tokenizer, p)) <= max_len - max_new_tokens]
    if n and len(fits) < len(prompts):
        log.info("KL to the reference: %d of %d held-out prompts leave no room for %d new tokens within "
                 "max_len=%d and are passed over", len(prompts) - len(fits), len(prompts), max_new_tokens, max_len)
    return fits[:n]


def kl_to_reference(policy, ref: str, tokenizer, prompts: list[str], *, max_new_tokens: int, max_len: int,
                    cfg: TrainConfig, lora_on_ref: bool = False) -> float:
    """Monte-Carlo KL(π‖π_ref) = mean over samples y ~ π(·|x) of log π(y|x) − log π_ref(y|x).

    ``lora_on_ref``: the policy is LoRA on the reference itself, so the reference is the policy
    with its adapters disabled (no second model is loaded).
    """
    from tether.rollout import generate

    responses = generate(policy, tokenizer, prompts, max_new_tokens=max_new_tokens, seed=cfg.seed)
    rows = sample_rows(tokenizer, prompts, responses, max_new_tokens, max_len)
    pad_id, bs = tokenizer.pad_token_id, max(cfg.batch_size, 32)
    was_training = policy.training
    policy.eval()
    logp = batched_logps(policy, rows, pad_id, bs, precision=cfg.precision)
    if lora_on_ref:
        with policy.disable_adapter():
            ref_logp = batched_logps(policy, rows, pad_id, bs, precision=cfg.precision)
    else:
        ref_model = load_model(ref, device=next(policy.parameters()).device).eval()
        ref_logp = batched_logps(ref_model, rows, pad_id, bs, precision=cfg.precision)
        del ref_model
    policy.train(was_training)
    return (logp - ref_logp).mean().item()


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


def dpo_step(model, batch: dict, cfg: DPOConfig) -> tuple[torch.Tensor, dict[str, float]]:
    """One micro-batch: a single forward over 2B rows (chosen then rejected), then the loss.

    ``batch`` holds input_ids, attention_mask, labels (2B, T) and ref_chosen, ref_rejected (B,).
    With ``rpo_alpha`` the loss is RPO's  L = L_pref + α · L_NLL(chosen)  (Pang et al. 2024, Eq. 3),
    L_NLL being ``sft_nll`` over the chosen rows' response tokens.
    """
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (2B, T, V)
    logps = sequence_logprobs(logits, batch["labels"], average=cfg.loss == "simpo")  # (2B,)
    chosen, rejected = logps.chunk(2)  # (B,), (B,)
    out = preference_output(cfg, chosen, rejected, batch["ref_chosen"], batch["ref_rejected"], batch.get("soft_label"))
    metrics = {**preference_metrics(out, chosen, rejected), "tokens": float(batch["attention_mask"].sum())}
    if not cfg.rpo_alpha:
        return out.loss, metrics
    n = chosen.numel()
    nll, _ = sft_nll(logits[:n], batch["labels"][:n])
    return out.loss + cfg.rpo_alpha * nll, {**metrics, "nll_chosen": nll.item()}


def evaluate_pairs(model, pairs: list[EncodedPair], ref_chosen: torch.Tensor, ref_rejected: torch.Tensor,
                   cfg: DPOConfig, pad_id: int) -> dict[str, float]:
    """Loss, implicit rewards, margin, accuracy and log-probs over held-out pairs (pair-weighted means)."""
    logps = batched_logps(model, pair_rows(pairs), pad_id, max(cfg.train.batch_size, 32),
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
    records = load_preferences(cfg.data, tokenizer=tokenizer, skip_invalid=cfg.skip_invalid)
    if cfg.eval_data:
        eval_records = load_preferences(cfg.eval_data, tokenizer=tokenizer, skip_invalid=cfg.skip_invalid)
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
        ref_logps, hit = reference_logps(ref, pair_rows([pairs[i] for i in seen]) + pair_rows(eval_pairs), pad_id, cfg.train)
        k = len(seen)
        ref_c[seen], ref_r[seen] = ref_logps[:k], ref_logps[k : 2 * k]
        eval_ref_c, eval_ref_r = ref_logps[2 * k : 2 * k + m], ref_logps[2 * k + m :]  # (m,), (m,)

    model = apply_lora(load_model(cfg.model), cfg.lora)
    out = prepare_output(Path(cfg.out), resume=cfg.resume, overwrite=cfg.overwrite)  # inputs and models have loaded
    log.info("DPO (%s, β=%g) of %s against %s: %d trainable parameters, %d pairs", cfg.loss, cfg.beta, cfg.model,
             "no reference" if cfg.loss == "simpo" else ref, count_parameters(model, True), n)

    soft_labels = torch.tensor([p.label for p in pairs])  # (n,): 1 unless label_field gives soft labels

    def collate(idx: list[int]) -> dict:
        batch = {**pad_pairs_labelled([pairs[i] for i in idx], pad_id), "ref_chosen": ref_c[idx], "ref_rejected": ref_r[idx]}
        return {**batch, "soft_label": soft_labels[idx]} if cfg.label_field else batch

    def eval_fn(m_) -> dict[str, float]:
        return evaluate_pairs(m_, eval_pairs, eval_ref_c, eval_ref_r, cfg, pad_id)

    result = train(model, n, collate, lambda m_, b: dpo_step(m_, b, cfg), cfg.train, out,
                   eval_fn=eval_fn if eval_pairs else None, resume=cfg.resume, desc=f"dpo {cfg.loss}",
                   run_config=to_dict(cfg))
    metrics = {**result.train, **result.eval, "ref/cache_hit": float(hit), "data/truncated": overflow.truncated,
               "data/dropped": overflow.dropped, "time/seconds": result.seconds}
    kl_prompts = kl_prompt_set(eval_records, tokenizer, cfg.kl_prompts, cfg.max_len, cfg.kl_max_new_tokens)
    if kl_prompts:
        metrics["eval/kl_to_ref"] = kl_to_reference(model, ref, tokenizer, kl_prompts, max_new_tokens=cfg.kl_max_new_tokens,
                                                    max_len=cfg.max_len, cfg=cfg.train,
                                                    lora_on_ref=cfg.lora.r > 0 and ref == cfg.model)
        log.info("KL(π‖π_ref) on %d held-out prompts: %.4f nats", len(kl_prompts), metrics["eval/kl_to_ref"])
    data = {"train": data_info(cfg.data, train_records, fingerprint(train_records))}
    if eval_records:
        data["eval"] = data_info(cfg.eval_data or f"{cfg.data} (held out)", eval_records, fingerprint(eval_records))
    return write_artifact(out, stage="dpo", cfg=cfg, model=model, tokenizer=tokenizer, data=data, metrics=metrics)
