"""The ``vlm-api`` reward: a VLM judge behind any OpenAI-compatible chat-completions server.

``vlm-api:url=http://127.0.0.1:8000/v1,model=Qwen/Qwen2.5-VL-7B-Instruct`` asks the server the
questions of the in-process VLM judges, one chat request per image with the image attached as a
``data:`` URL, and turns the answer into a score:

- ``mode=vqa`` (default): VQAScore's question (Lin et al. 2024, "Evaluating Text-to-Visual
  Generation with Image-to-Text Generation"), ``Does this figure show "{prompt}"? Please answer yes
  or no.``  With log-probabilities, P(yes) and P(no) of the first answer token, each summed over
  its spellings (``Yes``, `` yes``, ``YES``...), give the ``p_yes`` / ``p_yes_norm`` / ``log_odds``
  readings of :mod:`visalign.rewards.vlm`.
- ``mode=rubric``: the 1-5 rubric of ``vlm-judge``; with log-probabilities the score is the
  expected rating over the digit tokens ``1``..``5`` of the first answer token, normalised over
  the digits the server lists.
- ``mode=unifiedreward``: UnifiedReward's point-wise question (Wang et al. 2025, "Unified Reward
  Model for Multimodal Understanding and Generation"; serve ``CodeGoat24/UnifiedReward-qwen-7b``):
  the reply's ``Final Score:`` from 1 to 5; with log-probabilities, the expected score over the
  digits at that position (as the in-process ``unifiedreward`` reads it).

Servers that return no log-probabilities (``transformers serve``) are read from the answer's text
instead: ``yes`` -> 1, ``no`` -> 0, or the first standalone digit 1-5 for the rubric.  An answer
that says neither marks its sample invalid (score NaN, the reason in ``extras["reason"]``), never 0.

The client needs only the standard library.  No gradient crosses the wire: the reward is not
differentiable.  The API key is read from an environment variable, never from the spec.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import math
import os
import re
import time
import urllib.parse
from typing import Any, Sequence

import numpy as np
import torch

from .base import Reward, RewardInfo, RewardOutput
from .http_client import KeptAliveHTTP
from .unifiedreward import POINT_PROMPT, parse_unifiedreward_point, point_from_openai_logprobs
from .vlm import RUBRIC, VQA_QUESTION, parse_rating
from .wire import encode_png, to_uint8

__all__ = ["VLMAPIReward", "VLMAPIError", "vlm_api", "KEY_ENV", "read_yes_no", "read_rating", "parse_yes_no"]

#: where the API key is read from unless ``api_key_env=`` names another variable
KEY_ENV = "VISALIGN_VLM_API_KEY"
MODES = ("vqa", "rubric", "unifiedreward")
VARIANTS = ("p_yes_norm", "p_yes", "log_odds")
IMAGE_FORMATS = ("png", "jpeg")
LOG_ODDS_CAP = 20.0  # a text answer's log-odds: the ends of the reading's range
_MAX_BACKOFF = 8.0  # seconds between two tries, at most
_RETRY_STATUS = {408, 429}  # and every 5xx


class VLMAPIError(ConnectionError):
    """The chat server is unreachable or refused a request; the message names the URL."""


# ---- reading answers ---------------------------------------------------------------------------


def _spelling(token: str) -> str:
    """``" Yes"``, ``"ĠYes"``, ``"▁yes"``, ``"YES"`` -> ``"yes"``: the word a token spells."""
    return token.strip().lstrip("Ġ▁").strip().lower()


def _word_logprobs(top: Sequence[dict]) -> dict[str, float]:
    """Log-probability of each word among ``top`` (one token's ``top_logprobs``), spellings summed."""
    seen: dict[str, float] = {}
    for entry in top:  # the same token may be listed twice (the chosen one and its top_logprobs row)
        token, lp = entry.get("token"), entry.get("logprob")
        if isinstance(token, str) and isinstance(lp, (int, float)) and not isinstance(lp, bool):
            seen[token] = float(lp)
    words: dict[str, list[float]] = {}
    for token, lp in seen.items():
        words.setdefault(_spelling(token), []).append(lp)
    return {w: _logsumexp(lps) for w, lps in words.items()}


def _logsumexp(values: Sequence[float]) -> float:
    top = max(values)
    return top + math.log(sum(math.exp(v - top) for v in values))


def read_yes_no(top: Sequence[dict]) -> dict[str, float] | None:
    """VQAScore's readings from one answer token's ``top_logprobs`` (OpenAI format: a list of
    ``{"token", "logprob"}``), or ``None`` when neither ``yes`` nor ``no`` is listed.

    P(yes) and P(no) sum every listed spelling of the word (``Yes``, `` yes``, ``YES``...).  A word
    that is not listed is given the lowest listed log-probability: an upper bound on its
    probability, so ``p_yes_norm`` and ``log_odds`` stay finite (and are bounds) when only one
    answer is among the top tokens.
    """
    words = _word_logprobs(top)
    if "yes" not in words and "no" not in words:
        return None
    floor = min(float(e["logprob"]) for e in top if isinstance(e.get("logprob"), (int, float)))
    log_yes, log_no = words.get("yes", floor), words.get("no", floor)
    return {"p_yes": math.exp(log_yes), "p_no": math.exp(log_no),
            "p_yes_norm": 1.0 / (1.0 + math.exp(log_no - log_yes)), "log_odds": log_yes - log_no}


def read_rating(top: Sequence[dict]) -> dict[str, float] | None:
    """The expected 1-5 rating from one answer token's ``top_logprobs``, normalised over the digits
    listed (each summed over its spellings), and ``rating_mass``, their total probability; ``None``
    when no digit 1-5 is listed."""
    words = _word_logprobs(top)
    digits = {k: math.exp(words[str(k)]) for k in range(1, 6) if str(k) in words}
    if not digits:
        return None
    mass = sum(digits.values())
    return {"rating": sum(k * p for k, p in digits.items()) / mass, "rating_mass": mass}


_YES_NO = re.compile(r"^\W*(yes|no)\b", re.IGNORECASE)


def parse_yes_no(text: str) -> float | None:
    """1.0 for an answer that starts with *yes* (``"Yes"``, ``"yes."``, ``"**Yes**, it does"``), 0.0 for
    *no*; ``None`` for anything else."""
    m = _YES_NO.match(text or "")
    return None if m is None else float(m.group(1).lower() == "yes")


# ---- the reward -------------------------------------------------------------------------------


def _data_url(array: np.ndarray, image_format: str) -> str:
    if image_format == "png":
        return "data:image/png;base64," + encode_png(array)
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array, mode="RGB").save(buf, format="JPEG", quality=95)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _server_message(data: Any) -> str:
    """The human part of an error body: OpenAI / vLLM ``{"error": {"message"}}``, FastAPI
    ``{"detail"}``, SGLang ``{"message"}``, or the raw text."""
    if isinstance(data, dict):
        err = data.get("error")
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])
        for key in ("error", "detail", "message"):
            if data.get(key):
                return str(data[key]) if not isinstance(data[key], (dict, list)) else json.dumps(data[key])[:500]
    return str(data)[:500]


