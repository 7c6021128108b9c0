"""Batched generation with a KV cache, prompts left-padded: tether's decoding loop (tether.decoding) for the
Llama family, Hugging Face ``generate`` for every other model; the same tokens from the same seed either way.

This is tether's own sampler, the default generation backend; tether.generation defines the
backend interface (and an optional vLLM engine) that :func:`rollout` accepts. Sampling is plain temperature sampling by default: top-k / top-p are off,
because they change the distribution the KL to the reference is measured on.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch

from tether.config import check, check_fields, opt
from tether.errors import ConfigError


@torch.no_grad()
def sample(
    model,
    tokenizer,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    greedy: bool = False,
    batch_size: int = 32,
    seed: int = 0,
    top_k: int = 0,
    top_p: float = 1.0,
    index_offset: int | None = None,
    compile: bool = False,
) -> list[tuple[list[int], list[int]]]:
    """Continue each prompt; returns (prompt token ids, response token ids) per prompt.

    The response ends with EOS when the model stopped, and is cut at ``max_new_tokens`` otherwise.
    Token ids (not re-tokenised text) are what exact log-probabilities must be computed on.

    Seeding: by default one random stream, seeded with ``seed``, runs through all chunks of
    ``batch_size`` prompts. With ``index_offset`` (the global position of ``prompts[0]`` in a
    batch that several processes share) each chunk is seeded from (seed, global position of its
    first prompt), so a prompt's sample does not depend on which rank generates it, as long as
    chunk boundaries fall at the same global positions (the first chunk's seed is ``seed`` itself).

    Decoding: :func:`tether.decoding.decode` (the model's own layers over key/value buffers allocated
    once) when it supports the model, else ``generate``; ``TETHER_DECODE=generate`` in the environment
    asks for ``generate`` always (for comparisons). ``compile``: decode with a static key/value cache
    through ``torch.compile`` (Hugging Face's own compiled decoding, which it turns on by itself only on
    accelerators): the same tokens from the same seed, about 1.4x faster per token on the tiny model
    once two prompt widths have been compiled. Ignored for architectures Hugging Face cannot compile whole.
    """
    from transformers import GenerationConfig

    from tether.decoding import decode, decoder_of
    from tether.scoring import eval_mode

    device = next(model.parameters()).device
    static = _compiled_decoding() if compile and getattr(model, "_can_compile_fullgraph", False) else {}
    lean = None if static or os.environ.get("TETHER_DECODE") == "generate" else decoder_of(model)
    hf = model.get_base_model() if hasattr(model, "get_base_model") else model  # under peft: the HF model
    own_config = hf.generation_config
    # tether's settings only: transformers fills every option a call leaves unset from the model's own
    # generation_config, and a hub model's (repetition penalty, top-k, min-p, ...) would bias every KL estimate
    hf.generation_config = GenerationConfig()
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    out: list[tuple[list[int], list[int]]] = []
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    try:
        # eval mode, each module's own mode put back afterwards (a checkpointed block keeps its flag)
        with eval_mode(model), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            for i in range(0, len(prompts), batch_size):
                if index_offset is not None:
                    torch.manual_seed(chunk_seed(seed, index_offset + i))
                enc = tokenizer(list(prompts[i : i + batch_size]), return_tensors="pt", padding=True).to(device)
                if lean is not None:
                    ids = decode(lean, enc["input_ids"], enc["attention_mask"], max_new_tokens=max_new_tokens,
                                 eos_token_id=eos, pad_token_id=pad, greedy=greedy, temperature=temperature,
                                 top_k=top_k, top_p=top_p)
                else:
                    ids = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=not greedy,
                                         temperature=temperature if not greedy else None,
                                         top_k=None if greedy else top_k, top_p=None if greedy else top_p,
                                         pad_token_id=pad, eos_token_id=eos, **static)  # (B, T_prompt + T_new)
                width = enc["input_ids"].shape[1]
                for row, mask in zip(ids.tolist(), enc["attention_mask"].tolist()):
                    prompt = [t for t, m in zip(row[:width], mask) if m]
                    response = row[width:]
                    if eos in response:
                        response = response[: response.index(eos) + 1]
                    elif pad != eos:
                        response = [t for t in response if t != pad]
                    out.append((prompt, response))
    finally:
        tokenizer.padding_side = side
        hf.generation_config = own_config
    return out


def _compiled_decoding() -> dict:
    """``generate`` options for a static cache decoded through torch.compile, on every device."""
    from transformers import CompileConfig

    config = CompileConfig()
    config._compile_all_devices = True  # transformers' own switch for compiling off accelerators
    return {"cache_implementation": "static", "compile_config": config}


def chunk_seed(seed: int, position: int) -> int:
    """The seed of a generation chunk starting at global ``position``: ``seed`` for the first, mixed otherwise."""
    if position == 0:
        return seed
    return (seed * 6364136223846793005 + position * 1442695040888963407) % 2**63


def generate(model, tokenizer, prompts: Sequence[str], **kwargs) -> list[str]:
    """Continue each prompt; returns the generated text only (special tokens removed). See :func:`sample`."""
    pairs = sample(model, tokenizer, prompts, **kwargs)
    return tokenizer.batch_decode([response for _, response in pairs], skip_special_tokens=True)


# --- rollouts for the RL stages (PPO, GRPO, RLOO, best-of-N) --------------------------------


class Rollout(NamedTuple):
    """A batch of sampled responses, re-packed right-padded so that training sees plain rows.

    input_ids, attention_mask, labels: (B, T) prompt + response + padding; labels are the
        response token ids and IGNORE_INDEX elsewhere.
    mask: (B, T − 1) 1 on response tokens in the next-token frame of ``token_logprobs``
        (position t scores token t + 1), 0 on prompt and padding.
    ended: (B,) True where the response stopped by itself (EOS or a stop string).
    prompts, responses: the text (responses decoded without special tokens).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    mask: torch.Tensor
    ended: torch.Tensor
    prompts: list[str]
    responses: list[str]

    def to(self, device) -> Rollout:
        return self._replace(**{k: getattr(self, k).to(device)
                                for k in ("input_ids", "attention_mask", "labels", "mask", "ended")})

    def rows(self, idx) -> Rollout:
        """The sub-batch of rows ``idx`` (a list or tensor of row numbers)."""
        keep = torch.as_tensor(idx, dtype=torch.long)
        out = {k: getattr(self, k)[keep] for k in ("input_ids", "attention_mask", "labels", "mask", "ended")}
        return Rollout(**out, prompts=[self.prompts[i] for i in keep.tolist()],
                       responses=[self.responses[i] for i in keep.tolist()])

    def trimmed(self) -> Rollout:
        """The same rows without the columns that are padding in all of them: those past the longest row's last
        token (rows are right-padded)."""
        w = int(self.attention_mask.sum(1).max())
        return self._replace(input_ids=self.input_ids[:, :w], attention_mask=self.attention_mask[:, :w],
                             labels=self.labels[:, :w], mask=self.mask[:, : w - 1])

    def passes(self, rows: torch.Tensor, cost: int) -> list[torch.Tensor]:
        """``rows`` (one micro-batch's row numbers) cut into forward passes of like-length rows, each of which
        then runs :meth:`trimmed` (tether.loop.accumulate.length_passes: the same update, less padding)."""
        from tether.loop.accumulate import length_passes

        lengths = self.attention_mask[rows.to(self.attention_mask.device)].sum(1).tolist()
        return [rows[torch.tensor(p, dtype=torch.long, device=rows.device)] for p in length_passes(lengths, cost)]


def _cut_at_stop(tokenizer, response: list[int], stop_strings: Sequence[str]) -> tuple[list[int], bool]:
    """Shorten ``response`` to the fewest tokens whose text contains a stop string (kept)."""
    text = tokenizer.decode(response, skip_special_tokens=True)
    if not any(s in text for s in stop_strings):
        return response, False
    for n in range(1, len(response) + 1):
        if any(s in tokenizer.decode(response[:n], skip_special_tokens=True) for s in stop_strings):
            return response[:n], True
    return response, False  # unreachable: the whole response contains one


@dataclass
class SamplingConfig:
    """How responses are sampled, one group for every stage that samples: PPO, GRPO, RLOO, best-of-N and
    RLAIF (CLI options keep their leaf names: --max-new-tokens, --temperature, ...).

    The KL estimates assume plain temperature sampling: log-probs are computed on the full softmax at
    ``temperature``, so ``top_k`` / ``top_p`` (off by default) bias every KL figure. A model's own
    ``generation_config`` is never read.
    """

    max_new_tokens: int = opt(48, "longest response in tokens (also L_max of the overlong reward)")
    temperature: float = opt(1.0, "sampling temperature; log-probs are taken at the same temperature")
    top_k: int = opt(0, "top-k sampling (0: off; it biases the KL estimate, off unless you insist)")
    top_p: float = opt(1.0, "nucleus sampling (1: off; it biases the KL estimate, off unless you insist)")
    stop_strings: str = opt("", "comma-separated strings that end a response (kept in it)")
    gen_batch_size: int = opt(64, "sequences generated at once")
    backend: str = opt("tether", "generation backend: tether (the policy's own batched sampler) | vllm "
                                 "(pip install 'tether[vllm]', a GPU; weights synced after each update and on resume)")

    def validate(self) -> None:
        from tether.generation import BACKENDS

        check_fields(self, "max_new_tokens gen_batch_size", ge=1, integer=True)
        check("temperature", self.temperature, gt=0)
        check("top_k", self.top_k, ge=0, integer=True, note="0: off")
        check("top_p", self.top_p, gt=0, le=1, note="1: off")
        if self.backend not in BACKENDS:
            raise ConfigError(f"backend must be one of {BACKENDS}, got {self.backend!r}")

    def stops(self) -> list[str]:
        return [s for s in self.stop_strings.split(",") if s]


def rollout(
    model,
    tokenizer,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    stop_strings: Sequence[str] = (),
    batch_size: int = 32,
    seed: int = 0,
    index_offset: int | None = None,
    backend=None,
) -> Rollout:
    """Sample one response per prompt (repeat a prompt to get a group) and pack the batch.

    Plain temperature sampling by default. ``top_k`` / ``top_p`` truncate the distribution the
    samples come from while log-probabilities are computed on the full softmax, which biases
    every KL estimate; they are accepted only because some users insist. ``index_offset``: see
    :func:`sample` (seeding that does not depend on how a batch is split across ranks).
    ``backend``: a tether.generation backend to sample with (default: :func:`sample` on ``model``).
    """
    from tether.data.collate import Encoded, pad
    from tether.losses.lm import IGNORE_INDEX

    kwargs = dict(max_new_tokens=max_new_tokens, temperature=temperature, batch_size=batch_size, seed=seed,
                  top_k=top_k, top_p=top_p, index_offset=index_offset)
    pairs = backend.sample(prompts, **kwargs) if backend is not None else sample(model, tokenizer, prompts, **kwargs)
    eos = tokenizer.eos_token_id
    rows, responses, ended = [], [], []
    for prompt, response in pairs:
        stopped = bool(response) and response[-1] == eos
        if stop_strings and not stopped:
            response, stopped = _cut_at_stop(tokenizer, response, stop_strings)
        rows.append(Encoded(prompt + response, [IGNORE_INDEX] * len(prompt) + response))
        responses.append(response)
        ended.append(stopped)
    batch = pad(rows, tokenizer.pad_token_id)
    mask = (batch["labels"][:, 1:] != IGNORE_INDEX).long()  # (B, T-1)
    texts = tokenizer.batch_decode(responses, skip_special_tokens=True)
    return Rollout(batch["input_ids"], batch["attention_mask"], batch["labels"], mask,
                   torch.tensor(ended), list(prompts), texts)
