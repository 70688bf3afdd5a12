"""A small OpenAI-compatible chat server on a local VLM, and a tiny judge model, for tests and demos.

``chat_app(backend, model_name=...)`` is a Starlette app implementing ``POST /v1/chat/completions``
and ``GET /v1/models`` by running a :class:`~visalign.rewards.vlm_backend.VLMBackend` in-process:
the answer is greedy decoding, and ``logprobs`` / ``top_logprobs`` (at most 20, as OpenAI and
vLLM allow) list the first answer token's alternatives with their real log-probabilities.  Only
``data:`` image URLs are accepted (the server never fetches anything).  Options make it refuse a
wrong API key, fail its first requests with 503, or refuse the log-probability fields, as real
servers do.  ``serve_in_thread(app)`` runs it with uvicorn on a free loopback port.

``tiny_judge_qwen2vl(folder)`` saves a tiny random Qwen2-VL (:func:`~visalign.rewards.vlm_testing.tiny_qwen2vl`)
whose output rows for the answer words are set so that it answers like a judge: ``Yes`` / ``No`` to
the yes/no question, a digit to the rubric, with probabilities that depend on the image.
Needs starlette and uvicorn (``pip install 'visalign[serve]'``).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

import torch

from .vlm import RUBRIC, VQA_QUESTION
from .vlm_backend import VLMBackend

__all__ = ["chat_app", "serve_in_thread", "tiny_judge_qwen2vl", "MAX_TOP_LOGPROBS"]

MAX_TOP_LOGPROBS = 20
_PROBE_PROMPTS = ["a red cat", "a blue dog", "a blue square", "a red cat with a dog", "a dog or a cat", "the cat",
                  "a good image", "one red square"]


def tiny_judge_qwen2vl(folder: str | Path, *, seed: int = 0) -> Path:
    """Save a tiny random Qwen2-VL that answers the yes/no question with ``Yes`` / ``No`` and the
    rubric with a digit ``1``..``5``, image-dependently; returns the folder.

    The model is :func:`~visalign.rewards.vlm_testing.tiny_qwen2vl`'s; only the output rows
    (``lm_head``) of the answer words change.  On probe images the last hidden state is read for
    both questions: its mean direction ``m`` (nearly the same for every input), and the direction
    ``g`` that separates the two questions.  The rows of ``Yes`` / ``No`` get ``+m`` and ``+g``, the
    digits ``+m`` and ``-g``, lower-case ``yes`` / ``no`` ``-m`` (so they take no mass), and each
    answer word a random direction orthogonal to both, scaled so that its logit moves by about 1
    from image to image.
    """
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from .vlm_testing import tiny_qwen2vl

    folder = tiny_qwen2vl(folder, seed=seed)
    model = AutoModelForImageTextToText.from_pretrained(folder).eval()
    backend = VLMBackend(model, AutoProcessor.from_pretrained(folder))
    g = torch.Generator().manual_seed(seed + 1)
    images = torch.randint(0, 256, (len(_PROBE_PROMPTS), 3, 32, 32), generator=g).float() / 255
    hidden = {}
    with torch.no_grad():
        for name, question in (("vqa", VQA_QUESTION), ("rubric", RUBRIC)):
            batch = backend.inputs(images, [question.format(prompt=p) for p in _PROBE_PROMPTS])
            out = model(**batch, use_cache=False, output_hidden_states=True)
            hidden[name] = out.hidden_states[-1][:, -1].double()  # (N, D), the input of lm_head
    everything = torch.cat([hidden["vqa"], hidden["rubric"]])
    m = torch.nn.functional.normalize(everything.mean(0), dim=0)
    norm = float((everything @ m).mean())  # h . m, nearly constant
    d = hidden["vqa"].mean(0) - hidden["rubric"].mean(0)
    d = torch.nn.functional.normalize(d - (d @ m) * m, dim=0)
    cut = float(((hidden["vqa"] @ d).min() + (hidden["rubric"] @ d).max()) / 2)
    gate = d - (cut / norm) * m  # gate . h > 0 for the yes/no question, < 0 for the rubric
    margin = float(torch.cat([hidden["vqa"] @ gate, -(hidden["rubric"] @ gate)]).min())
    if margin <= 0:
        raise RuntimeError("tiny_judge_qwen2vl: the probe questions are not separable on this seed; try another")
    ids = backend.tokenizer.convert_tokens_to_ids
    words = {"Yes": 1.0, "No": 1.0, **{str(k): -1.0 for k in range(1, 6)}}
    weight = model.lm_head.weight.detach().double().clone()
    basis = [m, torch.nn.functional.normalize(gate - (gate @ m) * m, dim=0)]
    for word, side in words.items():
        r = torch.randn(m.shape[0], generator=g, dtype=torch.float64)
        for b in basis:
            r = r - (r @ b) * b
        r = torch.nn.functional.normalize(r, dim=0)
        spread = float((everything @ r).std())
        weight[ids(word)] = (4.0 / norm) * m + side * (3.0 / margin) * gate + r / spread
    for word in ("yes", "no"):
        weight[ids(word)] = -(8.0 / norm) * m
    with torch.no_grad():
        model.lm_head.weight.copy_(weight.to(model.lm_head.weight.dtype))
    model.save_pretrained(folder)
    # how a chat server finds the answer in the decoded text: the word-level tokenizer decodes the
    # generation prompt as "<|im_start|> assistant" (it keeps no whitespace)
    backend.processor.tokenizer.response_template = {
        "defaults": {"role": "assistant"},
        "start_anchor": "<|im_start|> assistant",
        "fields": {"content": {"close_pattern": r"\s*(?:<\|im_end\|>|<\|endoftext\|>)", "content": "text"}},
    }
    backend.processor.save_pretrained(folder)
    return Path(folder)


def _openai_error(status: int, message: str, kind: str = "invalid_request_error", code: str | None = None):
    from starlette.responses import JSONResponse

    return JSONResponse({"error": {"message": message, "type": kind, "param": None, "code": code}}, status_code=status)


def chat_app(backend: VLMBackend, *, model_name: str, api_key: str | None = None, fail_first: int = 0,
             refuse_logprobs: bool = False, delay_s: float = 0.0, max_pixels: int = 1024 * 1024) -> Any:
    """A Starlette app serving ``backend`` under ``model_name`` with the OpenAI chat-completions API.

    Args:
        backend (`VLMBackend`): the model (one request at a time runs it).
        model_name (`str`): the name clients must ask for; others get 404.
        api_key (`str`, *optional*): when set, requests must carry ``Authorization: Bearer <key>``.
        fail_first (`int`, *optional*, defaults to 0): answer this many chat requests with 503 first.
        refuse_logprobs (`bool`, *optional*): answer requests that ask for log-probabilities with 400.
        delay_s (`float`, *optional*): wait this long in each chat request (to make requests overlap).
        max_pixels (`int`, *optional*): largest image accepted.

    ``app.state.stats`` counts ``requests`` and the most requests ``in_flight`` at once.
    """
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    from .wire import ItemError, WireError, decode_item

    lock, counter = threading.Lock(), threading.Lock()
    stats = {"requests": 0, "in_flight": 0, "max_in_flight": 0, "failed": 0}

    def authorised(request: Request) -> bool:
        return api_key is None or request.headers.get("authorization") == f"Bearer {api_key}"

    async def models(request: Request):
        if not authorised(request):
            return _openai_error(401, "Incorrect API key provided.", code="invalid_api_key")
        return JSONResponse({"object": "list", "data": [{"id": model_name, "object": "model", "owned_by": "visalign"}]})

    def answer(image: torch.Tensor, text: str, max_tokens: int, top_k: int | None) -> dict:
        with lock:  # one model call at a time
            x = image.unsqueeze(0)
            content = backend.generate(x, [text], max_new_tokens=max_tokens)[0]
            choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": content},
                                      "finish_reason": "length", "logprobs": None}
            if top_k is not None:
                with torch.no_grad():
                    lp = backend.answer_logprobs(x, [text])[0]
                values, ids = lp.topk(max(top_k, 1))

                def entry(i: int, v: float) -> dict:
                    token = backend.tokenizer.decode([i])
                    return {"token": token, "logprob": v, "bytes": list(token.encode())}

                first = entry(int(ids[0]), float(values[0]))
                first["top_logprobs"] = [entry(int(i), float(v)) for i, v in zip(ids[:top_k], values[:top_k])]
                choice["logprobs"] = {"content": [first]}  # the first answer token (the one judges read)
            return choice

    async def chat(request: Request):
        if not authorised(request):
            return _openai_error(401, "Incorrect API key provided.", code="invalid_api_key")
        with counter:
            stats["requests"] += 1
            if stats["failed"] < fail_first:
                stats["failed"] += 1
                return _openai_error(503, "the server is busy; try again", kind="server_error")
        try:
            body = await request.json()
        except ValueError:
            return _openai_error(400, "the body is not JSON")
        if not isinstance(body, dict):
            return _openai_error(400, "the body must be a JSON object")
        if body.get("model") != model_name:
            return _openai_error(404, f"The model `{body.get('model')}` does not exist.", code="model_not_found")
        wants_logprobs = bool(body.get("logprobs"))
        if wants_logprobs and refuse_logprobs:
            return _openai_error(400, "logprobs is not supported by this server")
        top_k = body.get("top_logprobs", 0) if wants_logprobs else None
        if top_k is not None and (not isinstance(top_k, int) or not 0 <= top_k <= MAX_TOP_LOGPROBS):
            return _openai_error(400, f"top_logprobs must be an integer from 0 to {MAX_TOP_LOGPROBS}")
        max_tokens = body.get("max_tokens") or 16
        messages = body.get("messages")
        if not isinstance(messages, list) or len(messages) != 1 or messages[0].get("role") != "user":
            return _openai_error(400, "send one user message")
        parts = messages[0].get("content")
        parts = [{"type": "text", "text": parts}] if isinstance(parts, str) else parts or []
        images = [p["image_url"]["url"] if isinstance(p.get("image_url"), dict) else p.get("image_url")
                  for p in parts if p.get("type") == "image_url"]
        text = " ".join(p.get("text", "") for p in parts if p.get("type") == "text")
        if len(images) != 1 or not isinstance(images[0], str) or not images[0].startswith("data:image/"):
            return _openai_error(400, "send exactly one image, as a data:image/...;base64 URL")
        try:
            image = decode_item(images[0], "image_url", video=False, max_pixels=max_pixels)
        except (WireError, ItemError) as err:
            return _openai_error(400, str(err))
        with counter:
            stats["in_flight"] += 1
            stats["max_in_flight"] = max(stats["max_in_flight"], stats["in_flight"])
        try:
            if delay_s:
                await asyncio.sleep(delay_s)
            choice = await run_in_threadpool(answer, image, text, int(max_tokens), top_k)
        finally:
            with counter:
                stats["in_flight"] -= 1
        return JSONResponse({"id": f"chatcmpl-{uuid.uuid4().hex[:12]}", "object": "chat.completion",
                             "created": int(time.time()), "model": model_name, "choices": [choice]})

    app = Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"]),
                            Route("/v1/models", models, methods=["GET"])])
    app.state.stats = stats
    return app


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve_in_thread(app: Any, *, port: int = 0, timeout: float = 30.0) -> Iterator[str]:
    """Run ``app`` with uvicorn on ``127.0.0.1`` in a background thread; yields its API base
    (``http://127.0.0.1:PORT/v1``) once it listens, and stops it on exit."""
    import uvicorn

    port = port or _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, name=f"chat-server-{port}", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            raise RuntimeError(f"the chat server on port {port} did not start within {timeout:g} s")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        server.should_exit = True
        thread.join(timeout)