class VLMAPIReward(KeptAliveHTTP, Reward):
    """A VLM judge on an OpenAI-compatible chat-completions server (vLLM, SGLang, ``transformers serve``).

    Args:
        url (`str`): the API base, ``http://host:port/v1`` (requests go to ``{url}/chat/completions``).
        model (`str`): the model name the server knows (``--served-model-name`` for vLLM).
        mode (`str`, *optional*, defaults to ``"vqa"``): ``"vqa"`` (VQAScore's yes/no question) or
            ``"rubric"`` (the 1-5 rating of ``vlm-judge``).
        variant (`str`, *optional*): ``mode=vqa``'s score: ``"p_yes_norm"`` (default,
            p_yes / (p_yes + p_no)), ``"p_yes"`` or ``"log_odds"``; all three are in ``components``.
        question (`str`, *optional*): the question template with ``{prompt}``; defaults to the
            in-process judges' (``VQA_QUESTION`` or ``RUBRIC`` of :mod:`visalign.rewards.vlm`).
        api_key_env (`str`, *optional*): the environment variable holding the API key, sent as
            ``Authorization: Bearer``; defaults to ``$VISALIGN_VLM_API_KEY`` (no key when unset).
        timeout (`float`, *optional*, defaults to 120): seconds to wait for one answer.
        retries (`int`, *optional*, defaults to 3): further tries after a connection error, a
            timeout or a 408 / 429 / 5xx answer, with back-off ``backoff * 2**k`` seconds (at most 8 s,
            or the server's ``Retry-After``).
        backoff (`float`, *optional*, defaults to 0.5): the first back-off, in seconds.
        concurrency (`int`, *optional*, defaults to 8): requests in flight at once (one per image).
        max_tokens (`int`, *optional*): answer length; defaults to 1 for ``vqa`` (the answer token)
            and 16 for ``rubric`` (room for ``"Rating: 4"`` when the server gives no log-probabilities).
        image_format (`str`, *optional*, defaults to ``"png"``): ``"png"`` (lossless) or ``"jpeg"``
            (quality 95, smaller).
        top_logprobs (`int`, *optional*, defaults to 20): alternatives asked for the first answer
            token (20 is OpenAI's and vLLM's default ceiling).
        logprobs (`bool`, *optional*, defaults to `True`): ask for log-probabilities; ``False`` reads
            the text only.  A server that refuses the field (4xx naming it) is asked again without.
        check (`bool`, *optional*, defaults to `True`): ask ``{url}/models`` at construction, so a
            server that is down, a wrong key or an unknown model fail at once.
    """

    thread_prefix = "visalign-vlm-api"

    def __init__(self, url: str, model: str, *, mode: str = "vqa", variant: str | None = None,
                 question: str | None = None, api_key_env: str | None = None, timeout: float = 120.0,
                 retries: int = 3, backoff: float = 0.5, concurrency: int = 8, max_tokens: int | None = None,
                 image_format: str = "png", top_logprobs: int = 20, logprobs: bool = True, check: bool = True) -> None:
        parts = urllib.parse.urlsplit(str(url))
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"vlm-api: url={url!r} is not an http(s) URL; give the API base, "
                             "e.g. url=http://127.0.0.1:8000/v1")
        if model is None or str(model) == "":
            raise ValueError("vlm-api: give the served model's name with model=NAME (as the server lists it)")
        if mode not in MODES:
            raise ValueError(f"vlm-api: mode={mode!r}; choose one of {', '.join(MODES)}")
        if variant is not None and mode != "vqa":
            raise ValueError("vlm-api: variant= applies to mode=vqa only; the other modes score a 1-5 rating")
        variant = variant or "p_yes_norm"
        if variant not in VARIANTS:
            raise ValueError(f"vlm-api: variant={variant!r}; choose one of {', '.join(VARIANTS)}")
        if image_format not in IMAGE_FORMATS:
            raise ValueError(f"vlm-api: image_format={image_format!r}; choose one of {', '.join(IMAGE_FORMATS)}")
        question = question or {"vqa": VQA_QUESTION, "rubric": RUBRIC, "unifiedreward": POINT_PROMPT}[mode]
        if "{prompt}" not in question:
            raise ValueError(f"vlm-api: question={question!r} must contain '{{prompt}}'")
        max_tokens = max_tokens if max_tokens is not None else {"vqa": 1, "rubric": 16, "unifiedreward": 512}[mode]
        for key, value, low in (("timeout", timeout, 0), ("retries", retries, -1), ("backoff", backoff, -1),
                                ("concurrency", concurrency, 0), ("max_tokens", max_tokens, 0),
                                ("top_logprobs", top_logprobs, 0)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= low:
                raise ValueError(f"vlm-api: {key}={value!r} must be a number > {low}")
        env = api_key_env or KEY_ENV
        key = os.environ.get(env) or None
        if api_key_env and key is None:
            raise ValueError(f"vlm-api: api_key_env={api_key_env} names an environment variable that is not set; "
                             f"export {api_key_env}=<key> (the key never goes in the spec)")
        self.url = f"{parts.scheme}://{parts.netloc}{parts.path.rstrip('/')}"
        self._parts, self._key, self.api_key_env = parts, key, env
        self.model, self.mode, self.variant, self.question = str(model), mode, variant, question
        self.timeout, self.retries, self.backoff = float(timeout), int(retries), float(backoff)
        self.concurrency, self.max_tokens, self.top_logprobs = int(concurrency), int(max_tokens), int(top_logprobs)
        self.image_format, self.logprobs = image_format, bool(logprobs)
        self._init_http()
        low, high = ((1.0, 5.0) if mode != "vqa" else (-LOG_ODDS_CAP, LOG_ODDS_CAP) if variant == "log_odds"
                     else (0.0, 1.0))
        what = {"vqa": f"VQAScore {variant}", "rubric": "1-5 rubric rating",
                "unifiedreward": "UnifiedReward point-wise Final Score (1-5)"}[mode]
        self.info = RewardInfo(name="vlm-api", version="1", licence="NOASSERTION", modality="image",
                               inputs=("images", "prompts"), native_range=(low, high), differentiable=False,
                               weights=f"{self.model} served at {self.url}",
                               description=f"{what} from an OpenAI-compatible chat server")
        if check:
            self._check_model()

    # ---- HTTP -------------------------------------------------------------------------------

    def _once(self, method: str, path: str, body: bytes | None) -> tuple[int, Any, float | None]:
        """One request: ``(status, JSON body or text, Retry-After seconds or None)``."""
        resp, data = self._exchange(method, path, body, self._key)
        if isinstance(data, bytes):
            data = data[:500].decode("utf-8", "replace")
        try:
            wait = float(resp.getheader("Retry-After") or "nan")
        except ValueError:
            wait = math.nan
        return resp.status, data, wait if math.isfinite(wait) and wait >= 0 else None

    def _send(self, method: str, path: str, body: bytes | None = None, *, retry_status: bool = True) -> tuple[int, Any]:
        """``(status, data)`` of the first answer that is not retried; raises when the server stays away."""
        last = ""
        for attempt in range(self.retries + 1):
            wait = None
            try:
                status, data, wait = self._once(method, path, body)
            except (OSError, http.client.HTTPException) as err:
                last = f"{type(err).__name__}: {err}"
            else:
                if not (retry_status and (status >= 500 or status in _RETRY_STATUS)):
                    return status, data
                last = f"HTTP {status}: {_server_message(data)}"
            if attempt < self.retries:
                time.sleep(min(wait if wait is not None else self.backoff * 2 ** attempt, _MAX_BACKOFF))
        raise VLMAPIError(
            f"the chat server {self.url} did not answer after {self.retries + 1} tries (last: {last}). Is it "
            "running? Start an OpenAI-compatible server (e.g. `vllm serve MODEL --port 8000`, or `transformers serve "
            "MODEL`) and give its API base with url=http://host:port/v1; retries= and timeout= give a slow server "
            "more time.")

    def _refused(self, status: int, data: Any) -> VLMAPIError:
        hint = {401: f" Export the server's API key in ${self.api_key_env} (api_key_env= names another variable).",
                403: f" Check the API key in ${self.api_key_env}.",
                404: " Check url= (the API base, usually ending in /v1) and model= (the name the server serves)."}
        return VLMAPIError(f"the chat server {self.url} refused the request (HTTP {status}): "
                           f"{_server_message(data)}.{hint.get(status, '')}")

    def _check_model(self) -> None:
        """Ask ``/models``: the server must answer; a wrong key or an unknown model fail here.  A server
        without the endpoint (or failing on it) is not held against it: the first request will tell."""
        status, data = self._send("GET", "/models", retry_status=False)
        if status in (401, 403):
            raise self._refused(status, data)
        if status != 200 or not isinstance(data, dict) or not isinstance(data.get("data"), list):
            return
        served = [str(m.get("id")) for m in data["data"] if isinstance(m, dict) and m.get("id") is not None]
        if served and self.model not in served:
            raise ValueError(f"vlm-api: the chat server {self.url} does not serve model={self.model!r}; it serves "
                             f"{', '.join(served)}")

    # ---- scoring ----------------------------------------------------------------------------

    def _body(self, image_url: str, text: str) -> dict:
        body: dict[str, Any] = {
            "model": self.model,
            "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image_url}},
                                                      {"type": "text", "text": text}]}],
            "max_tokens": self.max_tokens,
            "temperature": 0,
        }
        if self.logprobs:
            body.update(logprobs=True, top_logprobs=self.top_logprobs)
        return body

    def _ask(self, image: np.ndarray, prompt: str) -> dict:
        """One chat request; the answer's message, the first token's ``top_logprobs`` (or ``None``)."""
        body = self._body(_data_url(image, self.image_format), self.question.replace("{prompt}", prompt))
        status, data = self._send("POST", "/chat/completions", json.dumps(body).encode())
        if status != 200 and self.logprobs and status in (400, 422) and "logprob" in _server_message(data).lower():
            self.logprobs = False  # the server does not do log-probabilities: read its text from now on
            body = {k: v for k, v in body.items() if k not in ("logprobs", "top_logprobs")}
            status, data = self._send("POST", "/chat/completions", json.dumps(body).encode())
        if status != 200:
            raise self._refused(status, data)
        try:
            choice = data["choices"][0]
        except (KeyError, IndexError, TypeError):
            return {"error": f"the chat server {self.url} answered without choices: {str(data)[:200]}"}
        content = (choice.get("message") or {}).get("content")
        if isinstance(content, list):  # content parts
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        top = None
        tokens = (choice.get("logprobs") or {}).get("content") if isinstance(choice.get("logprobs"), dict) else None
        if tokens and isinstance(tokens[0], dict):
            first = tokens[0]
            top = [*(first.get("top_logprobs") or []), {"token": first.get("token"), "logprob": first.get("logprob")}]
        return {"text": content if isinstance(content, str) else "", "top": top,
                "tokens": [t for t in tokens if isinstance(t, dict)] if tokens else None}

    def _judge(self, answer: dict) -> tuple[dict[str, float] | None, str, str]:
        """``(readings or None, source, reason)`` of one answer."""
        if "error" in answer:
            return None, "", answer["error"]
        text, top = answer["text"], answer["top"]
        if self.mode == "unifiedreward":
            expected = point_from_openai_logprobs(answer.get("tokens"))
            if expected is not None:
                return {"rating": expected, "rating_mass": math.nan}, "logprobs", ""
            value = parse_unifiedreward_point(text)
            if value is not None:
                return {"rating": value, "rating_mass": math.nan}, "text", ""
            return None, "text", f"the answer {text[-80:]!r} has no 'Final Score:' from 1 to 5"
        read = read_yes_no if self.mode == "vqa" else read_rating
        if top:
            values = read(top)
            if values is not None:
                return values, "logprobs", ""
        if self.mode == "vqa":
            yes = parse_yes_no(text)
            if yes is not None:
                return {"p_yes": yes, "p_no": 1.0 - yes, "p_yes_norm": yes,
                        "log_odds": LOG_ODDS_CAP if yes else -LOG_ODDS_CAP}, "text", ""
            return None, "text", f"the answer {text[:80]!r} is neither yes nor no"
        rating = parse_rating(text)
        if rating is not None:
            return {"rating": float(rating), "rating_mass": math.nan}, "text", ""
        return None, "text", f"the answer {text[:80]!r} has no rating from 1 to 5"

    def score(self, images: torch.Tensor, prompts: Sequence[str] | None, references: Any,
              metadata: Sequence[dict] | None) -> RewardOutput:
        if images.ndim == 5:
            raise ValueError(f"reward {self.info.name!r} scores images; got video {tuple(images.shape)}: pass frames "
                             "(video_frames:reward=vlm-api,url=...,model=...,frames=8)")
        arrays = to_uint8(images)
        jobs = list(zip(arrays, prompts))
        answers = self._fan_out(self._ask, jobs)
        judged = [self._judge(a) for a in answers]
        keys = ("p_yes", "p_no", "p_yes_norm", "log_odds") if self.mode == "vqa" else ("rating", "rating_mass")
        comps = {k: torch.tensor([math.nan if v is None else v[k] for v, _, _ in judged], dtype=torch.float32,
                                 device=images.device) for k in keys}
        scores = comps[self.variant if self.mode == "vqa" else "rating"].clone()
        valid = torch.tensor([v is not None for v, _, _ in judged], device=images.device)
        extras = {"text": [a.get("text", "") for a in answers], "source": [s for _, s, _ in judged],
                  "reason": [r for _, _, r in judged]}
        return RewardOutput(scores=scores, components=comps, valid=valid, extras=extras)


    def __repr__(self) -> str:
        return f"VLMAPIReward(url={self.url!r}, model={self.model!r}, mode={self.mode!r})"


