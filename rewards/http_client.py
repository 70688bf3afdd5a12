"""The HTTP side of the rewards that ask a server (``remote``, ``vlm-api``): one kept-alive
connection per thread, JSON bodies, a bearer token; standard library only."""

from __future__ import annotations

import http.client
import json
from typing import Any

__all__ = ["KeptAliveHTTP"]


class KeptAliveHTTP:
    """Mixin: a thread-local kept-alive connection to ``self._parts`` (a ``urllib.parse`` split
    URL) with ``self.timeout``; the class sets ``self._local = threading.local()``."""

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
