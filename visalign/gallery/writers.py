"""Result files: JSONL, CSV, Parquet -- written so that a kill loses at most the batch in flight.

- ``.jsonl``: the output itself is append-only, flushed and fsynced per batch.
- ``.csv`` / ``.parquet``: rows are journalled per batch to a hidden ``.<name>.partial.jsonl``
  beside the output; the output is (re)written atomically (temp file + rename) from all rows at
  the end, and on Ctrl-C.  The journal is removed once the output holds its rows.

``--resume`` reads the output and the journal, skips their files, and never duplicates a row.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

from visalign.io import JsonlAppender, atomic_write, read_jsonl

from .discover import GalleryUsageError, file_key
from .scoring import HEAD_COLUMNS

__all__ = ["ResultsWriter", "FORMATS", "read_results"]

FORMATS = (".jsonl", ".csv", ".parquet")


def _need_pyarrow():
    try:
        import pyarrow  # noqa: F401
        import pyarrow.parquet as pq
    except ImportError:
        raise GalleryUsageError(
            "writing .parquet needs pyarrow: `pip install pyarrow`, or write .jsonl / .csv instead"
        ) from None
    return pyarrow, pq


def _repair_jsonl(path: Path) -> None:
    """Drop a half-written last line (a writer killed mid-row) so that appends start on a fresh line."""
    if not path.exists():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        keep = data[: data.rfind(b"\n") + 1]
        atomic_write(path, lambda p: p.write_bytes(keep))


def _columns(rows: list[dict]) -> list[str]:
    cols = list(HEAD_COLUMNS)
    seen = set(cols)
    for row in rows:
        for k in row:
            if k not in seen:
                seen.add(k)
                cols.append(k)
    return cols


def _csv_cell(v):
    if v is None:
        return ""
    if isinstance(v, bool):
        return "true" if v else "false"
    return v


def _csv_value(text: str):
    """CSV cells back to values (for --resume and the report): numbers, booleans, empty -> None."""
    if text == "":
        return None
    if text in ("true", "false"):
        return text == "true"
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        return text


def read_results(path: str | Path) -> list[dict]:
    """Rows of a results file in any of the three formats (CSV cells converted back to numbers)."""
    path = Path(path)
    if not path.exists():
        return []
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return read_jsonl(path)
    if suffix == ".csv":
        with open(path, newline="", encoding="utf-8") as fh:
            return [{k: _csv_value(v) for k, v in row.items()} for row in csv.DictReader(fh)]
    _, pq = _need_pyarrow()
    return pq.read_table(path).to_pylist()


def _write_csv(path: Path, rows: list[dict]) -> None:
    cols = _columns(rows)

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="", encoding="utf-8") as fh:
            w = csv.DictWriter(fh, fieldnames=cols, extrasaction="ignore")
            w.writeheader()
            for row in rows:
                w.writerow({k: _csv_cell(row.get(k)) for k in cols})

    atomic_write(path, write)


def _write_parquet(path: Path, rows: list[dict]) -> None:
    pa, pq = _need_pyarrow()
    cols = _columns(rows)
    table = pa.Table.from_pylist([{k: row.get(k) for k in cols} for row in rows])
    atomic_write(path, lambda tmp: pq.write_table(table, tmp))


class ResultsWriter:
    """Owns the output file of one run.

    Args:
        out (`str` or `Path`): ``results.jsonl``, ``.csv`` or ``.parquet``.
        resume (`bool`): keep the rows already there and report their files in ``done``.
        overwrite (`bool`): start afresh even if ``out`` exists.
    """

    def __init__(self, out: str | Path, resume: bool = False, overwrite: bool = False) -> None:
        self.out = Path(out)
        self.format = self.out.suffix.lower()
        if self.format not in FORMATS:
            raise GalleryUsageError(f"--out {str(out)!r}: the file must end in {', '.join(FORMATS)}")
        if self.format == ".parquet":
            _need_pyarrow()
        self.journal = self.out.with_name(f".{self.out.name}.partial.jsonl")
        exists = self.out.exists() or self.journal.exists()
        if exists and not (resume or overwrite):
            raise GalleryUsageError(
                f"--out {str(out)!r} already exists: pass --resume to continue it, or --overwrite to replace it"
            )
        if overwrite and not resume:
            for p in (self.out, self.journal):
                if p.exists():
                    p.unlink()
        self.previous: list[dict] = []
        if resume:
            if self.format == ".jsonl":
                _repair_jsonl(self.out)
            _repair_jsonl(self.journal)
            rows = {file_key(str(r["path"])): r for r in read_results(self.out) if "path" in r}
            rows.update({file_key(str(r["path"])): r for r in read_jsonl(self.journal) if "path" in r})
            self.previous = list(rows.values())
        self.done = {file_key(str(r["path"])) for r in self.previous}
        self.new: list[dict] = []
        self._appender = JsonlAppender(self.out if self.format == ".jsonl" else self.journal)

    def write(self, rows: list[dict]) -> None:
        """Append one batch of rows (flushed and fsynced before returning)."""
        if rows:
            self._appender.write(rows)
            self.new.extend(rows)

    def close(self) -> list[dict]:
        """Finish the output file and return all its rows (previous runs' and this run's)."""
        self._appender.close()
        # The files are the truth: a Ctrl-C between the append and the bookkeeping must not lose a batch.
        merged = {file_key(str(r["path"])): r for r in self.previous}
        merged.update({file_key(str(r["path"])): r for r in read_jsonl(self._appender.path) if "path" in r})
        rows = list(merged.values())
        if self.format == ".csv":
            _write_csv(self.out, rows)
        elif self.format == ".parquet":
            _write_parquet(self.out, rows)
        if self.format != ".jsonl" and self.journal.exists():
            os.unlink(self.journal)
        return rows
