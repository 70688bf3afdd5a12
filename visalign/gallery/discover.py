"""Find a gallery's files, the prompt (and reference) of each, and its task metadata.

Prompt sources, first match wins (docs/gallery.md):

1. ``manifest.jsonl`` written by ``visalign sample`` in the file's folder or any folder above it
   up to the scanned root (``file`` is relative to the manifest's folder);
2. GenEval's output layout: ``<dir>/samples/<k>.png`` takes the prompt of ``<dir>/metadata.jsonl``
   (one JSON line: ``prompt``, ``tag``, ``include``, ...);
3. a ``.txt`` sidecar with the same stem (``cat_001.png`` -> ``cat_001.txt``);
4. the mapping file given with ``--prompts`` (CSV with a header, or JSONL), rows
   ``{file|path|filename|image, prompt}``; ``file`` relative to the mapping file's folder, or a bare
   file name when that name is unique in the gallery;
5. ``--prompt TEXT`` for every file.

A file without a prompt is still scored by rewards that need none.

Task metadata (``Item.task``, handed to rewards as that file's ``metadata`` entry; see the
Reward contract in docs/rewards.md) is what the prompt asks for, never file bookkeeping: a
manifest row's ``metadata`` object when it has one, else the row's GenEval fields (``tag``,
``include``, ``exclude``); GenEval's ``metadata.jsonl`` line as written.  The other sources give
none, and rewards then read the prompt.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

from ..errors import UsageError
from ..io import iter_jsonl
from .decode import IMAGE_EXTS, VIDEO_EXTS

__all__ = ["GalleryUsageError", "Item", "discover", "file_key", "read_mapping", "task_metadata", "GENEVAL_KEYS"]

MEDIA_EXTS = IMAGE_EXTS | VIDEO_EXTS
_FILE_COLUMNS = ("file", "path", "filename", "image")
#: The fields of GenEval's evaluation metadata that say what an image must show.
GENEVAL_KEYS = ("tag", "include", "exclude")


#: a user mistake in the arguments (missing path, bad mapping file): visalign's one usage error
GalleryUsageError = UsageError


@dataclass
class Item:
    """One file of the gallery, with where its prompt came from."""

    path: str
    prompt: str | None = None
    prompt_source: str | None = None  # "manifest" | "geneval" | "sidecar" | "mapping" | "cli" | None
    meta: dict = field(default_factory=dict)  # the manifest row less file and prompt, bookkeeping included
    reference: str | None = None  # a per-file reference image (--references)
    task: dict | None = None  # task metadata for rewards (task_metadata()); never bookkeeping

    @property
    def key(self) -> str:
        return file_key(self.path)


def file_key(path: str) -> str:
    """The identity of a file across runs (for --resume): its absolute, symlink-resolved path."""
    return os.path.realpath(path)


def _walk(root: Path) -> Iterable[Path]:
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        for name in sorted(files):
            if Path(name).suffix.lower() in MEDIA_EXTS:
                yield Path(folder) / name


def _find_files(paths: Sequence[str | Path]) -> tuple[list[tuple[Path, Path]], list[str]]:
    """``[(file, root)]`` in a stable order, each file once, and the skipped non-media files named explicitly."""
    found: list[tuple[Path, Path]] = []
    skipped: list[str] = []
    seen: set[str] = set()
    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            pairs = [(f, p) for f in _walk(p)]
        elif p.exists() or p.is_symlink():
            if p.suffix.lower() not in MEDIA_EXTS:
                skipped.append(str(p))
                continue
            pairs = [(p, p.parent)]
        else:
            raise GalleryUsageError(f"path {str(raw)!r} does not exist; pass image/video files or folders")
        for f, root in pairs:
            k = file_key(str(f))
            if k not in seen:
                seen.add(k)
                found.append((f, root))
    return found, skipped


def _manifest(folder: Path, cache: dict[Path, dict[str, tuple[dict, str]] | None]) -> dict[str, tuple[dict, str]] | None:
    """``{file key: (row, "manifest.jsonl:line")}`` of ``folder``'s manifest, or ``None`` without one."""
    if folder not in cache:
        m = folder / "manifest.jsonl"
        rows: dict[str, tuple[dict, str]] | None = None
        if m.is_file():
            rows = {}
            for n, row in iter_jsonl(m, errors="replace"):  # a killed writer's last line is skipped
                if isinstance(row, dict) and "file" in row and "prompt" in row:
                    rows[file_key(str(folder / str(row["file"])))] = (row, f"{m}:{n}")
        cache[folder] = rows
    return cache[folder]


