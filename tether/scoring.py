"""Scoring: token and sequence log-probs of rows, and one reference, for every stage, instrument and judge.

Every log-probability tether computes from a model goes through this module:

    response_logprobs     log π(y_t | x, y_<t) at every labelled position          (B, T − 1), grad allowed
    sequence_logprobs     log π(y | x) = Σ_t log π(y_t | x, y_<t) over labelled tokens   (N,), no grad
    token_nll             Σ over labelled tokens of −log π(y_t | x, y_<t), and their count
    next_token_logprobs   log π(c | text) of each candidate continuation c after each text   (N, K)

The per-token formula is written once, in tether.losses.lm.token_logprobs (the next-token shift
and the IGNORE_INDEX mask); everything here only batches rows and calls it. The row scorers
(all but :func:`response_logprobs`) run without gradient, in eval mode (each module's previous
mode restored afterwards), in batches of rows of like length, and under torchrun split the rows
across ranks and gather the result (tether.distributed.map_rows: every rank must call them).

:class:`Reference` is the one reference π_ref of every stage: a frozen model, the policy with its
LoRA adapters switched off (no second model in memory), or a cache of precomputed sequence
log-probs (DPO's and KTO's, computed once before training and kept on disk by
:func:`cached_reference`).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from tether import distributed
from tether.data.collate import Encoded, pad, prompt_ids
from tether.losses.lm import IGNORE_INDEX, output_logprobs, sequence_sum, token_entropy, token_logprobs

log = logging.getLogger("tether.scoring")

__all__ = [
    "Reference",
    "cached_reference",
    "eval_mode",
    "labelled_rows",
    "next_token_logprobs",
    "reference_for",
    "response_logprobs",
    "sequence_logprobs",
    "token_nll",
]


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _autocast(device: torch.device, precision: str):
    from tether.loop import autocast  # imported here: tether.loop may itself use this module

    return autocast(device, precision)


@contextlib.contextmanager
def eval_mode(model):
    """Run the block with ``model`` in eval mode, then put every submodule back in the mode it was in."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, training in modes:
            m.training = training


