"""The HTTP side of the rewards that ask a server (``remote``, ``vlm-api``): one kept-alive
connection per thread, requests fanned out over ``concurrency`` threads, JSON bodies, a bearer
token; standard library only."""

from __future__ import annotations

import http.client
import json
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Sequence

__all__ = ["KeptAliveHTTP"]


class KeptAliveHTTP:
    """Mixin: a thread-local kept-alive connection to ``self._parts`` (a ``urllib.parse`` split
    URL) with ``self.timeout``, and ``self.concurrency`` request threads; the class calls
    :meth:`_init_http` in its constructor."""

    #: the name prefix of the request threads
    thread_prefix = "visalign-http"

    def _init_http(self) -> None:
        self._local = threading.local()
        self._pool: ThreadPoolExecutor | None = None

    def _fan_out(self, fn: Callable[..., Any], jobs: Sequence[tuple]) -> list:
        """``[fn(*job) for job in jobs]``, on up to ``concurrency`` threads (in the input order)."""
        if self.concurrency > 1 and len(jobs) > 1:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.concurrency, thread_name_prefix=self.thread_prefix)
            return list(self._pool.map(lambda job: fn(*job), jobs))
        return [fn(*job) for job in jobs]

    def close(self) -> None:
        """Close this thread's connection and the request threads."""
        self._drop_connection()
        if self._pool is not None:
            self._pool.shutdown(wait=False)
            self._pool = None

    def __getstate__(self) -> dict:
        # connections and request threads belong to one process: a copy opens its own
        state = dict(self.__dict__)
        state["_local"], state["_pool"] = None, None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._local = threading.local()

    def _connection(self) -> tuple[http.client.HTTPConnection, bool]:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            return conn, True
        cls = http.client.HTTPSConnection if self._parts.scheme == "https" else http.client.HTTPConnection
        conn = cls(self._parts.hostname, self._parts.port, timeout=self.timeout)
        self._local.conn = conn
        return conn, False

    def _drop_connection(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
        self._local.conn = None

    def _exchange(self, method: str, path: str, body: bytes | None,
                  bearer: str | None) -> tuple[http.client.HTTPResponse, Any]:
        """One request to ``path`` below the base URL: ``(response, JSON body or the raw bytes
        when it is not JSON)``.  A kept-alive connection the server has since closed gets one
        fresh try (not a retry); other connection errors are raised for the caller's retries."""
        headers = {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = "application/json"
        if bearer:
            headers["Authorization"] = f"Bearer {bearer}"
        for fresh_try in (False, True):
            conn, reused = self._connection()
            try:
                conn.request(method, self._parts.path.rstrip("/") + path, body=body, headers=headers)
                resp = conn.getresponse()
                raw = resp.read()
            except (OSError, http.client.HTTPException) as err:
                self._drop_connection()
                if reused and not fresh_try and not isinstance(err, TimeoutError):
                    continue
                raise
            if resp.will_close:
                self._drop_connection()
            try:
                return resp, json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError):
                return resp, raw
        raise AssertionError("unreachable")
