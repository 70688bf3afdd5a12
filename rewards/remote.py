"""The ``remote`` reward: a reward that runs on a reward server (``visalign rewards serve``).

``remote:url=http://gpu-box:8700,name=pickscore`` behaves like the served reward (same scores,
components and validity) wherever a reward is taken: ``visalign score``, ``visalign train``,
``visalign steer``, ``combine``.  Images travel as lossless PNG (quantised to 8 bits, as every
saved image is), in JSON (:mod:`visalign.rewards.wire`); no gradient crosses the wire, so the
reward is not differentiable.  The client needs only the standard library.

Connection errors, timeouts and 5xx answers (503: the server is busy) are retried with exponential
back-off; when the server stays away the error names its URL and what to check.
"""

from __future__ import annotations

import http.client
import json
import math
import os
import time
import urllib.parse
from typing import Any, Sequence

import torch

from .base import Reward, RewardInfo, RewardOutput
from .http_client import KeptAliveHTTP
from .wire import ENCODINGS, PROTOCOL, encode_batch

__all__ = ["RemoteReward", "RemoteRewardError", "remote", "TOKEN_ENV"]

TOKEN_ENV = "VISALIGN_REWARD_TOKEN"
_MAX_BACKOFF = 8.0  # seconds between two tries, at most


class RemoteRewardError(ConnectionError):
    """The reward server is unreachable or refused a request; the message names the URL."""


