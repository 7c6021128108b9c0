"""KL(π ‖ π_ref) on the policy's own samples: the exact per-token KL over the vocabulary, with k1 / k2 / k3.

For a response y ~ π(·|x) of T tokens, the chain rule splits the sequence KL into per-position terms:

    KL(π(·|x) ‖ π_ref(·|x)) = E_{y~π}[ Σ_t KL_t(x, y_<t) ],
    KL_t(x, y_<t) = Σ_{v ∈ V} π(v|x, y_<t) · (log π(v|x, y_<t) − log π_ref(v|x, y_<t))

so Σ_t KL_t of one sample is an unbiased estimate of the sequence KL that uses the whole
distribution at every position (a Rao–Blackwellised k1: never negative, far less noisy). Beside it
the sample estimators of Schulman (2020, "Approximating KL Divergence"), per token and summed over
the response exactly as PPO logs them (tether.losses.kl.kl_estimate):

    k1 = Σ_t −log r_t,   k2 = Σ_t ½ (log r_t)²,   k3 = Σ_t (r_t − 1) − log r_t,   r_t = π_ref(y_t|·)/π(y_t|·)

k1, k3 and the exact sum are unbiased for the sequence KL; k2 is biased (it is the second-order
term, unbiased for a different f-divergence) and agrees only when π ≈ π_ref. A response that
stopped at ``max_new_tokens`` is a sample of the truncated process, whose KL is what is measured.
Temperature-1 sampling, the distribution the KL is defined on. Under torchrun :func:`policy_kl` splits
its samples over ranks in whole generation chunks and gathers them (tether.instruments.shard).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F

from tether.data.collate import Encoded, pad
from tether.losses.kl import kl_estimate
from tether.losses.lm import IGNORE_INDEX


class SequenceKL(NamedTuple):
    """Per-response KL terms, each Shape: (N,).

    exact: Σ_t KL_t, the full-vocabulary KL at every response position, summed
    k1, k2, k3: the sample estimators summed over the response's tokens
    tokens: response length in tokens
    """

    exact: torch.Tensor
    k1: torch.Tensor
    k2: torch.Tensor
    k3: torch.Tensor
    tokens: torch.Tensor


def _logits(model, batch: dict) -> torch.Tensor:
    device = next(model.parameters()).device
    out = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device))
    return out.logits.float().cpu()  # (B, T, V)


@torch.no_grad()
def sequence_kl(policy, reference, pairs: Sequence[tuple[list[int], list[int]]], pad_id: int,
                batch_size: int = 16) -> SequenceKL:
    """The exact per-token KL and k1 / k2 / k3 of each (prompt ids, response ids) pair drawn from ``policy``.

    ``reference`` must share the policy's vocabulary (the same tokenizer).
    """
    parts: dict[str, list[torch.Tensor]] = {k: [] for k in SequenceKL._fields}
    for i in range(0, len(pairs), batch_size):
        rows = [Encoded(p + r, [IGNORE_INDEX] * len(p) + r) for p, r in pairs[i : i + batch_size]]
        batch = pad(rows, pad_id)
        logp_all = F.log_softmax(_logits(policy, batch)[:, :-1], -1)  # (B, T-1, V): position t predicts token t+1
        ref_all = F.log_softmax(_logits(reference, batch)[:, :-1], -1)
        if logp_all.shape[-1] != ref_all.shape[-1]:
            raise ValueError(f"policy and reference vocabularies differ ({logp_all.shape[-1]} vs {ref_all.shape[-1]})")
        labels = batch["labels"][:, 1:]  # (B, T-1)
        mask = (labels != IGNORE_INDEX).float()
        safe = labels.clamp(min=0).unsqueeze(-1)
        logp = logp_all.gather(-1, safe).squeeze(-1)  # (B, T-1) log π(y_t)
        ref_logp = ref_all.gather(-1, safe).squeeze(-1)
        full = (logp_all.exp() * (logp_all - ref_all)).sum(-1)  # (B, T-1) KL_t over the vocabulary
        parts["exact"].append((full * mask).sum(-1))
        for k in ("k1", "k2", "k3"):
            parts[k].append((kl_estimate(logp, ref_logp, k) * mask).sum(-1))
        parts["tokens"].append(mask.sum(-1))
    return SequenceKL(**{k: torch.cat(v) if v else torch.zeros(0) for k, v in parts.items()})


def summarise(kl: SequenceKL) -> dict[str, float]:
    """Mean, standard error and standard deviation of each estimate over responses (nats per response)."""
    out: dict[str, float] = {}
    n = len(kl.exact)
    for name in ("exact", "k1", "k2", "k3"):
        v = getattr(kl, name).double()
        sd = v.std().item() if n > 1 else float("nan")
        out[f"kl/{name}"] = v.mean().item() if n else float("nan")
        out[f"kl/{name}_stderr"] = sd / math.sqrt(n) if n > 1 else float("nan")
        out[f"kl/{name}_std"] = sd
    out["kl/responses"] = float(n)
    out["kl/tokens_mean"] = kl.tokens.double().mean().item() if n else float("nan")
    return out


def policy_kl(policy, reference, tokenizer, prompts: Sequence[str], *, samples: int = 1, max_new_tokens: int = 64,
              seed: int = 0, batch_size: int = 16) -> tuple[SequenceKL, list[str]]:
    """Sample ``samples`` responses a prompt from ``policy`` (temperature 1) and measure their KL to ``reference``.

    Returns the per-response terms and the decoded responses. Under torchrun each rank samples and
    measures a block of whole chunks of ``batch_size`` responses (tether.instruments.shard), each chunk
    seeded from its global position, and every rank gets all of them: the figures of one process.
    """
    from tether.instruments.shard import map_blocks
    from tether.rollout import sample

    def measure(part: list[str], lo: int) -> list[tuple]:
        pairs = sample(policy, tokenizer, part, max_new_tokens=max_new_tokens, seed=seed, batch_size=batch_size,
                       index_offset=lo)
        kl = sequence_kl(policy, reference, pairs, tokenizer.pad_token_id, batch_size)
        texts = tokenizer.batch_decode([r for _, r in pairs], skip_special_tokens=True)
        return list(zip(texts, *(getattr(kl, k).tolist() for k in SequenceKL._fields)))

    rows = map_blocks(measure, [p for p in prompts for _ in range(samples)], batch_size)
    columns = list(zip(*rows)) or [[] for _ in range(len(SequenceKL._fields) + 1)]
    return SequenceKL(*(torch.tensor(c, dtype=torch.float32) for c in columns[1:])), list(columns[0])
