"""An OpenAI-compatible HTTP endpoint as a judge (and as the writer of critiques and revisions).

Two endpoints are supported, both as the OpenAI API defines them and as vLLM, llama.cpp's server
and most gateways serve them:

- ``chat``: POST {base_url}/chat/completions with ``messages=[{"role": "user", "content": q}]``,
  ``max_tokens=1``, ``logprobs=true``, ``top_logprobs=k``; the choice log-probs are read from
  ``choices[0].logprobs.content[0].top_logprobs`` (a list of {"token", "logprob"});
- ``completions``: POST {base_url}/completions with ``prompt=q``, ``max_tokens=1``, ``logprobs=k``;
  read from ``choices[0].logprobs.top_logprobs[0]`` (a {token: logprob} map).

A token counts as choice A when its text stripped of spaces is "A" (" A" and "A" both occur,
depending on the template); where both forms are listed their probabilities add. When only one
choice is among the top k, the other's log-prob is bounded above by the smallest listed one and
that bound is used (counted in ``self.bounded``); when neither is, the request is an error.

The API key is read from the environment variable named by ``api_key_env`` at each request and
sent only as the ``Authorization: Bearer`` header: it is never stored on the object, logged,
written to provenance or put in an error message. Failed requests (connection errors,
timeouts, HTTP 429 and 5xx) are retried with exponential backoff: the k-th retry (k = 0, 1, ...)
waits min(backoff · 2^k, max_backoff) seconds; other HTTP errors fail at once.
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence

from tether.errors import TetherError
from tether.rlaif.judge import two_way_softmax

log = logging.getLogger("tether.rlaif")

ENDPOINTS = ("chat", "completions")
RETRY_STATUS = (429, 500, 502, 503, 504)


class HTTPError(TetherError, RuntimeError):
    """A request that failed for good (after its retries, or at once for a client error)."""


class HTTPClient:
    """POST JSON to an OpenAI-compatible server, with retries and exponential backoff."""

    def __init__(self, base_url: str, *, api_key_env: str = "", timeout: float = 60.0, retries: int = 5,
                 backoff: float = 1.0, max_backoff: float = 30.0, sleep: Callable[[float], None] = time.sleep):
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url must start with http:// or https://, got {base_url!r}")
        if api_key_env and api_key_env not in os.environ:
            raise ValueError(f"the environment variable {api_key_env!r} (named by --api-key-env) is not set")
        if retries < 0 or backoff < 0:
            raise ValueError("retries and backoff must be non-negative")
        self.base_url, self.api_key_env, self.timeout = base_url.rstrip("/"), api_key_env, timeout
        self.retries, self.backoff, self.max_backoff, self.sleep = retries, backoff, max_backoff, sleep
        self.requests = self.retried = 0

    def __repr__(self) -> str:  # no key here: it is never held
        return f"HTTPClient({self.base_url!r}, api_key_env={self.api_key_env!r})"

    def _redact(self, text: str) -> str:
        key = os.environ.get(self.api_key_env, "") if self.api_key_env else ""
        return text.replace(key, "***") if key else text

    def delay(self, attempt: int) -> float:
        """Seconds before retry ``attempt`` (0-based): min(backoff · 2^attempt, max_backoff)."""
        return min(self.backoff * 2.0 ** attempt, self.max_backoff)

    def post(self, path: str, payload: dict) -> dict:
        """The JSON reply to POST {base_url}{path}; retried as the module doc says."""
        url = self.base_url + path
        body = json.dumps(payload).encode()
        for attempt in range(self.retries + 1):
            headers = {"Content-Type": "application/json"}
            if self.api_key_env:
                headers["Authorization"] = "Bearer " + os.environ.get(self.api_key_env, "")
            request = urllib.request.Request(url, data=body, headers=headers, method="POST")
            self.requests += 1
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    text = response.read().decode("utf-8")
                try:
                    return json.loads(text)
                except json.JSONDecodeError:
                    raise HTTPError(f"POST {url}: the reply is not JSON: {self._redact(text[:200])!r}") from None
            except urllib.error.HTTPError as e:
                detail = self._redact(e.read().decode("utf-8", "replace")[:200])
                if e.code not in RETRY_STATUS:
                    raise HTTPError(f"POST {url}: HTTP {e.code} ({detail!r}); not retried") from None
                why = f"HTTP {e.code}"
            except (urllib.error.URLError, socket.timeout, ConnectionError) as e:
                why = self._redact(f"{type(e).__name__}: {getattr(e, 'reason', e)}")
            if attempt == self.retries:
                raise HTTPError(f"POST {url}: {why}, and {self.retries} retries failed too")
            wait = self.delay(attempt)
            log.warning("POST %s: %s; retry %d of %d in %.3g s", url, why, attempt + 1, self.retries, wait)
            self.retried += 1
            self.sleep(wait)
        raise AssertionError("unreachable")


def _choice_logprobs(pairs: Sequence[tuple[str, float]]) -> tuple[float | None, float | None, float]:
    """(log P(A), log P(B), smallest listed log-prob) from (token, logprob) pairs; forms of a choice add."""
    mass = {"A": 0.0, "B": 0.0}
    found = {"A": False, "B": False}
    lowest = math.inf
    for token, logprob in pairs:
        lowest = min(lowest, logprob)
        key = token.strip()
        if key in mass:
            mass[key] += math.exp(logprob)
            found[key] = True
    return (math.log(mass["A"]) if found["A"] else None, math.log(mass["B"]) if found["B"] else None, lowest)


class HTTPJudge:
    """A judge served over HTTP (module doc); ``choice_probs`` as :class:`tether.rlaif.judge.LMJudge`."""

    def __init__(self, client: HTTPClient, model: str, *, endpoint: str = "chat", top_logprobs: int = 5):
        if endpoint not in ENDPOINTS:
            raise ValueError(f"endpoint must be one of {ENDPOINTS}, got {endpoint!r}")
        self.client, self.model, self.endpoint, self.top_logprobs = client, model, endpoint, top_logprobs
        self.name = f"http:{client.base_url}/{'chat/completions' if endpoint == 'chat' else 'completions'}:{model}"
        self.bounded = 0

    def _listed(self, text: str) -> list[tuple[str, float]]:
        if self.endpoint == "chat":
            reply = self.client.post("/chat/completions", {
                "model": self.model, "messages": [{"role": "user", "content": text}], "max_tokens": 1,
                "temperature": 0, "logprobs": True, "top_logprobs": self.top_logprobs})
            try:
                top = reply["choices"][0]["logprobs"]["content"][0]["top_logprobs"]
                return [(t["token"], float(t["logprob"])) for t in top]
            except (KeyError, IndexError, TypeError, ValueError):
                raise HTTPError(f"{self.name}: expected choices[0].logprobs.content[0].top_logprobs in the reply, "
                                f"got {json.dumps(reply)[:200]}") from None
        reply = self.client.post("/completions", {"model": self.model, "prompt": text, "max_tokens": 1,
                                                  "temperature": 0, "logprobs": self.top_logprobs})
        try:
            return [(t, float(lp)) for t, lp in reply["choices"][0]["logprobs"]["top_logprobs"][0].items()]
        except (KeyError, IndexError, TypeError, AttributeError, ValueError):
            raise HTTPError(f"{self.name}: expected choices[0].logprobs.top_logprobs[0] in the reply, "
                            f"got {json.dumps(reply)[:200]}") from None

    def choice_probs(self, texts: Sequence[str]) -> list[float]:
        out = []
        for text in texts:
            la, lb, lowest = _choice_logprobs(self._listed(text))
            if la is None and lb is None:
                raise HTTPError(f"{self.name}: neither 'A' nor 'B' is among the top {self.top_logprobs} tokens of "
                                "the reply; raise --top-logprobs or use a model that follows the question")
            if la is None or lb is None:
                self.bounded += 1
            out.append(two_way_softmax(lowest if la is None else la, lowest if lb is None else lb))
        return out


class HTTPGenerator:
    """Text from an OpenAI-compatible endpoint (critiques and revisions): ``generate(prompts) -> texts``."""

    def __init__(self, client: HTTPClient, model: str, *, endpoint: str = "chat", max_tokens: int = 256,
                 temperature: float = 0.0):
        if endpoint not in ENDPOINTS:
            raise ValueError(f"endpoint must be one of {ENDPOINTS}, got {endpoint!r}")
        self.client, self.model, self.endpoint = client, model, endpoint
        self.max_tokens, self.temperature = max_tokens, temperature
        self.name = f"http:{client.base_url}/{'chat/completions' if endpoint == 'chat' else 'completions'}:{model}"

    def generate(self, prompts: Sequence[str]) -> list[str]:
        out = []
        for text in prompts:
            args = {"model": self.model, "max_tokens": self.max_tokens, "temperature": self.temperature}
            try:
                if self.endpoint == "chat":
                    reply = self.client.post("/chat/completions", {**args, "messages": [{"role": "user", "content": text}]})
                    out.append(reply["choices"][0]["message"]["content"])
                else:
                    reply = self.client.post("/completions", {**args, "prompt": text})
                    out.append(reply["choices"][0]["text"])
            except (KeyError, IndexError, TypeError) as e:
                raise HTTPError(f"{self.name}: unexpected reply shape ({type(e).__name__}: {e})") from None
        return out
