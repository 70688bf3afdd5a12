"""Result files: JSONL, CSV, Parquet -- written so that a kill loses at most the batch in flight.

- ``.jsonl``: the output itself is append-only, flushed and fsynced per batch.
- ``.csv`` / ``.parquet``: rows are journalled per batch to a hidden ``.<name>.partial.jsonl``
  beside the output; the output is (re)written atomically (temp file + rename) from all rows at
  the end, and on Ctrl-C.  The journal is removed once the output holds its rows.

``--resume`` reads the output and the journal, skips their files, and never duplicates a row.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

from visalign.io import JsonlAppender, atomic_write, atomic_write_text, read_jsonl
from visalign.shards import Shard, part_files, part_path

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
        shard (:class:`~visalign.shards.Shard`, *optional*): this process's share when several
            processes score one gallery: each appends to its own part file and the first merges
            the parts into ``out`` in :meth:`close`.  Part files left by a crashed run are read by
            ``resume`` (with any number of processes).
    """

    def __init__(self, out: str | Path, resume: bool = False, overwrite: bool = False,
                 shard: Shard | None = None) -> None:
        self.out = Path(out)
        self.shard = shard = shard or Shard()
        self.format = self.out.suffix.lower()
        if self.format not in FORMATS:
            raise GalleryUsageError(f"--out {str(out)!r}: the file must end in {', '.join(FORMATS)}")
        if self.format == ".parquet":
            _need_pyarrow()
        self.journal = self.out.with_name(f".{self.out.name}.partial.jsonl")
        parts = part_files(self.out)
        exists = self.out.exists() or self.journal.exists() or bool(parts)
        if exists and not (resume or overwrite):
            raise GalleryUsageError(
                f"--out {str(out)!r} already exists"
                + (f" (with {len(parts)} part files of an unfinished run of several processes)" if parts else "")
                + ": pass --resume to continue it, or --overwrite to replace it"
            )
        shard.barrier()  # every process has looked before any writes or deletes
        if overwrite and not resume and shard.main:
            for p in (self.out, self.journal, *parts):
                if p.exists():
                    p.unlink()
        shard.barrier()
        self.previous: list[dict] = []
        self._parts_read = part_files(self.out)
        if resume:
            if self.format == ".jsonl" and shard.main:
                _repair_jsonl(self.out)
            rows = {file_key(str(r["path"])): r for r in read_results(self.out) if "path" in r}
            for extra in (self.journal, *self._parts_read):  # a killed writer's half line is skipped
                rows.update({file_key(str(r["path"])): r for r in read_jsonl(extra) if "path" in r})
            self.previous = list(rows.values())
        self.done = {file_key(str(r["path"])) for r in self.previous}
        self.new: list[dict] = []
        shard.barrier()  # every process has read the same done set before any part file grows
        path = part_path(self.out, shard) if shard.sharded else self.out if self.format == ".jsonl" else self.journal
        _repair_jsonl(path)  # appends start on a fresh line after a killed writer's half line
        self._appender = JsonlAppender(path)

    def write(self, rows: list[dict]) -> None:
        """Append one batch of rows (flushed and fsynced before returning)."""
        if rows:
            self._appender.write(rows)
            self.new.extend(rows)

    def abort(self) -> None:
        """Close without merging (a process of a sharded run that stops early): the part file
        stays for ``resume``."""
        self._appender.close()

    def close(self, order: list[str] | None = None) -> list[dict]:
        """Finish the output file and return all its rows (previous runs' and this run's).

        ``order``: file keys in input order; when the output is rebuilt from part files (several
        processes, or a single process resuming them), rows follow it (files not in it last).
        """
        self._appender.close()
        sharded = self.shard.sharded
        if sharded:
            self.shard.barrier()  # every process has finished its part
        if not sharded or self.shard.main:
            rows = self._merge(order)
        if sharded:
            self.shard.barrier()  # the output is complete
            if not self.shard.main:
                rows = read_results(self.out)
        return rows

    def _merge(self, order: list[str] | None) -> list[dict]:
        # The files are the truth: a Ctrl-C between the append and the bookkeeping must not lose a batch.
        merged = {file_key(str(r["path"])): r for r in self.previous}
        parts = part_files(self.out)
        for src in (parts if self.shard.sharded else [self._appender.path]):
            merged.update({file_key(str(r["path"])): r for r in read_jsonl(src) if "path" in r})
        rebuilt = self.shard.sharded or bool(self._parts_read)
        if rebuilt and order is not None:
            rank = {k: i for i, k in enumerate(order)}
            merged = dict(sorted(merged.items(), key=lambda kv: rank.get(kv[0], len(rank))))
        rows = list(merged.values())
        if self.format == ".csv":
            _write_csv(self.out, rows)
        elif self.format == ".parquet":
            _write_parquet(self.out, rows)
        elif rebuilt:
            atomic_write_text(self.out, "".join(json.dumps(r) + "\n" for r in rows))
        for p in {*parts, *self._parts_read, *([self.journal] if self.format != ".jsonl" else [])}:
            if p.exists():
                os.unlink(p)
        return rows