def _from_manifest(f: Path, root: Path, cache: dict) -> tuple[dict, str] | None:
    folder = f.parent
    while True:
        rows = _manifest(folder, cache)
        if rows and file_key(str(f)) in rows:
            return rows[file_key(str(f))]
        if folder == root or folder == folder.parent or root not in folder.parents:
            return None
        folder = folder.parent


def task_metadata(row: dict, where: str) -> dict | None:
    """The task metadata of a manifest row: what its prompt asks for, without file bookkeeping.

    Args:
        row (`dict`): the manifest row.
        where (`str`): the manifest file and line, for the error message.

    Returns:
        `dict` or `None`: the row's ``metadata`` object when it has one (any task keys, e.g. a
        ``group`` label), else its GenEval fields (:data:`GENEVAL_KEYS`) present, else ``None``.
        ``seed``, ``model`` and the other sampler settings are never part of it.

    Raises:
        GalleryUsageError: ``metadata`` is there but is not a JSON object.
    """
    if "metadata" in row:
        if not isinstance(row["metadata"], dict):
            raise GalleryUsageError(
                f"{where}: 'metadata' must be a JSON object of task metadata (e.g. {{\"tag\": ..., \"include\": [...]}}), "
                f"got {row['metadata']!r}; fix the row or drop the field"
            )
        return dict(row["metadata"])
    task = {k: row[k] for k in GENEVAL_KEYS if k in row}
    return task or None


def _geneval(f: Path, cache: dict[Path, dict | None]) -> dict | None:
    """The ``metadata.jsonl`` line of GenEval's layout ``<dir>/samples/<file>`` for ``f``, else ``None``."""
    if f.parent.name != "samples":
        return None
    meta_file = f.parent.parent / "metadata.jsonl"
    if meta_file not in cache:
        line = None
        if meta_file.is_file():
            text = meta_file.read_text(encoding="utf-8", errors="replace")
            line = next((ln for ln in text.splitlines() if ln.strip()), None)
        if line is None:
            cache[meta_file] = None
        else:
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise GalleryUsageError(
                    f"{meta_file}: not JSON ({err.msg}); GenEval's layout has one JSON line with 'prompt', 'tag', "
                    "'include', ... (fix or remove the file)"
                ) from None
            if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
                raise GalleryUsageError(
                    f"{meta_file}: the line must be a JSON object with a 'prompt' string (GenEval's layout), got {line[:120]!r}"
                )
            cache[meta_file] = row
    return cache[meta_file]


def read_mapping(path: str | Path) -> dict[str, str]:
    """``{file: prompt}`` from a CSV (header with ``file``/``path``/``filename``/``image`` and ``prompt``) or JSONL."""
    path = Path(path)
    if not path.is_file():
        raise GalleryUsageError(f"--prompts file {str(path)!r} not found")
    text = path.read_text(encoding="utf-8", errors="replace")
    if path.suffix.lower() == ".json":
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as err:
            raise GalleryUsageError(f"--prompts {path}: not JSON ({err.msg})") from None
        if not isinstance(rows, list):
            raise GalleryUsageError(f"--prompts {path}: a .json mapping is a list of {{file, prompt}} objects")
    elif path.suffix.lower() == ".jsonl":
        try:
            rows = [row for _, row in iter_jsonl(path, strict=True, errors="replace")]
        except ValueError as err:
            raise GalleryUsageError(f"--prompts {err}") from None
    elif path.suffix.lower() in (".csv", ".tsv"):
        rows = list(csv.DictReader(text.splitlines(), delimiter="\t" if path.suffix.lower() == ".tsv" else ","))
    else:
        raise GalleryUsageError(f"--prompts {str(path)!r}: use a .csv (header file,prompt), .jsonl or .json mapping file")
    mapping: dict[str, str] = {}
    for n, row in enumerate(rows, 1):
        col = next((c for c in _FILE_COLUMNS if isinstance(row, dict) and c in row), None)
        if col is None or "prompt" not in row:
            have = sorted(row) if isinstance(row, dict) else type(row).__name__
            raise GalleryUsageError(
                f"--prompts {path}: row {n} needs a 'prompt' and a file column ({'/'.join(_FILE_COLUMNS)}); got {have}"
            )
        mapping[str(row[col])] = str(row["prompt"])
    return mapping


