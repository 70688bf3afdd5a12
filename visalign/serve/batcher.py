"""Dynamic batching: items of concurrent requests share one reward call.

Requests put their decoded items on one queue; a single worker thread takes up to ``max_batch``
items, waiting at most ``max_wait`` seconds after the first for more to arrive, scores them with
one reward call per (reward, image shape) under ``torch.no_grad``, and hands every request its own
results in its own order.  One thread owns the model, so a GPU never sees two batches at once.

A request larger than ``max_batch`` is scored in several calls.  A reward that raises on a mixed
batch is called again on each request's items alone, so one request's bad input cannot fail the
others; the request whose items still fail gets the error.
"""

from __future__ import annotations

import collections
import sys
import threading
import time
import traceback
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from visalign.rewards import Reward
from visalign.rewards.wire import json_number

__all__ = ["Batcher", "Busy", "RewardFailed", "Result"]


class Busy(RuntimeError):
    """The queue is full: the server answers 503 and the client retries."""


class RewardFailed(RuntimeError):
    """The reward raised on a request's items.  ``input_error`` when it rejected the input
    (``ValueError`` / ``TypeError``: answered 422), else a server fault (answered 500)."""

    def __init__(self, message: str, input_error: bool) -> None:
        super().__init__(message)
        self.input_error = input_error


@dataclass
class Result:
    """One request's answer, items in request order."""

    scores: list[float | None]
    components: dict[str, list[float | None]]
    errors: list[str | None]
    extras: dict[str, list] = field(default_factory=dict)


@dataclass
class _Job:
    reward: str
    n: int
    future: Future
    scores: list = field(default_factory=list)
    components: dict = field(default_factory=dict)
    errors: list = field(default_factory=list)
    extras: dict = field(default_factory=dict)
    remaining: int = 0
    failed: bool = False

    def __post_init__(self) -> None:
        self.scores = [None] * self.n
        self.errors = [None] * self.n
        self.remaining = self.n


@dataclass
class _Item:
    job: _Job
    index: int
    image: torch.Tensor  # (3, H, W) or (F, 3, H, W), float in [0, 1]
    prompt: str | None
    metadata: dict | None


