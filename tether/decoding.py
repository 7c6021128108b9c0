"""tether's decoding loop: the model's own decoder layers driven over key/value buffers allocated once.

Hugging Face ``generate`` does, for every new token, work a sampler of one architecture family can skip:
each layer's keys and values are concatenated into new tensors (a copy of the whole cache, per layer,
per token), the attention mask and the model inputs are rebuilt, and outputs are wrapped in classes.
:func:`decode` keeps every module of the model (embedding, rotary embedding with its scaling, decoder
layers, final norm, output layer; LoRA adapters, attention biases and grouped-query attention come
with them) and replaces only the driver around them:

- keys and values are written in place into buffers of prompt + ``max_new_tokens`` positions;
- the padding mask is made once per batch and grows by a column a token (no mask at all when no
  row is padded, as ``generate`` does for sdpa);
- the sampling step is ``generate``'s own: float32 logits of the last position, its logits warpers
  (temperature, top-k, top-p: transformers' classes), softmax, one ``torch.multinomial`` draw per row
  (or argmax), a finished row fed the padding id, a stop once every row has ended;
- a prompt that appears several times in the batch (GRPO's group, several samples a prompt) is prefilled
  once and its keys and values copied to each of its rows;
- rows that have ended leave the batch (``generate`` runs every row to the last step): once they are a
  quarter of the rows still computed, the buffers keep only the others. The draw is still made for the
  whole batch, an ended row from uniform logits whose token is then replaced by the padding id, because
  ``torch.multinomial`` uses the same random numbers for a row whatever the other rows hold: the tokens
  stay ``generate``'s.

So from the same seed it gives the same tokens as ``generate`` (tests/test_decoding.py checks it on
left-padded batches with EOS stops, sampled and greedy, with LoRA, and the tiny and SmolLM2 models).
Supported: the Llama family (``FAMILY``: Llama, SmolLM2, Qwen2, Qwen3) with sdpa or eager attention
over the whole context; :func:`decoder_of` says None for any other model (sliding windows, Gemma's
scaled embeddings, encoder-decoders, ...), which :func:`tether.rollout.sample` hands to ``generate``.
"""

from __future__ import annotations

import inspect

import torch

FAMILY = ("llama", "qwen2", "qwen3")


def decoder_of(model: torch.nn.Module):
    """The Hugging Face causal LM inside ``model`` (under peft, or compiled) when :func:`decode` can drive
    it, else None."""
    hf = model.get_base_model() if hasattr(model, "get_base_model") else model
    hf = getattr(hf, "_orig_mod", hf)
    config, inner = getattr(hf, "config", None), getattr(hf, "model", None)
    if config is None or inner is None or getattr(config, "model_type", None) not in FAMILY:
        return None
    if not all(hasattr(inner, a) for a in ("embed_tokens", "layers", "norm", "rotary_emb")) or not hasattr(hf, "lm_head"):
        return None
    if getattr(config, "_attn_implementation", None) not in ("sdpa", "eager"):
        return None
    if any(t != "full_attention" for t in getattr(config, "layer_types", None) or ()):
        return None
    if getattr(config, "sliding_window", None) is not None and getattr(config, "use_sliding_window", True):
        return None
    if cache_keyword(inner.layers[0]) is None:
        return None
    return hf


def cache_keyword(layer: torch.nn.Module) -> str | None:
    """The name a decoder layer (or a backbone) takes its key/value cache by (transformers renamed it over versions)."""
    names = inspect.signature(type(layer).forward).parameters
    return next((n for n in ("cache", "past_key_values", "past_key_value") if n in names), None)


class _Buffers:
    """Every layer's keys and values, (B, heads_kv, capacity, head_dim) each, written in place.

    A decoder layer's attention calls ``update`` with the new positions' keys and values and attends
    over what it returns: the buffers up to the last new position (views, nothing copied)."""

    def __init__(self, capacity: int):
        self.capacity, self.length = capacity, 0
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        if layer_idx not in self.keys:
            shape = (*key.shape[:2], self.capacity, key.shape[3])
            self.keys[layer_idx], self.values[layer_idx] = key.new_empty(shape), value.new_empty(shape)
        end = self.length + key.shape[2]
        k, v = self.keys[layer_idx], self.values[layer_idx]
        k[:, :, self.length : end] = key
        v[:, :, self.length : end] = value
        return k[:, :, :end], v[:, :, :end]

    def rows(self, index: torch.Tensor) -> None:
        """Keep (or repeat) the buffers' rows ``index``: one copy of what is cached."""
        for layer in self.keys:
            self.keys[layer], self.values[layer] = self.keys[layer][index], self.values[layer][index]


