"""Decode gallery files in worker processes and hand out batches of identically sized items.

Decoding overlaps scoring: up to ``2 * workers`` chunks of ``chunk`` files are in flight while the
main process runs the rewards.  Results are consumed in submission order, so rows come out in
the gallery's order (up to the grouping below) whatever the worker timing.

**Batching by identical size.** Rewards take one ``(B, 3, H, W)`` tensor per call, so a batch
holds only items of one shape (``(H, W)`` for images, ``(F, H, W)`` for videos); nothing is resized
or padded here (each reward resizes as its model expects).  Items wait in one group per shape;
a group is released when it is full, or -- to bound memory on galleries of many sizes -- the
largest group is released when more than ``4 * batch_size`` items are waiting.  Failed files are
released at once as their own group.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import sys
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from typing import Iterator, Sequence

from .decode import DEFAULT_MAX_FRAMES, DEFAULT_MAX_PIXELS, Decoded, decode_file

__all__ = ["iter_batches"]


def _decode_chunk(chunk: list[tuple[int, str]], max_pixels: int, max_frames: int, thumbnail: int) -> list[Decoded]:
    return [decode_file(i, p, max_pixels, max_frames, thumbnail) for i, p in chunk]


def _worker_init(parent: int) -> None:
    # Ctrl-C goes to the whole process group; the main process handles it, workers stay quiet.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # A SIGKILLed parent cannot stop its pool, and forked workers hold the queue's pipe open, so
    # they would wait forever: ask Linux to kill each worker when its parent dies.
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))  # 1 = PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(0)


def _decoded_stream(paths: Sequence[str], workers: int, chunk: int, max_pixels: int, max_frames: int,
                    thumbnail: int) -> Iterator[Decoded]:
    chunks = [[(i, paths[i]) for i in range(s, min(s + chunk, len(paths)))] for s in range(0, len(paths), chunk)]
    if workers <= 0:
        for c in chunks:
            yield from _decode_chunk(c, max_pixels, max_frames, thumbnail)
        return
    # fork where there is one (as torch's DataLoader does): it needs no `if __name__ == "__main__"`
    # guard in users' scripts, and the children only run Pillow / numpy code, never torch or CUDA.
    # Elsewhere spawn, which re-imports the main module (scripts need the guard there).
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_worker_init, initargs=(os.getpid(),))
    try:
        pending: deque = deque()
        todo = iter(chunks)
        for c in todo:
            pending.append(pool.submit(_decode_chunk, c, max_pixels, max_frames, thumbnail))
            if len(pending) >= 2 * workers:
                break
        while pending:
            done = pending.popleft().result()
            nxt = next(todo, None)
            if nxt is not None:
                pending.append(pool.submit(_decode_chunk, nxt, max_pixels, max_frames, thumbnail))
            yield from done
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def iter_batches(
    paths: Sequence[str],
    *,
    batch_size: int = 8,
    workers: int = 0,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_frames: int = DEFAULT_MAX_FRAMES,
    thumbnail: int = 0,
) -> Iterator[list[Decoded]]:
    """Yield lists of :class:`Decoded`: either all decoded with one shape (at most ``batch_size``) or all failed.

    ``Decoded.index`` is the position in ``paths``.  ``workers=0`` decodes in this process.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be at least 1")
    chunk = max(1, min(batch_size, 16))
    groups: dict[tuple, list[Decoded]] = {}
    waiting = 0
    for d in _decoded_stream(paths, workers, chunk, max_pixels, max_frames, thumbnail):
        if d.pixels is None:
            yield [d]
            continue
        shape = d.pixels.shape
        groups.setdefault(shape, []).append(d)
        waiting += 1
        if len(groups[shape]) >= batch_size:
            waiting -= len(groups[shape])
            yield groups.pop(shape)
        elif waiting > 4 * batch_size:
            biggest = max(groups, key=lambda s: len(groups[s]))
            waiting -= len(groups[biggest])
            yield groups.pop(biggest)
    for shape in list(groups):
        yield groups.pop(shape)