class Batcher:
    """One worker thread that scores queued items in batches.

    Args:
        rewards (`dict[str, Reward]`): the served rewards by name.
        max_batch (`int`, *optional*, defaults to 32): most items per reward call.
        max_wait (`float`, *optional*, defaults to 0.01): seconds to wait for more items after the
            first one of a batch arrives.
        max_queue (`int`, *optional*, defaults to 4096): most items waiting; past it :meth:`submit`
            raises :class:`Busy`.
        device (`str`, *optional*): where the images go before the reward call (the reward's own
            device); ``None`` leaves them on the CPU.
    """

    def __init__(self, rewards: dict[str, Reward], *, max_batch: int = 32, max_wait: float = 0.01,
                 max_queue: int = 4096, device: str | None = None) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        if max_wait < 0:
            raise ValueError(f"max_wait must be >= 0 seconds, got {max_wait}")
        self.rewards = rewards
        self.max_batch, self.max_wait, self.max_queue, self.device = max_batch, max_wait, max_queue, device
        self._queue: collections.deque[_Item] = collections.deque()
        self._cond = threading.Condition()
        self._stop = False
        self._thread: threading.Thread | None = None
        self._warned: set[tuple[str, str]] = set()
        self._stats = {"requests": 0, "items": 0, "batches": 0, "reward_calls": 0, "largest_batch": 0,
                       "failed_calls": 0, "busy_rejections": 0, "reward_seconds": 0.0}

    # ---- lifecycle --------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="visalign-reward-batcher", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Finish the queued items, then stop the worker."""
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def stats(self) -> dict[str, float]:
        with self._cond:
            return {**self._stats, "queued": len(self._queue)}

    # ---- producer side ----------------------------------------------------------------------

    def submit(self, reward: str, images: Sequence[torch.Tensor], prompts: Sequence[str | None],
               metadata: Sequence[dict | None]) -> Future:
        """Queue one request's items; the future's result is a :class:`Result` in item order."""
        job = _Job(reward, len(images), Future())
        if job.n == 0:
            job.future.set_result(Result([], {}, []))
            return job.future
        with self._cond:
            if self._stop:
                raise Busy("the server is shutting down")
            if len(self._queue) + job.n > self.max_queue and self._queue:
                self._stats["busy_rejections"] += 1
                raise Busy(f"{len(self._queue)} items are waiting (the queue holds {self.max_queue}); retry shortly")
            self._queue.extend(_Item(job, i, x, p, m) for i, (x, p, m) in enumerate(zip(images, prompts, metadata)))
            self._stats["requests"] += 1
            self._cond.notify()
        return job.future

    # ---- worker side ------------------------------------------------------------------------

    def _gather(self) -> list[_Item] | None:
        with self._cond:
            while not self._queue:
                if self._stop:
                    return None
                self._cond.wait()
            batch = [self._queue.popleft() for _ in range(min(self.max_batch, len(self._queue)))]
            deadline = time.monotonic() + self.max_wait
            while len(batch) < self.max_batch and not self._stop:
                if self._queue:
                    batch.extend(self._queue.popleft() for _ in range(min(self.max_batch - len(batch), len(self._queue))))
                    continue
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            return batch

    def _run(self) -> None:
        while True:
            batch = self._gather()
            if batch is None:
                return
            try:
                self._score(batch)
            except BaseException as err:  # never leave a request waiting forever
                traceback.print_exc(file=sys.stderr)
                for item in batch:
                    self._fail(item.job, RewardFailed(f"the server failed: {type(err).__name__}: {err}", False))

    def _score(self, batch: list[_Item]) -> None:
        groups: dict[tuple, list[_Item]] = collections.defaultdict(list)
        for item in batch:
            if not item.job.failed:
                key = (item.job.reward, tuple(item.image.shape), item.prompt is not None, item.metadata is not None)
                groups[key].append(item)
        with self._cond:
            self._stats["batches"] += 1
            self._stats["largest_batch"] = max(self._stats["largest_batch"], len(batch))
        for (name, *_), items in groups.items():
            try:
                self._call(name, items)
            except Exception as err:
                by_job: dict[int, list[_Item]] = collections.defaultdict(list)
                for item in items:
                    by_job[id(item.job)].append(item)
                if len(by_job) == 1:
                    self._report_failure(name, items, err)
                    continue
                for alone in by_job.values():  # isolate: one request's input must not fail the others
                    try:
                        self._call(name, alone)
                    except Exception as err_alone:
                        self._report_failure(name, alone, err_alone)

    def _report_failure(self, name: str, items: list[_Item], err: Exception) -> None:
        input_error = isinstance(err, (ValueError, TypeError))
        if not input_error:
            traceback.print_exc(file=sys.stderr)
        with self._cond:
            self._stats["failed_calls"] += 1
        self._fail(items[0].job, RewardFailed(f"reward {name!r} raised {type(err).__name__}: {err}", input_error))

    def _call(self, name: str, items: list[_Item]) -> None:
        reward = self.rewards[name]
        x = torch.stack([it.image for it in items])  # (B, 3, H, W) or (B, F, 3, H, W)
        if self.device is not None:
            x = x.to(self.device)
        prompts = [it.prompt for it in items] if items[0].prompt is not None else None
        metadata = [it.metadata for it in items] if items[0].metadata is not None else None
        t0 = time.perf_counter()
        with torch.no_grad():
            out = reward(x, prompts, metadata=metadata)
        with self._cond:
            self._stats["reward_calls"] += 1
            self._stats["reward_seconds"] += time.perf_counter() - t0
        scores = out.scores.detach().float().cpu().tolist()
        valid = out.valid.detach().cpu().tolist()
        comps = {k: v.detach().float().cpu().tolist() for k, v in out.components.items()}
        extras = dict(out.extras) if isinstance(out.extras, dict) else {}
        reasons = extras.get("reason")
        carried = self._per_sample_extras(name, extras, len(items))
        for j, item in enumerate(items):
            job = item.job
            if valid[j]:
                job.scores[item.index] = json_number(scores[j])
            else:
                why = reasons[j] if isinstance(reasons, (list, tuple)) and len(reasons) == len(items) else None
                job.errors[item.index] = f"the reward could not judge this item: {why}" if why else (
                    "the reward could not judge this item (invalid)")
            for key, values in comps.items():
                job.components.setdefault(key, [None] * job.n)[item.index] = json_number(values[j])
            for key, values in carried.items():
                job.extras.setdefault(key, [None] * job.n)[item.index] = values[j]
            self._done(job)

    def _per_sample_extras(self, name: str, extras: dict, b: int) -> dict[str, list]:
        """The extras that are one JSON value (string, number, bool, null) per sample; others are
        named once on stderr, never dropped without a word."""
        carried: dict[str, list] = {}
        for key, value in extras.items():
            if isinstance(value, torch.Tensor) and value.ndim == 1 and value.shape[0] == b:
                carried[key] = [json_number(v) if isinstance(v, float) else v for v in value.detach().cpu().tolist()]
            elif isinstance(value, (list, tuple)) and len(value) == b and all(
                    v is None or isinstance(v, (str, int, float, bool)) for v in value):
                carried[key] = [json_number(v) if isinstance(v, float) else v for v in value]
            elif (name, key) not in self._warned:
                self._warned.add((name, key))
                print(f"visalign rewards serve: reward {name!r}: extras[{key!r}] is not one string or number per "
                      "sample, so it is not sent to clients", file=sys.stderr, flush=True)
        return carried

    def _done(self, job: _Job) -> None:
        job.remaining -= 1
        if job.remaining == 0 and not job.failed:
            with self._cond:
                self._stats["items"] += job.n
            job.future.set_result(Result(job.scores, job.components, job.errors, job.extras))

    def _fail(self, job: _Job, err: Exception) -> None:
        if not job.failed:
            job.failed = True
            job.future.set_exception(err)


def as_payload(result: Result, reward: str, item_errors: dict[int, str], n: int) -> dict[str, Any]:
    """Merge the scored items with the items that failed to decode into the wire answer (request order)."""
    scores: list[float | None] = [None] * n
    errors: list[str | None] = [None] * n
    components: dict[str, list[float | None]] = {k: [None] * n for k in result.components}
    extras: dict[str, list] = {k: [None] * n for k in result.extras}
    ok = [i for i in range(n) if i not in item_errors]
    for j, i in enumerate(ok):
        scores[i], errors[i] = result.scores[j], result.errors[j]
        for key, values in result.components.items():
            components[key][i] = values[j]
        for key, values in result.extras.items():
            extras[key][i] = values[j]
    for i, message in item_errors.items():
        errors[i] = message
    return {"reward": reward, "scores": scores, "components": components, "errors": errors, "extras": extras}