def _masks(config, padding: torch.Tensor, queries: int, dtype: torch.dtype) -> torch.Tensor | None:
    """The attention mask of ``queries`` new positions over the keys of ``padding`` (B, keys; 1 = a token):
    None where sdpa needs none (no padding: causal prefill by sdpa's own flag, a single query sees all),
    else a (B, 1, queries, keys) boolean (sdpa) or additive (eager) mask, causal and padding."""
    B, keys = padding.shape
    eager = config._attn_implementation == "eager"
    if not eager and bool(padding.all()):
        return None
    q = torch.arange(keys - queries, keys, device=padding.device)
    allowed = (torch.arange(keys, device=padding.device)[None, :] <= q[:, None])[None, None] & padding.bool()[:, None, None, :]
    if not eager:
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=padding.device).masked_fill(~allowed, torch.finfo(dtype).min)


@torch.no_grad()
def decode(hf, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, max_new_tokens: int, eos_token_id: int | None,
           pad_token_id: int, greedy: bool = False, temperature: float = 1.0, top_k: int = 0,
           top_p: float = 1.0) -> torch.Tensor:
    """Continue left-padded prompts (B, P); returns (B, P + n) ids as ``generate`` does: n ≤ max_new_tokens new
    tokens a row, rows that ended padded with ``pad_token_id``. ``hf``: a model :func:`decoder_of` accepted."""
    from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    inner, config = hf.model, hf.config
    warpers = LogitsProcessorList()  # generate's order: temperature, top-k, top-p
    if not greedy and temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(temperature))
    if not greedy and top_k:
        warpers.append(TopKLogitsWarper(top_k))
    if not greedy and top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p))
    cache, keyword = _Buffers(input_ids.shape[1] + max_new_tokens), cache_keyword(inner.layers[0])
    dtype = inner.embed_tokens.weight.dtype

    def last_logits(tokens: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        h = inner.embed_tokens(tokens)
        rotary = inner.rotary_emb(h, positions)
        for layer in inner.layers[: config.num_hidden_layers]:
            h = layer(h, attention_mask=mask, position_embeddings=rotary, position_ids=positions, use_cache=True,
                      **{keyword: cache})
            h = h[0] if isinstance(h, tuple) else h
        cache.length += tokens.shape[1]
        return hf.lm_head(inner.norm(h)[:, -1:, :])[:, -1, :].to(torch.float32, copy=True)

    def positions_of(padding: torch.Tensor) -> torch.Tensor:
        return (padding.cumsum(-1) - 1).masked_fill(padding == 0, 0)  # generate's: pads at position 0

    padding, (B, P) = attention_mask.long(), input_ids.shape
    positions = positions_of(padding)
    # each distinct prompt (its ids and padding) prefilled once, its cache then copied to every row that has it
    distinct, inverse = torch.unique(torch.cat([input_ids, padding], 1), dim=0, return_inverse=True)
    shared = len(distinct) < B
    ids, pads = distinct.split(P, 1) if shared else (input_ids, padding)
    scores = last_logits(ids, positions_of(pads), _masks(config, pads, P, dtype))
    if shared:
        cache.rows(inverse)
        scores = scores[inverse]
    live = torch.arange(B, device=input_ids.device)  # the rows still computed, in the buffers' order
    finished = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
    new: list[torch.Tensor] = []
    for step in range(max_new_tokens):
        if greedy:
            token = scores.argmax(-1)
        else:
            token = torch.multinomial(torch.softmax(warpers(input_ids, scores), dim=-1), num_samples=1).squeeze(1)
        if eos_token_id is not None:
            token = torch.where(finished, pad_token_id, token)
            finished |= token == eos_token_id
        new.append(token)
        if step == max_new_tokens - 1 or bool(finished.all()):
            break
        ended = finished[live]
        if 4 * int(ended.sum()) >= len(live):  # a quarter of the computed rows have ended: they leave the batch
            keep = (~ended).nonzero().squeeze(1)
            live, padding, positions = live[keep], padding[keep], positions[keep]
            cache.rows(keep)
        padding, positions = torch.cat([padding, padding.new_ones(len(live), 1)], 1), positions[:, -1:] + 1
        out = last_logits(token[live, None], positions, _masks(config, padding, 1, dtype))
        # ended rows draw from uniform logits (same random numbers for the others); their token becomes padding
        scores = out if len(live) == B else out.new_zeros(B, out.shape[1]).index_copy_(0, live, out)
    return torch.cat([input_ids, torch.stack(new, 1)], 1)
