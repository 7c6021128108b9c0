"""Where rollouts come from: a small backend interface, tether's own sampler by default, vLLM optionally.

An RL stage asks its backend for samples (prompt token ids, response token ids) and calls
``sync(model)`` after every optimiser update and after loading a checkpoint to resume from, so the
backend always samples from the current policy (an engine such as vLLM holds its own copy of the
weights, loaded from the starting policy's folder):

    backend = make_backend("tether", model, tokenizer)   # or "vllm" (pip install 'tether[vllm]', a GPU)
    pairs = backend.sample(prompts, max_new_tokens=48, temperature=1.0, batch_size=64, seed=0)
    ...update the model...
    backend.sync(model)

``tether`` (the default) is :func:`tether.rollout.sample`: batched sampling with a KV cache on the
training model itself, so ``sync`` has nothing to copy. ``vllm`` hands generation to a vLLM engine
on the same GPU and copies the policy's weights into it after each update. Log-probabilities are
always recomputed by the training model on the returned token ids, so the backend changes speed,
not the losses.

The vLLM adapter is thin and was not run where it was written (no GPU, no vLLM there); what is
tested is that asking for it without vLLM installed is a clear error naming the extra.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch

BACKENDS = ("tether", "vllm")

Pairs = list[tuple[list[int], list[int]]]


class Backend(Protocol):
    def sample(self, prompts: Sequence[str], *, max_new_tokens: int, temperature: float, batch_size: int, seed: int,
               top_k: int = 0, top_p: float = 1.0, index_offset: int | None = None) -> Pairs:
        """(prompt ids, response ids) per prompt; a response ends with EOS when the model stopped."""

    def sync(self, model: torch.nn.Module) -> None:
        """Make the next samples come from ``model``'s current weights."""


class TetherSampler:
    """The default backend: :func:`tether.rollout.sample` on the training model (nothing to sync)."""

    def __init__(self, model: torch.nn.Module, tokenizer, *, compile: bool = False):
        self.model, self.tokenizer, self.compile = model, tokenizer, compile

    def sample(self, prompts, **kwargs) -> Pairs:
        from tether.rollout import sample

        return sample(self.model, self.tokenizer, prompts, compile=self.compile, **kwargs)

    def sync(self, model: torch.nn.Module) -> None:
        self.model = model


def _import_vllm():
    try:
        import vllm
    except ImportError as e:
        raise ImportError("the vllm generation backend needs vLLM, which is not installed: "
                          "pip install 'tether[vllm]' (a CUDA GPU is required), or use --backend tether") from e
    return vllm


class VLLMSampler:
    """Generation by a vLLM engine on this process's GPU, loaded from ``model_path`` (the starting
    policy's folder) and kept in step with the training model by :meth:`sync`.

    Seeds: each prompt gets its own vLLM seed from (seed, its global position), so samples do not
    depend on batching; they differ from the tether sampler's (another random stream).
    """

    def __init__(self, model_path: str, tokenizer, *, gpu_memory_utilization: float = 0.3, dtype: str = "auto"):
        vllm = _import_vllm()
        self.vllm, self.tokenizer = vllm, tokenizer
        self.llm = vllm.LLM(model=str(model_path), tokenizer=str(model_path), dtype=dtype,
                            gpu_memory_utilization=gpu_memory_utilization, enable_prefix_caching=False)

    def sample(self, prompts, *, max_new_tokens: int, temperature: float, batch_size: int, seed: int, top_k: int = 0,
               top_p: float = 1.0, index_offset: int | None = None, greedy: bool = False) -> Pairs:
        from tether.rollout import chunk_seed

        ids = [self.tokenizer(p)["input_ids"] for p in prompts]
        first = index_offset or 0
        params = [self.vllm.SamplingParams(temperature=0.0 if greedy else temperature, top_k=top_k or -1, top_p=top_p,
                                           max_tokens=max_new_tokens, seed=chunk_seed(seed, first + i) % 2**31)
                  for i in range(len(prompts))]
        outputs = self.llm.generate([{"prompt_token_ids": p} for p in ids], params, use_tqdm=False)
        eos = self.tokenizer.eos_token_id
        pairs = []
        for prompt, out in zip(ids, outputs):
            response = list(out.outputs[0].token_ids)
            if out.outputs[0].finish_reason == "stop" and (not response or response[-1] != eos):
                response.append(eos)  # stopped by EOS: tether's responses keep it, as the sampler's do
            pairs.append((prompt, response))
        return pairs

    def sync(self, model: torch.nn.Module) -> None:
        """Copy the policy's weights into the engine (vLLM's in-process model runner)."""
        model = model.module if hasattr(model, "module") else model
        if hasattr(model, "merge_and_unload"):
            raise ValueError("the vllm backend does not take LoRA policies; use --backend tether")
        try:
            runner = self.llm.llm_engine.model_executor.driver_worker.model_runner.model
        except AttributeError as e:
            raise RuntimeError("this vLLM version does not expose its model runner in-process "
                               "(llm_engine.model_executor.driver_worker.model_runner); weights cannot be synced") from e
        runner.load_weights((name, p.detach()) for name, p in model.state_dict().items())


def make_backend(name: str, model: torch.nn.Module, tokenizer, *, model_path: str = "",
                 compile: bool = False) -> Backend:
    """``tether`` (the training model's own sampler; ``compile``: compiled static-cache decoding)
    or ``vllm`` (an engine loaded from ``model_path``)."""
    if name == "tether":
        return TetherSampler(model, tokenizer, compile=compile)
    if name == "vllm":
        return VLLMSampler(model_path, tokenizer)
    raise ValueError(f"generation backend must be one of {BACKENDS}, got {name!r}")


def sample_as(backend: Backend, tokenizer, prompts: Sequence[str], sampling, *, seed: int,
              greedy: bool = False) -> Pairs:
    """(prompt ids, response ids) per prompt, sampled as ``sampling`` (a :class:`tether.rollout.SamplingConfig`)
    says: its length, temperature, top-k / top-p and generation batch; a response that did not end with EOS
    is cut at the first stop string (kept), as :func:`tether.rollout.rollout` cuts it. For the stages that
    sample without training (best-of-N, RLAIF); ``greedy`` ignores temperature, top-k and top-p."""
    from tether.rollout import _cut_at_stop

    pairs = backend.sample(prompts, max_new_tokens=sampling.max_new_tokens, temperature=sampling.temperature,
                           top_k=sampling.top_k, top_p=sampling.top_p, batch_size=sampling.gen_batch_size, seed=seed,
                           **({"greedy": True} if greedy else {}))
    stops, eos = sampling.stops(), tokenizer.eos_token_id
    if stops:
        pairs = [(prompt, response if response and response[-1] == eos else _cut_at_stop(tokenizer, response, stops)[0])
                 for prompt, response in pairs]
    return pairs
