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
sent only as the ``Authorization: Bearer`` header, and only to the origin (scheme, host and port)
of ``base_url``: a redirect elsewhere is followed without it. It is never stored on the object,
logged, written to provenance or put in an error message (every message, reply body, URL and
exception text is redacted before it is cut short or shown). Failed requests (connection errors,
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
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence

from tether.errors import TetherError
from tether.rlaif.judge import two_way_softmax

log = logging.getLogger("tether.rlaif")

ENDPOINTS = ("chat", "completions")
RETRY_STATUS = (429, 500, 502, 503, 504)


class HTTPError(TetherError, RuntimeError):
    """A request that failed for good (after its retries, or at once for a client error)."""


def _origin(url: str) -> tuple[str, str, int | None]:
    """(scheme, host, port) of ``url``, the port filled in from the scheme when it is not given."""
    parts = urllib.parse.urlsplit(url)
    scheme = parts.scheme.lower()
    try:
        port = parts.port or {"http": 80, "https": 443}.get(scheme)
    except ValueError:  # a malformed port: an origin of its own
        port = None
    return scheme, (parts.hostname or "").lower(), port


class _SameOriginCredentials(urllib.request.HTTPRedirectHandler):
    """Follow redirects as urllib does, but drop the Authorization header when one leaves the origin."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is not None and _origin(newurl) != _origin(req.full_url):
            for name in [k for k in new.headers if k.lower() == "authorization"]:
                del new.headers[name]
            for name in [k for k in new.unredirected_hdrs if k.lower() == "authorization"]:
                del new.unredirected_hdrs[name]
            log.warning("HTTP %d: redirected to another origin; the API key is not sent there", code)
        return new


_OPENER = urllib.request.build_opener(_SameOriginCredentials)


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
        return self.redact(f"HTTPClient({self.base_url!r}, api_key_env={self.api_key_env!r})")

    def redact(self, text: str, limit: int | None = None) -> str:
        """``text`` with the API key (as sent, and as JSON or a URL would escape it) replaced by ``***``,
        then cut to ``limit`` characters: cutting first could leave part of the key behind."""
        key = os.environ.get(self.api_key_env, "") if self.api_key_env else ""
        if key:
            for form in {key, json.dumps(key)[1:-1], json.dumps(key, ensure_ascii=False)[1:-1],
                         urllib.parse.quote(key), urllib.parse.quote_plus(key)}:
                text = text.replace(form, "***")
        return text if limit is None else text[:limit]

    def delay(self, attempt: int) -> float:
        """Seconds before retry ``attempt`` (0-based): min(backoff · 2^attempt, max_backoff)."""
        return min(self.backoff * 2.0 ** attempt, self.max_backoff)

    def post(self, path: str, payload: dict) -> dict:
        """The JSON reply to POST {base_url}{path}; retried as the module doc says."""
        url = self.base_url + path
        shown = self.redact(url)  # the URL as messages name it
        body = json.dumps(payload).encode()
        for attempt in range(self.retries + 1):
            headers = {"Content-Type": "application/json"}
            if self.api_key_env:
                headers["Authorization"] = "Bearer " + os.environ.get(self.api_key_env, "")
            request = urllib.request.Request(url, data=body, headers=headers, method="POST")
            self.requests += 1
            try:
                with _OPENER.open(request, timeout=self.timeout) as response:
                    text = response.read().decode("utf-8", "replace")
                try:
                    return json.loads(text)
                except json.JSONDecodeError:
                    raise HTTPError(f"POST {shown}: the reply is not JSON: {self.redact(text, 200)!r}") from None
            except urllib.error.HTTPError as e:
                detail = self.redact(e.read().decode("utf-8", "replace"), 200)
                if e.code not in RETRY_STATUS:
                    raise HTTPError(f"POST {shown}: HTTP {e.code} ({detail!r}); not retried") from None
                why = f"HTTP {e.code}"
            except (urllib.error.URLError, socket.timeout, ConnectionError, OSError) as e:
                why = self.redact(f"{type(e).__name__}: {getattr(e, 'reason', e)}")
            if attempt == self.retries:
                raise HTTPError(f"POST {shown}: {why}, and {self.retries} retries failed too")
            wait = self.delay(attempt)
            log.warning("POST %s: %s; retry %d of %d in %.3g s", shown, why, attempt + 1, self.retries, wait)
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
        self.name = client.redact(f"http:{client.base_url}/{'chat/completions' if endpoint == 'chat' else 'completions'}"
                                  f":{model}")
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
                                f"got {self.client.redact(json.dumps(reply), 200)}") from None
        reply = self.client.post("/completions", {"model": self.model, "prompt": text, "max_tokens": 1,
                                                  "temperature": 0, "logprobs": self.top_logprobs})
        try:
            return [(t, float(lp)) for t, lp in reply["choices"][0]["logprobs"]["top_logprobs"][0].items()]
        except (KeyError, IndexError, TypeError, AttributeError, ValueError):
            raise HTTPError(f"{self.name}: expected choices[0].logprobs.top_logprobs[0] in the reply, "
                            f"got {self.client.redact(json.dumps(reply), 200)}") from None

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
        self.name = client.redact(f"http:{client.base_url}/{'chat/completions' if endpoint == 'chat' else 'completions'}"
                                  f":{model}")

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
                raise HTTPError(self.client.redact(f"{self.name}: unexpected reply shape ({type(e).__name__}: {e}); "
                                                   f"got {json.dumps(reply)}", 300)) from None
        return out
