"""Small I/O helpers that never leave a half-written file behind."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_path)`` then rename the temp file onto ``path`` (same folder, atomic)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda p: p.write_text(text))


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


class JsonlAppender:
    """Append rows to a JSONL file, flushed and fsynced per call, so a kill loses at most one batch."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(self.path, "a", encoding="utf-8")

    def write(self, rows: list[dict]) -> None:
        for row in rows:
            self._fh.write(json.dumps(row) + "\n")
        self._fh.flush()
        os.fsync(self._fh.fileno())

    def close(self) -> None:
        self._fh.close()

    def __enter__(self) -> "JsonlAppender":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def iter_jsonl(path: str | Path, *, strict: bool = False, errors: str = "strict") -> Iterator[tuple[int, Any]]:
    """``(line number, row)`` of each non-blank line of a JSONL file, numbered from 1.

    Args:
        path (`str` or `Path`): the file.
        strict (`bool`, *optional*, defaults to `False`): a line that is not JSON raises a
            ``ValueError`` naming ``path:line``; otherwise it is skipped (a killed writer's last line).
        errors (`str`, *optional*, defaults to `"strict"`): how undecodable UTF-8 is handled
            (``open``'s ``errors``; ``"replace"`` reads any bytes).
    """
    with open(path, encoding="utf-8", errors=errors) as fh:
        for n, line in enumerate(fh, 1):
            line = line.strip()
            if not line:
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                if strict:
                    raise ValueError(f"{path}:{n}: not JSON ({err.msg}): {line[:120]!r}") from None
                continue
            yield n, row


def read_jsonl(path: str | Path) -> list[dict]:
    """Rows of a JSONL file (``[]`` when it does not exist); a truncated last line (killed writer) is
    skipped."""
    path = Path(path)
    if not path.exists():
        return []
    return [row for _, row in iter_jsonl(path)]