def vlm_api(url: str, model: str | None = None, mode: str = "vqa", variant: str | None = None,
            question: str | None = None, api_key_env: str | None = None, timeout: float = 120.0, retries: int = 3,
            backoff: float = 0.5, concurrency: int = 8, max_tokens: int | None = None, image_format: str = "png",
            top_logprobs: int = 20, logprobs: bool = True, check: bool = True, api_key: Any = None) -> VLMAPIReward:
    """Factory of the ``vlm-api`` reward: ``vlm-api:url=http://host:8000/v1,model=NAME[,mode=vqa|rubric|unifiedreward,
    variant=p_yes_norm|p_yes|log_odds,api_key_env=VAR,timeout=120,retries=3,backoff=0.5,concurrency=8,
    max_tokens=..,image_format=png|jpeg,top_logprobs=20,logprobs=true,check=true]`` (the options of
    :class:`VLMAPIReward`).  The API key comes from ``$VISALIGN_VLM_API_KEY`` or the variable
    ``api_key_env`` names, never from the spec."""
    if api_key is not None:
        raise ValueError("vlm-api: the API key does not go in the spec (specs end up in configs and logs); export it "
                         f"as ${KEY_ENV}, or in another variable named with api_key_env=VAR")
    return VLMAPIReward(url, model, mode=mode, variant=variant, question=question, api_key_env=api_key_env,
                        timeout=timeout, retries=retries, backoff=backoff, concurrency=concurrency,
                        max_tokens=max_tokens, image_format=image_format, top_logprobs=top_logprobs,
                        logprobs=logprobs, check=check)