class RemoteReward(KeptAliveHTTP, Reward):
    """A reward scored by a reward server.

    Args:
        url (`str`): the server, ``http://host:port`` (``https://`` through a TLS proxy).
        name (`str`, *optional*): the served reward; may be left out when the server serves one.
        token (`str`, *optional*): bearer token; defaults to ``$VISALIGN_REWARD_TOKEN``.
        timeout (`float`, *optional*, defaults to 120): seconds to wait for one answer.
        retries (`int`, *optional*, defaults to 5): further tries after a connection error, a
            timeout or a 5xx answer, with back-off ``backoff * 2**k`` seconds (at most 8 s).
        batch (`int`, *optional*, defaults to 32): items per request (requests above the server's
            size limit are split further).
        concurrency (`int`, *optional*, defaults to 1): requests in flight at once for one call;
            the server batches them together.
        backoff (`float`, *optional*, defaults to 0.5): the first back-off, in seconds.
        encoding (`str`, *optional*, defaults to ``"png"``): how images travel, both lossless:
            ``"png"`` (compressed; for slow links and tunnels) or ``"raw"`` (uncompressed pixels:
            cheaper to encode and decode, 1.5-4x more bytes; for a fast network).
    """

    thread_prefix = "visalign-remote"

    def __init__(self, url: str, name: str | None = None, token: str | None = None, timeout: float = 120.0,
                 retries: int = 5, batch: int = 32, concurrency: int = 1, backoff: float = 0.5,
                 encoding: str = "png") -> None:
        parts = urllib.parse.urlsplit(str(url))
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"remote reward: url={url!r} is not an http(s) URL; give e.g. url=http://127.0.0.1:8700")
        for key, value, low in (("timeout", timeout, 0), ("retries", retries, -1), ("batch", batch, 0),
                                ("concurrency", concurrency, 0), ("backoff", backoff, -1)):
            if not isinstance(value, (int, float)) or value <= low:
                raise ValueError(f"remote reward: {key}={value!r} must be a number > {low}")
        if encoding not in ENCODINGS:
            raise ValueError(f"remote reward: encoding={encoding!r}; choose one of {', '.join(ENCODINGS)}")
        self.encoding = encoding
        self.url = f"{parts.scheme}://{parts.netloc}{parts.path.rstrip('/')}"
        self._parts = parts
        self.token = token if token is not None else os.environ.get(TOKEN_ENV) or None
        self.timeout, self.retries, self.batch = float(timeout), int(retries), int(batch)
        self.concurrency, self.backoff = int(concurrency), float(backoff)
        self._init_http()
        health = self._get_health()
        served = health.get("rewards") or {}
        if name is None:
            if len(served) != 1:
                raise ValueError(f"remote reward: the server at {self.url} serves {sorted(served)}; "
                                 "choose one with name=")
            name = next(iter(served))
        if name not in served:
            raise ValueError(f"remote reward: the server at {self.url} does not serve {name!r}; it serves "
                             f"{', '.join(sorted(served)) or 'nothing'}")
        if health.get("protocol") != PROTOCOL:
            raise ValueError(f"remote reward: the server at {self.url} speaks protocol {health.get('protocol')!r}, "
                             f"this client {PROTOCOL}; install the same visalign version on both machines")
        self.name = name
        self.max_request_bytes = int(float(health.get("limits", {}).get("max_request_mb", 64)) * 1_000_000)
        facts = served[name]
        lo, hi = (float("-inf") if v is None else float(v) for v in facts.get("native_range", (None, None)))
        self.info = RewardInfo(
            name=name, version=str(facts.get("version", "1")), licence=str(facts.get("licence", "none")),
            modality=str(facts.get("modality", "image")), inputs=tuple(facts.get("inputs", ("images",))),
            native_range=(lo, hi if hi != float("-inf") else float("inf")), differentiable=False,
            weights=f"served by {self.url} ({facts.get('weights', 'none')})",
            description=f"remote: {facts.get('description', '')}")

    # ---- HTTP -------------------------------------------------------------------------------

    def _once(self, method: str, path: str, body: bytes | None) -> tuple[int, dict]:
        resp, data = self._exchange(method, path, body, self.token)
        if isinstance(data, bytes):
            data = {"error": data[:300].decode("utf-8", "replace")}
        return resp.status, data if isinstance(data, dict) else {"error": str(data)[:300]}

    def _send(self, method: str, path: str, body: bytes | None = None) -> dict:
        last = ""
        for attempt in range(self.retries + 1):
            try:
                status, data = self._once(method, path, body)
            except (OSError, http.client.HTTPException) as err:
                last = f"{type(err).__name__}: {err}"
            else:
                if status == 200:
                    return data
                message = data.get("error", data)
                if status < 500:
                    raise RemoteRewardError(self._refused(status, message)) from None
                last = f"HTTP {status}: {message}"
            if attempt < self.retries:
                time.sleep(min(self.backoff * 2 ** attempt, _MAX_BACKOFF))
        raise RemoteRewardError(
            f"reward server {self.url} did not answer after {self.retries + 1} tries (last: {last}). Is it running? "
            f"Start it on the reward machine with `visalign rewards serve SPEC --port PORT`, check url= (and that "
            "an SSH tunnel, if you use one, is open); retries= and timeout= give a slow server more time.")

    def _refused(self, status: int, message: Any) -> str:
        hint = {401: f" Pass the server's token with token=... or ${TOKEN_ENV}.",
                413: " Lower batch= (items per request) or raise the server's --max-request-mb.",
                404: " Choose a served reward with name=."}.get(status, "")
        return f"reward server {self.url} refused the request (HTTP {status}): {message}.{hint}"

    def _get_health(self) -> dict:
        return self._send("GET", "/health")

    def health(self) -> dict:
        """The server's ``/health`` answer: status, served rewards, limits and counters."""
        return self._get_health()

    # ---- scoring ----------------------------------------------------------------------------

    def _request(self, images: torch.Tensor, prompts: Sequence[str] | None, metadata: Sequence[dict] | None,
                 start: int) -> list[dict]:
        """Score one chunk; split it when its body is over the server's limit.  One answer per request."""
        key = "videos" if images.ndim == 5 else "images"
        payload: dict[str, Any] = {"reward": self.name, key: encode_batch(images, self.encoding)}
        if prompts is not None:
            payload["prompts"] = list(prompts)
        if metadata is not None:
            payload["metadata"] = list(metadata)
        try:
            body = json.dumps(payload, allow_nan=False).encode()
        except (TypeError, ValueError) as err:
            raise ValueError(f"remote reward {self.name!r}: the metadata of items {start}..{start + len(images) - 1} "
                             f"cannot be sent as JSON ({err}); keep task metadata to strings, numbers, lists and dicts") from None
        if len(body) > self.max_request_bytes:
            if images.shape[0] == 1:
                raise ValueError(f"remote reward {self.name!r}: item {start} alone is {len(body) / 1e6:.1f} MB, over the "
                                 f"server's --max-request-mb ({self.max_request_bytes / 1e6:g} MB); send smaller images "
                                 "or raise the server's limit")
            half = images.shape[0] // 2
            return [*self._request(images[:half], prompts and prompts[:half], metadata and metadata[:half], start),
                    *self._request(images[half:], prompts and prompts[half:], metadata and metadata[half:], start + half)]
        answer = self._send("POST", "/score", body)
        if len(answer.get("scores", ())) != images.shape[0]:
            raise RemoteRewardError(f"reward server {self.url} answered {len(answer.get('scores', ()))} scores for "
                                    f"{images.shape[0]} items; is it the same visalign version?")
        return [answer]

    def score(self, images: torch.Tensor, prompts: Sequence[str] | None, references: Any,
              metadata: Sequence[dict] | None) -> RewardOutput:
        b = images.shape[0]
        chunks = [(images[i:i + self.batch], prompts[i:i + self.batch] if prompts is not None else None,
                   metadata[i:i + self.batch] if metadata is not None else None, i) for i in range(0, b, self.batch)]
        answers = [a for part in self._fan_out(self._request, chunks) for a in part]
        scores = [s for a in answers for s in a["scores"]]
        errors = [e for a in answers for e in a.get("errors", [None] * len(a["scores"]))]
        keys = list(dict.fromkeys(k for a in answers for k in a.get("components", {})))
        comps = {k: [v for a in answers for v in a.get("components", {}).get(k, [None] * len(a["scores"]))] for k in keys}

        def tensor(values: list) -> torch.Tensor:
            return torch.tensor([math.nan if v is None else float(v) for v in values], dtype=torch.float32,
                                device=images.device)

        extra_keys = list(dict.fromkeys(k for a in answers for k in a.get("extras", {})))
        extras = {k: [v for a in answers for v in a.get("extras", {}).get(k, [None] * len(a["scores"]))]
                  for k in extra_keys}
        extras["reason"] = [e or "" for e in errors]  # the server's per-item message, the reward's reason included
        valid = torch.tensor([s is not None and e is None for s, e in zip(scores, errors)], device=images.device)
        return RewardOutput(scores=tensor(scores), components={k: tensor(v) for k, v in comps.items()}, valid=valid,
                            extras=extras)


    def __repr__(self) -> str:
        return f"RemoteReward(url={self.url!r}, name={self.name!r})"


def remote(url: str, name: str | None = None, token: str | None = None, timeout: float = 120.0, retries: int = 5,
           batch: int = 32, concurrency: int = 1, backoff: float = 0.5, encoding: str = "png") -> RemoteReward:
    """Factory of the ``remote`` reward: ``remote:url=http://host:8700,name=pickscore[,token=...,timeout=120,
    retries=5,batch=32,concurrency=1,backoff=0.5,encoding=png]`` (the options of :class:`RemoteReward`)."""
    return RemoteReward(url, name, token=token, timeout=timeout, retries=retries, batch=batch,
                        concurrency=concurrency, backoff=backoff, encoding=encoding)
