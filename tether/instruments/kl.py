"""Achieved KL from the base policy, estimated on the policy's own samples.

    KL(π ‖ π_ref) = E_{x, y~π}[ log π(y|x) − log π_ref(y|x) ]

The per-sequence log-ratio is the k1 estimator summed over tokens: unbiased, but noisy, and
negative on single samples. Sampling uses plain temperature-1 sampling, the distribution the
KL is defined on (top-k or top-p would change it).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

from tether.data.collate import prompt_ids
from tether.rollout import sample
from tether.scoring import Reference, labelled_rows, sequence_logprobs

log = logging.getLogger("tether.kl")


@dataclass
class KLEstimate:
    """Mean sequence log-ratio over samples, its standard error, and the samples' texts."""

    kl: float
    stderr: float
    responses: list[str]


def sampled_kl(policy, reference, tokenizer, prompts: Sequence[str], *, max_new_tokens: int = 64,
               seed: int = 0, batch_size: int = 32, score_batch_size: int | None = None,
               precision: str = "fp32") -> KLEstimate:
    """Estimate KL(π ‖ π_ref) from one policy sample per prompt, scored on the sampled token ids themselves.

    ``reference``: a tether.scoring.Reference (a frozen model, the policy's adapters off) or a model.
    ``batch_size`` prompts are sampled at once (the samples depend on it: a chunk's prompts are padded together) and
    ``score_batch_size`` rows scored at once (default ``batch_size``). Under torchrun every rank must
    call this (the scoring is sharded over ranks).
    """
    ref = reference if isinstance(reference, Reference) else Reference.frozen(reference)
    pairs = sample(policy, tokenizer, prompts, max_new_tokens=max_new_tokens, seed=seed, batch_size=batch_size)
    rows, pad_id, rows_at_once = labelled_rows(pairs), tokenizer.pad_token_id, score_batch_size or batch_size
    ratio = sequence_logprobs(policy, rows, pad_id, batch_size=rows_at_once, precision=precision) - \
        ref.sequence_logprobs(rows, pad_id, batch_size=rows_at_once, precision=precision)  # (N,)
    n = len(ratio)
    stderr = ratio.std().item() / math.sqrt(n) if n > 1 else float("nan")
    texts = tokenizer.batch_decode([r for _, r in pairs], skip_special_tokens=True)
    return KLEstimate(ratio.mean().item(), stderr, texts)


def kl_prompt_set(records: list, tokenizer, n: int, max_len: int, max_new_tokens: int) -> list[str]:
    """Up to ``n`` distinct held-out prompts that leave room for a whole sample within ``max_len``.

    A sample is scored on prompt + response, at most ``max_len`` tokens, so a longer prompt would
    have its sample cut short and the KL estimate biased: such prompts are passed over (counted).
    """
    prompts = list(dict.fromkeys(r.prompt for r in records))
    fits = [p for p in prompts if len(prompt_ids(tokenizer, p)) <= max_len - max_new_tokens]
    if n and len(fits) < len(prompts):
        log.info("KL to the reference: %d of %d held-out prompts leave no room for %d new tokens within "
                 "max_len=%d and are passed over", len(prompts) - len(fits), len(prompts), max_new_tokens, max_len)
    return fits[:n]


class HeldOutKL:
    """``eval/kl`` of a DPO or KTO run at every evaluation: :func:`sampled_kl` on the held-out prompts of
    :func:`kl_prompt_set`, so that the KL has a trend and not a single end point. The reference is the
    stage's (the policy's adapters off under LoRA, else the frozen reference model, loaded for each
    evaluation so that the training steps do not hold it); ``cfg`` is the stage's config (model, ref,
    lora, train, kl_prompts, kl_max_new_tokens, max_len)."""

    def __init__(self, cfg, tokenizer, records: list):
        from tether.loop import resolve_device

        self.cfg, self.tokenizer = cfg, tokenizer
        self.prompts = kl_prompt_set(records, tokenizer, cfg.kl_prompts, cfg.max_len, cfg.kl_max_new_tokens)
        self.device = resolve_device(cfg.train.device)
        if self.prompts:
            from tether.models.hf import check_model_source

            check_model_source(cfg.ref or cfg.model)  # a bad reference stops the run before it trains

    def __call__(self, policy) -> dict[str, float]:
        from tether.scoring import reference_for

        if not self.prompts:
            return {}
        # loaded for this evaluation only: a frozen reference model is not held through the training steps
        reference = reference_for(policy, self.cfg.model, self.cfg.ref, self.cfg.lora.r, self.device)
        return {"eval/kl": sampled_kl(policy, reference, self.tokenizer, self.prompts,
                                      max_new_tokens=self.cfg.kl_max_new_tokens, seed=self.cfg.train.seed,
                                      score_batch_size=self.cfg.train.score_rows(),
                                      precision=self.cfg.train.precision).kl}