def _match_mapping(mapping: dict[str, str], base: Path, files: list[Path]) -> dict[str, str]:
    """Mapping keys -> file keys: relative to the mapping file's folder, absolute, or a unique bare name."""
    by_key = {file_key(str(f)) for f in files}
    names: dict[str, list[str]] = {}
    for f in files:
        names.setdefault(f.name, []).append(file_key(str(f)))
    out: dict[str, str] = {}
    for name, prompt in mapping.items():
        k = file_key(str(base / name))
        if k in by_key:
            out[k] = prompt
        elif "/" not in name and len(names.get(name, [])) == 1:
            out[names[name][0]] = prompt
    return out


def _references(ref_dir: Path, files: list[tuple[Path, Path]]) -> tuple[dict[str, str], list[str]]:
    """Per-file references (same relative path and stem, any media extension) and the shared set (all of DIR)."""
    if not ref_dir.is_dir():
        raise GalleryUsageError(f"--references {str(ref_dir)!r} is not a folder of reference images")
    refs = [p for p in _walk(ref_dir) if p.suffix.lower() in IMAGE_EXTS]
    if not refs:
        raise GalleryUsageError(f"--references {str(ref_dir)!r} holds no PNG/JPEG/WebP images")
    by_stem = {str(p.relative_to(ref_dir).with_suffix("")): str(p) for p in refs}
    per_file = {}
    for f, root in files:
        stem = str(f.relative_to(root).with_suffix("")) if root in f.parents else f.stem
        if stem in by_stem:
            per_file[file_key(str(f))] = by_stem[stem]
    return per_file, [str(p) for p in refs]


def discover(
    paths: Sequence[str | Path],
    *,
    prompt: str | None = None,
    prompts_file: str | Path | None = None,
    references: str | Path | None = None,
) -> tuple[list[Item], list[str], list[str]]:
    """The gallery's items in a stable order, the skipped non-media paths, and the shared reference set.

    Raises :class:`GalleryUsageError` for a missing path, mapping file or reference folder, a
    manifest row whose ``metadata`` is not an object, or a GenEval ``metadata.jsonl`` that is not
    one JSON object with a ``prompt``.
    """
    if not paths:
        raise GalleryUsageError("no PATH given: pass image/video files or folders to score")
    files, skipped = _find_files(paths)
    mapping = {}
    if prompts_file is not None:
        mapping = _match_mapping(read_mapping(prompts_file), Path(prompts_file).parent, [f for f, _ in files])
    per_ref, shared_refs = ({}, [])
    if references is not None:
        per_ref, shared_refs = _references(Path(references), files)
    cache: dict = {}
    geneval_cache: dict = {}
    items = []
    for f, root in files:
        key = file_key(str(f))
        item = Item(path=str(f), reference=per_ref.get(key))
        found = _from_manifest(f, root, cache)
        row, where = found if found is not None else (None, "")
        geneval = _geneval(f, geneval_cache) if row is None else None
        sidecar = f.with_suffix(".txt")
        if row is not None:
            item.prompt, item.prompt_source = str(row["prompt"]), "manifest"
            item.meta = {k: v for k, v in row.items() if k not in ("file", "prompt")}
            item.task = task_metadata(row, where)
        elif geneval is not None:
            item.prompt, item.prompt_source = geneval["prompt"], "geneval"
            item.task = dict(geneval)
        elif sidecar.is_file():
            item.prompt, item.prompt_source = sidecar.read_text(encoding="utf-8", errors="replace").strip(), "sidecar"
        elif key in mapping:
            item.prompt, item.prompt_source = mapping[key], "mapping"
        elif prompt is not None:
            item.prompt, item.prompt_source = prompt, "cli"
        items.append(item)
    return items, skipped, shared_refs
