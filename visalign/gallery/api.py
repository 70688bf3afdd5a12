"""``visalign.gallery.score``: the Python entry point behind ``visalign score``."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from visalign.io import atomic_write_json, atomic_write_text
from visalign.shards import Shard

from .decode import DEFAULT_MAX_FRAMES, DEFAULT_MAX_PIXELS
from .discover import GalleryUsageError, discover, file_key
from .loader import iter_batches
from .report import build_report
from .scoring import Scorer, resolve_rewards, score_stream
from .summary import format_summary, summarize
from .writers import ResultsWriter

__all__ = ["score", "ScoreRun", "describe"]

THUMB_SIZE = 96


@dataclass
class ScoreRun:
    """What :func:`score` did: all rows (previous runs' included), this run's count and the summary."""

    rows: list[dict]
    new: int
    skipped_done: int
    skipped_other: list[str] = field(default_factory=list)
    summary: dict = field(default_factory=dict)
    rewards: list[str] = field(default_factory=list)


def _report_thumbs(rows: list[dict], thumbs: dict[str, str], limit: int, workers: int, max_pixels: int) -> dict[str, str]:
    """Thumbnails for the first ``limit`` rows: this run's come from the workers; earlier runs' are re-read."""
    keys = [file_key(str(r["path"])) for r in rows[:limit] if not r.get("error")]
    missing = [k for k in keys if k not in thumbs]
    paths = {file_key(str(r["path"])): str(r["path"]) for r in rows[:limit]}
    for d in (x for batch in iter_batches([paths[k] for k in missing], batch_size=16, workers=workers,
                                          max_pixels=max_pixels, thumbnail=THUMB_SIZE) for x in batch):
        if d.thumbnail:
            thumbs[missing[d.index]] = d.thumbnail
    return thumbs


def score(
    paths: Sequence[str | Path] | str | Path,
    rewards: Any,
    *,
    out: str | Path | None = None,
    report: str | Path | None = None,
    prompt: str | None = None,
    prompts: str | Path | None = None,
    references: str | Path | None = None,
    batch_size: int = 8,
    workers: int = 0,
    device: str | None = None,
    resume: bool = False,
    overwrite: bool = False,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_frames: int = DEFAULT_MAX_FRAMES,
    max_thumbnails: int = 2000,
    progress: bool = False,
    shard: Shard | None = None,
) -> ScoreRun:
    """Score every image / video under ``paths`` with ``rewards``; one row per file.

    Args:
        paths: files and folders (searched recursively for PNG, JPEG, WebP, GIF, MP4).
        rewards: spec string ``"jpeg_compressibility,clipscore:model=ViT-B-32"``, a list of specs /
            ``Reward`` objects, or ``{column name: Reward}``.
        out (*optional*): ``results.jsonl`` / ``.csv`` / ``.parquet``; rows are also returned.
        report (*optional*): ``report.html``; ``summary.json`` is written beside it.
        prompt, prompts, references: prompt sources and reference images (see
            :mod:`visalign.gallery.discover`).
        batch_size: files per reward call (batches hold files of one size only).
        workers: decoding processes; 0 decodes in this process.
        device: where rewards run (``"cpu"``, ``"cuda"``...); the rewards are moved there.
        resume: skip files already in ``out`` (and its journal); needs ``out``.
        overwrite: replace an existing ``out``.
        max_pixels: per-frame pixel limit (decompression bombs above it become error rows).
        max_frames: animated files are subsampled evenly to this many frames.
        max_thumbnails: the report embeds thumbnails for at most this many files.
        progress: show a progress bar (items/s) on stderr.
        shard (*optional*): this process's share when several processes score one gallery
            (:func:`visalign.shards.current_shard` under ``accelerate launch``): each scores every
            N-th file still to do and the first merges the results into ``out`` in input order
            (needs ``out``).  The report and summary are written by the first process.

    Returns:
        A :class:`ScoreRun`; ``run.rows`` holds every file's row.

    Raises:
        GalleryUsageError: bad paths, mapping file, output name, or ``out`` exists without
            ``resume``/``overwrite``.
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    if batch_size < 1 or workers < 0:
        raise GalleryUsageError(f"batch_size must be >= 1 and workers >= 0; got {batch_size} and {workers}")
    if resume and out is None:
        raise GalleryUsageError("resume=True needs out=... (the results file to continue)")
    if resume and overwrite:
        raise GalleryUsageError("pass either --resume or --overwrite, not both")
    if report is not None and Path(report).suffix.lower() not in (".html", ".htm"):
        raise GalleryUsageError(f"--report {str(report)!r}: the report is an .html file")
    shard = shard or Shard()
    if shard.sharded and out is None:
        raise GalleryUsageError("scoring with several processes needs out=... (where their results are merged)")
    items, skipped, shared_refs = discover(paths, prompt=prompt, prompts_file=prompts, references=references)
    writer = ResultsWriter(out, resume=resume, overwrite=overwrite, shard=shard) if out is not None else None
    pending = [it for it in items if writer is None or it.key not in writer.done]
    todo = shard.take(pending)
    reward_map = resolve_rewards(rewards)
    if device is not None:
        for r in reward_map.values():
            r.to(device)

    new_rows: list[dict] = []
    thumbs: dict[str, str] = {}

    def write(rows: list[dict]) -> None:
        if writer is not None:
            writer.write(rows)
        new_rows.extend(rows)

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(todo), unit="item", desc="scoring", file=sys.stderr, dynamic_ncols=True)
    scorer = Scorer(reward_map, todo, device=device, shared_references=shared_refs)
    batches = iter_batches([it.path for it in todo], batch_size=batch_size, workers=workers, max_pixels=max_pixels,
                           max_frames=max_frames, thumbnail=THUMB_SIZE if report is not None else 0)
    finished = False
    try:
        score_stream(batches, scorer, write, on_progress=bar.update if bar else None, thumbs=thumbs,
                     flush_errors_at=batch_size)
        finished = True
    finally:
        if bar is not None:
            bar.close()
        if writer is None:
            all_rows = new_rows
        elif shard.sharded and not finished:
            writer.abort()  # the other processes may be gone: no barrier; the part file stays for --resume
        else:
            # on Ctrl-C too: the output holds every finished batch (CSV / Parquet rewritten from the journal)
            all_rows = writer.close(order=[it.key for it in items])
    names = list(reward_map)
    summary = summarize(all_rows, names)
    if report is not None and shard.main:
        report = Path(report)
        _report_thumbs(all_rows, thumbs, max_thumbnails, workers, max_pixels)
        atomic_write_text(report, build_report(all_rows, names, summary, thumbs))
        atomic_write_json(report.with_name("summary.json"), summary)
    new = len(all_rows) - len(writer.previous) if shard.sharded else len(new_rows)
    return ScoreRun(rows=all_rows, new=new, skipped_done=len(items) - len(pending), skipped_other=skipped,
                    summary=summary, rewards=names)


def describe(run: ScoreRun) -> str:
    """The end-of-run summary for the terminal."""
    head = f"this run: {run.new} files"
    if run.skipped_done:
        head += f", {run.skipped_done} already in the results (--resume)"
    if run.skipped_other:
        head += f", {len(run.skipped_other)} non-image paths skipped"
    return head + "\n" + format_summary(run.summary)
