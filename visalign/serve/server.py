"""``visalign rewards serve``: any registered reward behind HTTP (Starlette on uvicorn).

Endpoints:

- ``GET /health``: ``{"status": "ok", "protocol": 1, "rewards": {name: info}, "limits": {...},
  "stats": {"requests", "items", "batches", "reward_calls", "largest_batch", ...}}``.
- ``POST /score``: the request and answer of :mod:`visalign.rewards.wire`.

Status codes: 400 malformed request (the message names the field or item), 401 missing or wrong
bearer token, 404 unknown reward (the message names the served ones), 413 body over
``max_request_mb``, 422 the reward rejected the request's input, 503 queue full (retry), 500 a
server fault.  An item that is not a usable image gets its own error with a ``null`` score; the
other items of the request, and every other request, are scored as usual.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import json
import signal
import socket
import sys
import threading
import traceback
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from visalign.rewards import Reward
from visalign.rewards.wire import PROTOCOL, ItemError, WireError, check_lengths, decode_item

from .batcher import Batcher, Busy, RewardFailed, as_payload

__all__ = ["Limits", "create_app", "load_served", "serve", "MISSING_EXTRA"]

MISSING_EXTRA = "the reward server needs Starlette and uvicorn: pip install 'visalign[serve]'"
_REQUEST_KEYS = ("reward", "prompts", "images", "videos", "metadata")
# rewards whose score of a sample depends on the other samples of the batch (within-group diversity):
# dynamic batching would mix requests, so they are not served
BATCH_DEPENDENT = frozenset({"diversity"})


@dataclass(frozen=True)
class Limits:
    """What one server accepts.

    Args:
        max_batch: most items per reward call (items of concurrent requests share calls).
        max_wait_ms: milliseconds a batch waits for more items after its first one.
        max_request_mb: largest request body, in MB (10^6 bytes); larger ones get 413.
        max_pixels: largest image (or video frame), width x height; larger items get an error.
        max_queue: most items waiting to be scored; past it requests get 503 (the client retries).
    """

    max_batch: int = 32
    max_wait_ms: float = 10.0
    max_request_mb: float = 64.0
    max_pixels: int = 4096 * 4096
    max_queue: int = 4096

    def __post_init__(self) -> None:
        for key in ("max_batch", "max_pixels", "max_queue"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be at least 1, got {getattr(self, key)}")
        if self.max_wait_ms < 0 or self.max_request_mb <= 0:
            raise ValueError(f"max_wait_ms must be >= 0 and max_request_mb > 0 "
                             f"(got {self.max_wait_ms} and {self.max_request_mb})")

    @property
    def max_request_bytes(self) -> int:
        return int(self.max_request_mb * 1_000_000)


def load_served(specs: list[str], device: str | None = None) -> dict[str, Reward]:
    """Load the served rewards by spec; each is served under its registry name."""
    from visalign import rewards as R

    served: dict[str, Reward] = {}
    for spec in specs:
        name, _ = R.parse_spec(spec)
        if name == "remote":
            raise ValueError(f"{spec!r}: a server serves local rewards; point clients at the other server directly")
        if name in served:
            raise ValueError(f"two specs serve the name {name!r}; serve one of them per server "
                             "(clients choose a reward by name)")
        if name in BATCH_DEPENDENT:
            raise ValueError(f"reward {name!r} scores each sample against the others of its batch; the server "
                             "batches items of different requests together, so score it in-process")
        reward = R.load(spec)
        if "references" in reward.info.inputs:
            raise ValueError(f"reward {name!r} needs reference images, which the server does not take; "
                             "score it in-process")
        if device is not None:
            reward.to(device)
        served[name] = reward
    return served


def reward_facts(reward: Reward) -> dict[str, Any]:
    """The info a client needs, as JSON; ``differentiable`` is false: no gradient crosses the wire."""
    facts = dataclasses.asdict(reward.info)
    facts["native_range"] = [None if abs(v) == float("inf") else v for v in facts["native_range"]]
    facts["inputs"] = list(facts["inputs"])
    facts["differentiable"] = False
    return facts


class _HTTPError(Exception):
    def __init__(self, status: int, message: str, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.headers = status, message, dict(headers or {})


def _parse(payload: Any, rewards: Mapping[str, Reward]) -> tuple[str, bool, list, list, list]:
    """The checked request: (reward name, video?, items, prompts, metadata)."""
    if not isinstance(payload, dict):
        raise WireError(f"the body must be a JSON object with 'images' (or 'videos'), 'prompts' and 'reward'; "
                        f"got a JSON {type(payload).__name__}")
    unknown = sorted(set(payload) - set(_REQUEST_KEYS))
    if unknown:
        raise WireError(f"unknown field(s) {unknown}; a request has {list(_REQUEST_KEYS)}")
    name = payload.get("reward")
    if name is None:
        if len(rewards) != 1:
            raise WireError(f"name the reward: 'reward' is one of {sorted(rewards)}")
        name = next(iter(rewards))
    if not isinstance(name, str):
        raise WireError(f"'reward' must be a string, got {type(name).__name__}")
    if name not in rewards:
        raise _HTTPError(404, f"unknown reward {name!r}: this server serves {', '.join(sorted(rewards))}")
    if ("images" in payload) == ("videos" in payload):
        raise WireError("give exactly one of 'images' (a list of base64 PNG / JPEG) or 'videos' (a list of lists of frames)")
    video = "videos" in payload
    items = payload["videos" if video else "images"]
    if not isinstance(items, list):
        raise WireError(f"'{'videos' if video else 'images'}' must be a list, got {type(items).__name__}")
    n = len(items)
    prompts, metadata = payload.get("prompts"), payload.get("metadata")
    if prompts is not None and (not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts)):
        raise WireError("'prompts' must be a list of strings, one per item")
    if metadata is not None and (not isinstance(metadata, list)
                                 or not all(m is None or isinstance(m, dict) for m in metadata)):
        raise WireError("'metadata' must be a list with one entry (an object or null) per item")
    check_lengths(n, prompts=prompts, metadata=metadata)
    if prompts is None and "prompts" in rewards[name].info.inputs and n:
        raise WireError(f"reward {name!r} needs 'prompts': one string per item")
    return name, video, items, prompts or [None] * n, metadata or [None] * n


def _decode_all(items: list, video: bool, max_pixels: int) -> tuple[list, dict[int, str]]:
    kind = "videos" if video else "images"
    decoded, errors = [], {}
    for i, item in enumerate(items):
        try:
            decoded.append(decode_item(item, f"{kind}[{i}]", video=video, max_pixels=max_pixels))
        except ItemError as err:
            decoded.append(None)
            errors[i] = str(err)
    return decoded, errors


def create_app(rewards: Mapping[str, Reward], limits: Limits = Limits(), token: str | None = None,
               on_ready: Callable[[], None] | None = None, device: str | None = None):
    """The ASGI app (Starlette) serving ``rewards``; its lifespan starts and stops the batch worker."""
    try:
        from starlette.applications import Starlette
        from starlette.concurrency import run_in_threadpool
        from starlette.responses import JSONResponse
        from starlette.routing import Route
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError(f"{MISSING_EXTRA} ({err})", name=err.name) from None

    batcher = Batcher(dict(rewards), max_batch=limits.max_batch, max_wait=limits.max_wait_ms / 1000.0,
                      max_queue=limits.max_queue, device=device)
    facts = {name: reward_facts(r) for name, r in rewards.items()}
    expected = f"Bearer {token}".encode() if token else None

    def error(status: int, message: str, headers: Mapping[str, str] | None = None) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status, headers=dict(headers or {}))

    def authorised(request) -> bool:
        if expected is None:
            return True
        return hmac.compare_digest(request.headers.get("authorization", "").encode(), expected)

    unauthorised = ("missing or wrong bearer token: send the header 'Authorization: Bearer <token>' "
                    "with the token the server was started with (--token or VISALIGN_REWARD_TOKEN)")

    async def read_body(request) -> bytes:
        limit = limits.max_request_bytes
        declared = request.headers.get("content-length")
        too_big = _HTTPError(413, f"the request body is larger than the server's limit of {limits.max_request_mb:g} MB "
                                  "(--max-request-mb); send fewer or smaller images per request (the client's batch= option)")
        if declared is not None and declared.isdigit() and int(declared) > 4 * limit:
            raise too_big  # far over: do not read it
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size <= limit:
                chunks.append(chunk)
            elif size > 4 * limit:
                break
        if size > limit:  # read to the end (up to 4x the limit) so the client sees this answer
            raise too_big
        return b"".join(chunks)

    def prepare(body: bytes):
        """Parse, check and decode a request body (in a worker thread: JSON and image decoding take CPU)."""
        try:
            payload = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise WireError(f"malformed JSON: {err}") from None
        name, video, items, prompts, metadata = _parse(payload, rewards)
        decoded, item_errors = _decode_all(items, video, limits.max_pixels)
        return name, items, decoded, item_errors, prompts, metadata

    async def health(request):
        if not authorised(request):
            return error(401, unauthorised, {"WWW-Authenticate": "Bearer"})
        return JSONResponse({"status": "ok", "protocol": PROTOCOL, "rewards": facts,
                             "limits": dataclasses.asdict(limits), "stats": batcher.stats()})

    async def score(request):
        if not authorised(request):
            return error(401, unauthorised, {"WWW-Authenticate": "Bearer"})
        try:
            body = await read_body(request)
            name, items, decoded, item_errors, prompts, metadata = await run_in_threadpool(prepare, body)
            ok = [i for i in range(len(items)) if i not in item_errors]
            future = batcher.submit(name, [decoded[i] for i in ok], [prompts[i] for i in ok], [metadata[i] for i in ok])
            result = await asyncio.wrap_future(future)
            return JSONResponse(as_payload(result, name, item_errors, len(items)))
        except _HTTPError as err:
            return error(err.status, err.message, err.headers)
        except WireError as err:
            return error(400, str(err))
        except Busy as err:
            return error(503, f"the server is busy: {err}", {"Retry-After": "1"})
        except RewardFailed as err:
            return error(422 if err.input_error else 500, str(err))
        except Exception as err:  # a fault of the server itself: answered, logged, and the server goes on
            traceback.print_exc(file=sys.stderr)
            return error(500, f"the server failed on this request: {type(err).__name__}: {err}")

    @contextlib.asynccontextmanager
    async def lifespan(app):
        batcher.start()
        if on_ready is not None:
            on_ready()
        try:
            yield
        finally:
            batcher.stop()

    app = Starlette(routes=[Route("/health", health, methods=["GET"]), Route("/score", score, methods=["POST"])],
                    lifespan=lifespan)
    app.state.batcher = batcher
    return app


def _bind(host: str, port: int) -> socket.socket:
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a restart can take the port back at once
    try:
        sock.bind(address)
    except OSError as err:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {err.strerror or err}; choose another --port "
                      "(or stop the process that holds it)") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def serve(rewards: Mapping[str, Reward], *, host: str = "127.0.0.1", port: int = 8700, token: str | None = None,
          limits: Limits = Limits(), device: str | None = None, log: Callable[[str], None] | None = None) -> str | None:
    """Serve ``rewards`` until SIGINT / SIGTERM; return the signal's name (``None`` if stopped otherwise).

    In-flight requests finish before the server stops.  ``log`` receives one line once the server
    listens (the CLI prints it; it names the actual port when ``port`` is 0).
    """
    try:
        import uvicorn
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError(f"{MISSING_EXTRA} ({err})", name=err.name) from None

    sock = _bind(host, port)
    bound = sock.getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    line = (f"serving {', '.join(sorted(rewards))} on http://{shown}:{bound} "
            f"({'bearer token required' if token else 'no token'}; stop with Ctrl-C)")
    app = create_app(rewards, limits, token, on_ready=(lambda: log(line)) if log else None, device=device)
    config = uvicorn.Config(app, log_level="warning", lifespan="on", timeout_keep_alive=75,
                            timeout_graceful_shutdown=60)
    server = _server_class(uvicorn)(config)
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
    return signal.Signals(server.signals[0]).name if server.signals else None


def _server_class(uvicorn):
    """uvicorn's server, stopping gracefully on SIGINT / SIGTERM and then returning normally
    (uvicorn itself re-raises the signal after shutting down, which would end the process with
    the signal's exit status)."""

    class Server(uvicorn.Server):
        signals: list[int] = []

        @contextlib.contextmanager
        def capture_signals(self):
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            self.signals = []

            def handle(sig, frame):
                self.signals.append(sig)
                self.handle_exit(sig, frame)

            previous = {sig: signal.signal(sig, handle) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

    return Server