def _tensors(batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """input_ids, attention_mask, labels of a Rollout-like object or a dict."""
    if isinstance(batch, dict):
        return batch["input_ids"], batch["attention_mask"], batch["labels"]
    return batch.input_ids, batch.attention_mask, batch.labels


def labelled_rows(pairs: Sequence[tuple[Sequence[int], Sequence[int]]]) -> list[Encoded]:
    """(prompt ids, response ids) pairs as rows labelled on the response only (the prompt gets IGNORE_INDEX)."""
    return [Encoded(list(p) + list(r), [IGNORE_INDEX] * len(p) + list(r)) for p, r in pairs]


# --- a padded batch, with gradient where the caller wants it ------------------------------


def _keeps_logits(model) -> bool:
    """Whether the transformers model inside ``model`` (a LoRA, DDP or compile wrapper) takes ``logits_to_keep``."""
    from transformers import PreTrainedModel

    hf = next((m for m in model.modules() if isinstance(m, PreTrainedModel)), None)
    return hf is not None and _forward_takes(type(hf), "logits_to_keep")


@functools.cache
def _forward_takes(cls: type, name: str) -> bool:
    """Whether ``cls.forward`` has a parameter ``name`` (read once a class, not at every forward pass)."""
    import inspect

    return name in inspect.signature(cls.forward).parameters


def labelled_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                      temperature: float = 1.0, *, summed: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """log π(y_t | x, y_<t) of the labelled tokens, and the labels they line up with.

    Position t's logits predict token t + 1, so the positions before the batch's first labelled
    token minus one (the prompts, in a batch of prompt + response rows) are never read: the model
    runs its output layer from that position on (transformers' ``logits_to_keep``). And the logits
    are never materialised: for the pass, the model's output layer is stood in for by one that
    scores only the labelled positions, a chunk at a time, and returns their log-probs
    (tether.losses.lm.output_logprobs; on a 49k vocabulary that spares B × K × V logits and, with
    gradient, their gradient). A model where that is not known to be exact (an output layer that is
    not one linear map, logits scaled or soft-capped after it, a module behind torch.compile)
    gives its logits to tether.losses.lm.token_logprobs instead: the same numbers (as every model does with
    ``TETHER_SCORE_FROM_LOGITS=1`` in the environment, for comparison). ``summed``: the caller
    differentiates only the sum of these log-probs (SFT's NLL), which lets the output layer's gradient
    be formed in the same pass (output_logprobs).

    Returns (log-probs (B, K − 1), labels (B, K)) with K ≤ T; 0 off the labelled positions.
    """
    logp, kept, _ = labelled_pass(model, input_ids, attention_mask, labels, temperature, summed=summed)
    return logp, kept


def labelled_pass(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                  temperature: float = 1.0, *, entropy: torch.Tensor | None = None, summed: bool = False, **forward):
    """:func:`labelled_logprobs`, and the model's whole output: (logp, labels, output), output None where rows
    sharing a prompt ran it once (:func:`shared_prefix_hidden`). ``forward``: further
    arguments of the model's forward pass (``output_hidden_states``: PPO's value head reads them); ``entropy``: a
    (B, T − 1) tensor whose last K − 1 columns receive each labelled position's entropy (no gradient)."""
    labelled = (labels[:, 1:] != IGNORE_INDEX).any(0).nonzero()
    first = int(labelled[0]) if len(labelled) else labels.shape[1] - 1
    keep = {"logits_to_keep": labels.shape[1] - first} if first > 0 and _keeps_logits(model) else {}
    kept = labels[:, first:] if keep else labels
    place = _output_layer(model)
    if place is None:
        out = model(input_ids=input_ids, attention_mask=attention_mask, **keep, **forward)
        if entropy is not None:
            with torch.no_grad():
                entropy[:, entropy.shape[1] - kept.shape[1] + 1:] = token_entropy(out.logits[:, :-1], temperature) \
                    * (kept[:, 1:] != IGNORE_INDEX)
        return token_logprobs(out.logits, kept, temperature), kept, out
    owner, name, head = place
    kept_entropy = None if entropy is None else torch.zeros(kept.shape[0], kept.shape[1] - 1, device=entropy.device)
    hidden = None if forward else shared_prefix_hidden(model, owner, input_ids, attention_mask, prompt_lengths(labels))
    if hidden is not None:  # the prompts were run once: the output layer reads the hidden states itself
        logp, out = output_logprobs(hidden[:, labels.shape[1] - kept.shape[1]:], head, kept, temperature,
                                    entropy=kept_entropy, summed=summed), None
    else:
        setattr(owner, name, _LabelledHead(head, kept, temperature, kept_entropy, summed))
        try:
            out = model(input_ids=input_ids, attention_mask=attention_mask, **keep, **forward)
        finally:
            setattr(owner, name, head)
        logp = out.logits
    if entropy is not None:
        entropy[:, entropy.shape[1] - kept_entropy.shape[1]:] = kept_entropy
    return logp, kept, out


# What a forward pass of its own costs, in tokens of a 1M-parameter model (the demo's: 7.5 ms against 0.056 ms a
# token, forward and backward on two CPU cores, tether.loop.accumulate.length_passes); per-pass overhead hardly
# grows with the model while a token's cost grows with its parameters, so a model of N parameters counts 1M / N of it.
SHARED_PREFIX_MIN_TOKENS = 256


def prompt_lengths(labels: torch.Tensor) -> list[int]:
    """Each row's tokens before its first labelled one (0 for a row with none). Shape: (B, T) -> B."""
    labelled = labels[:, 1:] != IGNORE_INDEX  # (B, T-1): position t predicts token t + 1
    return torch.where(labelled.any(1), labelled.int().argmax(1) + 1, 0).tolist()


def shared_prefix_hidden(model, hf, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                         starts: Sequence[int]) -> torch.Tensor | None:
    """The last hidden states (B, T, H) of ``hf`` (the transformers model inside ``model``: a causal LM or a reward
    model) on right-padded rows whose first ``starts[r]`` tokens are their prompt, with each prompt shared by several
    rows computed once; None where that would not pay or cannot be done.

    A GRPO or RLOO group samples G responses to one prompt, and a preference pair's chosen and rejected rows share
    theirs: a plain pass computes the prompt's P tokens G times. Here two passes replace it. The first runs each
    distinct prompt once (one row a prompt, right-padded, keys and values kept); the second runs every row's
    response after its prompt's keys and values (gathered to the row; the mask hides the prompt's padding, the
    positions go on from P). A causal model's position t sees tokens ≤ t alone, so the hidden states gathered back
    to (B, T, H) are the plain pass's, and so are the log-probs and, through the gathered keys and values, the
    gradient. Done only where the tokens spared exceed SHARED_PREFIX_MIN_TOKENS (scaled: the second pass's cost),
    for one process (DDP and FSDP2 run the model whole), a backbone called as it is (not compiled, no gradient
    checkpointing) whose layers all attend to the whole sequence; ``TETHER_SHARED_PREFIX=0`` in the environment
    turns it off (for comparison).
    """
    from tether.decoding import cache_keyword
    from tether.loop.pieces import CompiledBackbones

    if os.environ.get("TETHER_SHARED_PREFIX") == "0":
        return None
    checkpointing = any(getattr(m, "gradient_checkpointing", False) is True for m in hf.modules())
    backbone, config = hf.base_model, hf.config
    if distributed.env().active or isinstance(model, (torch._dynamo.eval_frame.OptimizedModule, CompiledBackbones)) \
            or checkpointing or backbone is hf:
        return None
    keyword = cache_keyword(backbone)  # "cache" (transformers ≥ 5.2x) or "past_key_values"
    windowed = getattr(config, "sliding_window", None) is not None and getattr(config, "use_sliding_window", True)
    if keyword not in ("cache", "past_key_values") or windowed \
            or any(t != "full_attention" for t in getattr(config, "layer_types", None) or ()):
        return None
    mask_rows, id_rows = attention_mask.tolist(), input_ids.tolist()
    lengths = [sum(m) for m in mask_rows]
    if any(not all(m[:n]) or n < 2 for m, n in zip(mask_rows, lengths)):
        return None  # left padding or holes, or a row too short to split
    cuts = [min(max(p, 1), n - 1) for p, n in zip(starts, lengths)]  # a row in no group keeps its own prompt
    prompts: dict[tuple, int] = {}
    group = [prompts.setdefault(tuple(ids[:c]), len(prompts)) for ids, c in zip(id_rows, cuts)]
    width, tail_width = max(map(len, prompts)), max(n - c for n, c in zip(lengths, cuts))
    spared = len(id_rows) * input_ids.shape[1] - len(prompts) * width - len(id_rows) * tail_width
    if len(prompts) == len(id_rows) or spared < SHARED_PREFIX_MIN_TOKENS * min(1.0, 1e6 / hf.num_parameters()):
        return None
    from transformers import DynamicCache

    device, rows = input_ids.device, torch.arange(len(id_rows), device=input_ids.device)
    head_ids = torch.zeros(len(prompts), width, dtype=input_ids.dtype, device=device)  # (G, P): prompts, right-padded
    for prompt, g in prompts.items():
        head_ids[g, : len(prompt)] = torch.tensor(prompt, dtype=input_ids.dtype)
    cache = DynamicCache(config=config)
    heads = backbone(input_ids=head_ids, **{keyword: cache}, use_cache=True).last_hidden_state  # (G, P, H)
    g, cut = torch.tensor(group, device=device), torch.tensor(cuts, device=device)
    cache.reorder_cache(g)  # keys and values (B, heads, P, d) a layer: each row's prompt's
    offset = torch.arange(tail_width, device=device)
    # (B, W): the columns each row's response holds, which are its positions too (a padded one's is any column: a
    # learned position table ends at the row length)
    at = (cut[:, None] + offset).clamp(max=input_ids.shape[1] - 1)
    tail_mask = attention_mask.gather(1, at) * (cut[:, None] + offset < input_ids.shape[1])
    seen = torch.cat([(torch.arange(width, device=device) < cut[:, None]).to(attention_mask.dtype), tail_mask], 1)
    tails = backbone(input_ids=input_ids.gather(1, at), attention_mask=seen, position_ids=at, **{keyword: cache},
                     use_cache=True).last_hidden_state  # (B, W, H)
    t = torch.arange(input_ids.shape[1], device=device)[None]  # position t of row r is its prompt's or its response's
    source = torch.where(t < cut[:, None], g[:, None] * width + t.clamp(max=width - 1),
                         len(prompts) * width + rows[:, None] * tail_width + (t - cut[:, None]).clamp(0, tail_width - 1))
    return torch.cat([heads.flatten(0, 1), tails.flatten(0, 1)])[source]  # (B, T, H)


class _LabelledHead(torch.nn.Module):
    """Stands in for a causal LM's output layer for one pass: hidden (B, K, H) -> log-probs (B, K − 1)."""

    def __init__(self, head: torch.nn.Linear, labels: torch.Tensor, temperature: float, entropy=None,
                 summed: bool = False):
        super().__init__()
        self.head, self.labels, self.temperature, self.entropy, self.summed = head, labels, temperature, entropy, summed

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return output_logprobs(hidden, self.head, self.labels, self.temperature, entropy=self.entropy,
                               summed=self.summed)


def _output_layer(model) -> tuple[torch.nn.Module, str, torch.nn.Linear] | None:
    """(the module holding it, its attribute name, the output layer) of the transformers model inside ``model``
    (a LoRA or DDP wrapper), when the logits are that layer's output as they are; None otherwise."""
    from transformers import PreTrainedModel

    if os.environ.get("TETHER_SCORE_FROM_LOGITS") == "1":  # the logits path everywhere, for comparison (bench/)
        return None
    if isinstance(model, torch._dynamo.eval_frame.OptimizedModule):
        return None
    hf = next((m for m in model.modules() if isinstance(m, PreTrainedModel)), None)
    if hf is None or not _plain_logits(type(hf), hf.config):
        return None
    head = hf.get_output_embeddings()
    if type(head) is not torch.nn.Linear:
        return None
    return next(((hf, name, head) for name, child in hf.named_children() if child is head), None)


def _plain_logits(cls: type, config) -> bool:
    """Whether ``cls`` returns its output layer's values as the logits (no soft-capping or scaling after it)."""
    scaled = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")
    return _forward_takes(cls, "logits_to_keep") and all(getattr(config, k, None) in (None, 1, 1.0) for k in scaled)


def response_logprobs(model, batch, temperature: float = 1.0, *, batch_size: int | None = None,
                      precision: str = "fp32") -> torch.Tensor:
    """log π(y_t | x, y_<t) at the sampling ``temperature`` at every labelled position, 0 elsewhere.

    ``batch``: anything with ``input_ids``, ``attention_mask`` and ``labels`` (B, T) (a
    tether.rollout.Rollout) or a dict with those keys; moved to the model's device. Position t
    scores token t + 1 (tether.losses.lm.token_logprobs). With ``batch_size`` the rows go through
    the model in chunks of that many (row slices of the already padded batch, so the result is
    the same) and are concatenated. Gradients flow when called outside ``torch.no_grad``; the
    model's mode is left as it is. ``precision``: autocast as tether.loop.autocast.

    Shape: (B, T) -> (B, T − 1), float32.
    """
    ids, mask, labels = _tensors(batch)
    device = _device(model)
    n, width = ids.shape[0], max(ids.shape[1] - 1, 0)
    size = batch_size or max(n, 1)
    logps = []
    for s in range(0, n, size):
        rows = slice(s, s + size)
        with _autocast(device, precision):
            logp, kept = labelled_logprobs(model, ids[rows].to(device), mask[rows].to(device), labels[rows].to(device),
                                           temperature)  # (b, K-1): the last positions
        logps.append(torch.nn.functional.pad(logp, (width - logp.shape[1], 0)))  # (b, T-1), 0 before them
    return torch.cat(logps) if logps else torch.zeros(0, width, device=device)


# --- lists of rows: no grad, eval mode, batched by length, sharded over ranks -------------


def _score_rows(model, rows: Sequence[Encoded], pad_id: int, batch_size: int, precision: str,
                score: Callable[[torch.Tensor, dict], torch.Tensor], width: tuple[int, ...] = (),
                logits: bool = False) -> torch.Tensor:
    """``score(logp, batch)`` of every row (logp: its labelled tokens' log-probs, :func:`labelled_logprobs`; with
    ``logits``, the model's logits (b, T, V) instead), in batches of rows of like length. Shape: N rows -> (N, *width),
    CPU.

    Rows are sorted by length so that a batch carries little padding; results come back in the
    rows' own order. Under torchrun each rank scores its block and the blocks are gathered.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    device = _device(model)

    def part_scores(part: list[Encoded]) -> torch.Tensor:
        order = sorted(range(len(part)), key=lambda i: len(part[i].input_ids))
        out = None
        for s in range(0, len(order), batch_size):
            idx = order[s : s + batch_size]
            batch = {k: v.to(device) for k, v in pad([part[i] for i in idx], pad_id).items()}
            with _autocast(device, precision):
                if logits:
                    scored, labels = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits, \
                        batch["labels"]
                else:
                    scored, labels = labelled_logprobs(model, batch["input_ids"], batch["attention_mask"],
                                                       batch["labels"])
            kept = {k: v[:, v.shape[1] - labels.shape[1]:] for k, v in batch.items()}  # the columns scored
            value = score(scored, kept).cpu()  # (b, *width)
            if out is None:
                out = torch.zeros((len(part), *value.shape[1:]), dtype=value.dtype)
            out[idx] = value
        return out if out is not None else torch.zeros((0, *width))

    with torch.no_grad(), eval_mode(model):
        return distributed.map_rows(part_scores, list(rows))


def sequence_logprobs(model, rows: Sequence[Encoded], pad_id: int, *, batch_size: int, precision: str = "fp32",
                      average: bool = False) -> torch.Tensor:
    """log π(y | x) = Σ_t log π(y_t | x, y_<t) over each row's labelled tokens (its response).

    With ``average`` the sum is divided by the row's number of labelled tokens (SimPO's length
    normalisation). No gradient, eval mode, batched by length, sharded over ranks (module docstring).

    Shape: N rows -> (N,) float32 on the CPU.
    """
    return _score_rows(model, rows, pad_id, batch_size, precision,
                       lambda logp, b: sequence_sum(logp, b["labels"], average=average).float())


def token_nll(model, rows: Sequence[Encoded], pad_id: int, *, batch_size: int,
              precision: str = "fp32") -> tuple[float, int]:
    """(Σ over every labelled token of every row of −log π(y_t | x, y_<t), number of labelled tokens).

    The held-out NLL per token is their ratio (token-weighted over the whole set). Sums are taken
    in float64. No gradient, eval mode, batched by length, sharded over ranks.
    """
    def nll_and_count(logp: torch.Tensor, b: dict) -> torch.Tensor:  # (b, 2)
        count = (b["labels"][:, 1:] != IGNORE_INDEX).sum(-1)
        return torch.stack([-sequence_sum(logp, b["labels"]).double(), count.double()], -1)

    total, count = _score_rows(model, rows, pad_id, batch_size, precision, nll_and_count, (2,)).sum(0).tolist()
    return float(total), int(count)


def next_token_logprobs(model, tokenizer, texts: Sequence[str | Sequence[int]], token_ids: Sequence[int | Sequence[int]],
                        *, batch_size: int, precision: str = "fp32") -> torch.Tensor:
    """log π(c_k | text_i) of each candidate continuation c_k after each text: what an LLM judge reads.

    ``texts``: strings (tokenised with the tokenizer's own prefix, tether.data.collate.prompt_ids)
    or lists of token ids (a caller that cut a long text to fit). ``token_ids``: each candidate a
    token id, or a list of ids (a continuation of several tokens, scored over all of them:
    log π(c|x) = Σ_t log π(c_t | x, c_<t)). Texts of any lengths batch together: rows are
    right-padded by tether itself (the tokenizer's ``padding_side`` plays no part) and each
    text's last real position is read, so a text scores the same alone or among longer ones.

    When every candidate is one token, one forward pass a text scores all of them; otherwise each
    (text, candidate) is a row of its own. No gradient, eval mode, sharded over ranks.

    Shape: N texts, K candidates -> (N, K) float32 on the CPU.
    """
    contexts = [prompt_ids(tokenizer, t) if isinstance(t, str) else list(t) for t in texts]
    candidates = [[c] if isinstance(c, int) else list(c) for c in token_ids]
    if any(not c for c in candidates):
        raise ValueError("a candidate continuation has no tokens")
    if any(not c for c in contexts):
        raise ValueError("a text tokenises to nothing: there is no position to predict its next token from")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    if all(len(c) == 1 for c in candidates):
        ids = torch.tensor([c[0] for c in candidates])  # (K,)

        def last_position(logits: torch.Tensor, b: dict) -> torch.Tensor:  # (b, K)
            last = b["attention_mask"].sum(-1) - 1  # (b,) right padding: the last real token of each row
            rows = logits[torch.arange(len(last), device=logits.device), last].float()  # (b, V)
            return torch.log_softmax(rows, -1)[:, ids.to(rows.device)]

        return _score_rows(model, [Encoded(c, c) for c in contexts], pad_id, batch_size, precision,
                           last_position, (len(ids),), logits=True)
    rows = labelled_rows([(ctx, c) for ctx in contexts for c in candidates])  # candidate k of text i at i·K + k
    scores = sequence_logprobs(model, rows, pad_id, batch_size=batch_size, precision=precision)
    return scores.view(len(contexts), len(candidates))


# --- the reference ------------------------------------------------------------------------


class Reference:
    """π_ref, one object for every stage: a frozen model, the policy with its adapters off, or a cache.

    - :meth:`frozen`: a model of its own (kept in eval mode, no gradient);
    - :meth:`adapters_off`: a peft (LoRA) policy scored inside ``policy.disable_adapter()``, i.e.
      the base weights the adapters were put on (no second copy of the model);
    - :meth:`cache`: precomputed sequence log-probs (N,), read by row index (``ref[idx]``,
      ``ref.cached``); it cannot score new rows.

    Model references score with :meth:`response_logprobs` and :meth:`sequence_logprobs`, always
    without gradient and in eval mode.
    """

    def __init__(self, kind: str, model=None, cached: torch.Tensor | None = None):
        if kind not in ("frozen", "adapters_off", "cache"):
            raise ValueError(f"unknown reference kind {kind!r}")
        self.kind, self.model, self.cached = kind, model, cached

    @classmethod
    def frozen(cls, model) -> Reference:
        return cls("frozen", model=model)

    @classmethod
    def adapters_off(cls, policy) -> Reference:
        if not hasattr(policy, "disable_adapter"):
            raise TypeError(f"{type(policy).__name__} has no adapters to switch off (a peft model is needed)")
        return cls("adapters_off", model=policy)

    @classmethod
    def cache(cls, logps: torch.Tensor) -> Reference:
        logps = torch.as_tensor(logps)
        if logps.ndim != 1:
            raise ValueError(f"a reference cache holds one log-prob a row, (N,); got shape {tuple(logps.shape)}")
        return cls("cache", cached=logps.float().cpu())

    def __repr__(self) -> str:
        what = f"{len(self)} rows" if self.kind == "cache" else type(self.model).__name__
        return f"Reference.{self.kind}({what})"

    def __len__(self) -> int:
        if self.cached is None:
            raise TypeError(f"{self!r} is a model, not a cache: it has no length")
        return len(self.cached)

    def __getitem__(self, idx) -> torch.Tensor:
        """Cached log-probs of rows ``idx`` (an int, slice, list or tensor of row numbers)."""
        if self.cached is None:
            raise TypeError(f"{self!r} is a model, not a cache: score rows with sequence_logprobs")
        return self.cached[idx]

    def _scoring(self, what: str):
        if self.kind == "cache":
            raise TypeError(f"a cached reference cannot compute {what} of new rows: index it by row (ref[idx])")
        return self.model.disable_adapter() if self.kind == "adapters_off" else contextlib.nullcontext()

    def response_logprobs(self, batch, temperature: float = 1.0, *, batch_size: int | None = None,
                          precision: str = "fp32") -> torch.Tensor:
        """log π_ref(y_t | x, y_<t) of a padded batch (:func:`response_logprobs`), no grad. Shape: (B, T − 1)."""
        with self._scoring("response_logprobs"), torch.no_grad(), eval_mode(self.model):
            return response_logprobs(self.model, batch, temperature, batch_size=batch_size, precision=precision)

    def sequence_logprobs(self, rows: Sequence[Encoded], pad_id: int, *, batch_size: int, precision: str = "fp32",
                          average: bool = False) -> torch.Tensor:
        """log π_ref(y | x) of rows (:func:`sequence_logprobs`). Shape: N rows -> (N,) on the CPU."""
        with self._scoring("sequence_logprobs"):
            return sequence_logprobs(self.model, rows, pad_id, batch_size=batch_size, precision=precision,
                                     average=average)


def reference_for(policy, model_name: str, ref_name: str, lora_r: int, device, compile_cfg=None) -> Reference:
    """The reference of a stage that trains ``policy`` from ``model_name`` against ``ref_name`` (empty: the same).

    LoRA on the reference itself (``lora_r > 0`` and the same name): the policy with its adapters
    off, and no second model is loaded. Otherwise the reference model is loaded frozen on
    ``device`` (behind torch.compile when ``compile_cfg`` asks for it: tether.loop.compiled).
    """
    name = ref_name or model_name
    if lora_r > 0 and name == model_name:
        return Reference.adapters_off(policy)
    from tether.models import load_model

    model = load_model(name, device=device).eval().requires_grad_(False)
    if compile_cfg is not None:
        from tether.loop import compiled

        model = compiled(model, compile_cfg)
    return Reference.frozen(model)


# --- a reference cache on disk (DPO, KTO) -------------------------------------------------


def cache_dir() -> Path:
    """``$TETHER_CACHE``, default ``~/.cache/tether``."""
    return Path(os.environ.get("TETHER_CACHE") or Path.home() / ".cache" / "tether")


def model_identity(name: str) -> str:
    """A folder: its path and every file's size and mtime; otherwise the (hub) name."""
    path = Path(name)
    if not path.is_dir():
        return name
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in (".safetensors", ".bin", ".json"))
    return json.dumps([str(path.resolve())] + [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files])


def cached_reference(ref: str, rows: Sequence[Encoded], pad_id: int, cfg) -> tuple[Reference, bool]:
    """log π_ref of every row, computed once and cached on disk; returns (Reference.cache, cache hit).

    The file is ``$TETHER_CACHE/ref_logps/<key>.safetensors``, the key a hash of the token ids
    of every row, the reference model's identity (:func:`model_identity`), the device type and
    ``cfg.precision`` (``cfg``: a tether.loop.TrainConfig). A hit loads no model at all; a file
    that is unreadable, of the wrong length or not finite is recomputed and replaced (written
    atomically). Under torchrun the cache is used only when every rank has it.
    """
    from tether.loop import resolve_device
    from tether.models import load_model

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
        return Reference.cache(logps), True
    if problem:
        log.warning("reference log-probs cache %s is unusable (%s): recomputing it", path, problem)
    else:
        log.info("reference log-probs of %d rows: computing once (cache miss, %s)", len(rows), path)
    model = load_model(ref, device=device).eval()
    logps = sequence_logprobs(model, rows, pad_id, batch_size=cfg.score_rows(), precision=cfg.precision)
    del model
    if distributed.env().main:
        write_reference_cache(path, logps)
    return Reference.cache(logps), False


def read_reference_cache(path: Path, n: int) -> tuple[torch.Tensor | None, str]:
    """(log-probs, "") from a cache file that holds ``n`` finite float log-probs; (None, why not) otherwise.

    A missing file is a plain miss (why = ""); an unreadable, truncated, wrong-shaped or non-finite
    one is reported, and the caller recomputes and replaces it.
    """
    from safetensors.torch import load_file

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
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    try:
        save_file({"logps": logps.contiguous()}, str(tmp))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
