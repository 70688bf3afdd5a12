"""Labelled data for the reward-head kit: the file formats, in-memory sets, and the embedding cache.

Formats (docs/reward_training.md, "Data formats"); image paths are relative to the file's folder:

- **pairs** (``task: pairwise``): JSONL rows ``{"prompt", "chosen", "rejected"}`` with an optional
  ``"label"``, the probability that ``chosen`` is preferred (default 1; 0.5 is a tie).  Or a
  Pick-a-Pic-style parquet file (columns ``caption``, ``jpg_0``, ``jpg_1`` as image bytes,
  ``label_0``; needs ``pyarrow``).
- **ratings** (``task: rating``): JSONL rows ``{"image", "prompt", "score"}``.
- **labels** (``task: binary``): JSONL rows ``{"image", "prompt", "label"}`` with label 0/1 or
  true/false.

``prompt`` may be omitted when the head does not read it.  Images are identified by the SHA-256
of their bytes, so the embedding cache (:class:`EmbeddingCache`) is keyed by content: a changed
file is embedded again, an unchanged one never twice, and a changed backbone uses another cache
file.
"""

from __future__ import annotations

import hashlib
import io
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

__all__ = ["LabelledSet", "read_dataset", "EmbeddingCache", "image_digest", "text_digest"]


def image_digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def text_digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@dataclass
class LabelledSet:
    """Items (images + prompts + per-item values) and, for preferences, pairs of items.

    Args:
        images: either a ``uint8`` tensor ``(N, 3, H, W)`` or a list of ``N`` encoded image files
            (``bytes``, as read from disk or parquet).
        prompts: ``N`` prompts (``None`` entries when there is none).
        targets (`torch.Tensor`, *optional*): ``(N,)`` float: the rating or the 0/1 label.
        pairs (`torch.Tensor`, *optional*): ``(P, 2)`` long, item indices ``(first, second)``.
        pair_labels (`torch.Tensor`, *optional*): ``(P,)`` probability that ``first`` is preferred.
        extras (`dict`): per-item tensors ``(N, ...)`` for a provider's extra loss.
    """

    images: torch.Tensor | list[bytes]
    prompts: list[str | None]
    targets: torch.Tensor | None = None
    pairs: torch.Tensor | None = None
    pair_labels: torch.Tensor | None = None
    extras: dict[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = len(self.images)
        if len(self.prompts) != n:
            raise ValueError(f"LabelledSet: {n} images but {len(self.prompts)} prompts")
        if isinstance(self.images, torch.Tensor) and (self.images.ndim != 4 or self.images.dtype != torch.uint8):
            raise ValueError(f"LabelledSet.images as a tensor must be uint8 (N, 3, H, W); got {self.images.dtype} "
                             f"{tuple(self.images.shape)}")
        if self.targets is not None and self.targets.shape != (n,):
            raise ValueError(f"LabelledSet.targets must be ({n},), got {tuple(self.targets.shape)}")
        if self.pairs is not None:
            if self.pairs.ndim != 2 or self.pairs.shape[1] != 2:
                raise ValueError(f"LabelledSet.pairs must be (P, 2), got {tuple(self.pairs.shape)}")
            if self.pair_labels is None:
                self.pair_labels = torch.ones(len(self.pairs))
            if len(self.pairs) and (int(self.pairs.min()) < 0 or int(self.pairs.max()) >= n):
                raise ValueError(f"LabelledSet.pairs index items 0..{n - 1}")
        for k, v in self.extras.items():
            if len(v) != n:
                raise ValueError(f"LabelledSet.extras[{k!r}] has {len(v)} rows for {n} items")

    def __len__(self) -> int:
        return len(self.images)

    @property
    def units(self) -> int:
        """Training units: pairs for preferences, items otherwise."""
        return len(self.pairs) if self.pairs is not None else len(self)

    @classmethod
    def from_tensors(cls, images: torch.Tensor, prompts: Sequence[str | None] | None = None,
                     targets: torch.Tensor | Sequence[float] | None = None, **kwargs: Any) -> "LabelledSet":
        """From images as floats in [0, 1] (quantised to uint8, as files would be) or uint8."""
        if images.is_floating_point():
            images = (images.detach().clamp(0, 1) * 255).round().to(torch.uint8).cpu()
        prompts = list(prompts) if prompts is not None else [None] * len(images)
        if targets is not None:
            targets = torch.as_tensor(targets, dtype=torch.float32).flatten()
        return cls(images.cpu(), prompts, targets, **kwargs)

    def select(self, units: torch.Tensor) -> "LabelledSet":
        """The subset of these training units (pairs keep every item; items are subset)."""
        units = units.long()
        if self.pairs is not None:
            return LabelledSet(self.images, self.prompts, self.targets, self.pairs[units], self.pair_labels[units],
                               self.extras)
        imgs = self.images[units] if isinstance(self.images, torch.Tensor) else [self.images[i] for i in units.tolist()]
        return LabelledSet(imgs, [self.prompts[i] for i in units.tolist()],
                           self.targets[units] if self.targets is not None else None, None, None,
                           {k: v[units] for k, v in self.extras.items()})

    def image_batch(self, index: torch.Tensor) -> torch.Tensor:
        """Images ``index`` as float ``(n, 3, H, W)`` in [0, 1] (decoded files must share a size)."""
        if isinstance(self.images, torch.Tensor):
            return self.images[index].float() / 255
        return decode_images([self.images[i] for i in index.tolist()])

    @staticmethod
    def concat(a: "LabelledSet", b: "LabelledSet") -> "LabelledSet":
        """Items of ``a`` then ``b`` (pairs re-indexed); used to mix new labels with replayed ones."""
        if (a.pairs is None) != (b.pairs is None) or (a.targets is None) != (b.targets is None):
            raise ValueError("cannot mix a preference set with a rating/label set")
        if isinstance(a.images, torch.Tensor) and isinstance(b.images, torch.Tensor):
            if a.images.shape[1:] != b.images.shape[1:]:
                raise ValueError(f"cannot mix images of shapes {tuple(a.images.shape[1:])} and {tuple(b.images.shape[1:])}")
            images: Any = torch.cat([a.images, b.images])
        else:  # files, or files and tensors: tensors become PNG files (lossless)
            images = _as_files(a.images) + _as_files(b.images)
        extras = {k: torch.cat([a.extras[k], b.extras[k]]) for k in a.extras if k in b.extras}
        return LabelledSet(
            images, a.prompts + b.prompts,
            torch.cat([a.targets, b.targets]) if a.targets is not None else None,
            torch.cat([a.pairs, b.pairs + len(a)]) if a.pairs is not None else None,
            torch.cat([a.pair_labels, b.pair_labels]) if a.pairs is not None else None, extras)


def _as_files(images: torch.Tensor | list[bytes]) -> list[bytes]:
    if isinstance(images, list):
        return list(images)
    from PIL import Image

    out = []
    for img in images:
        buf = io.BytesIO()
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def decode_images(blobs: Sequence[bytes]) -> torch.Tensor:
    from PIL import Image

    from .preprocess import to_tensor

    return to_tensor([Image.open(io.BytesIO(b)) for b in blobs])


# ---------------------------------------------------------------------------------------------
# Readers
# ---------------------------------------------------------------------------------------------
def _rows(path: Path) -> list[dict]:
    from visalign.io import iter_jsonl

    rows = []
    for n, row in iter_jsonl(path, strict=True):
        if not isinstance(row, dict):
            raise ValueError(f"{path}:{n}: each line must be a JSON object, got {type(row).__name__}")
        rows.append(row)
    if not rows:
        raise ValueError(f"{path} holds no rows")
    return rows


def _need(row: dict, keys: Sequence[str], path: Path, n: int, task: str) -> None:
    missing = [k for k in keys if k not in row]
    if missing:
        raise ValueError(f"{path} row {n} lacks {missing} (has {sorted(row)}); a {task} row needs {list(keys)} "
                         "(docs/reward_training.md, 'Data formats')")


class _Items:
    """Items keyed by (image file, prompt): each file is read once per prompt it is used with."""

    def __init__(self, root: Path) -> None:
        self.root, self.blobs, self.prompts, self.index = root, [], [], {}

    def add(self, ref: str, prompt: str | None, where: str) -> int:
        path = Path(ref) if os.path.isabs(ref) else self.root / ref
        key = (str(path), prompt)
        if key not in self.index:
            if not path.is_file():
                raise FileNotFoundError(f"{where}: image {ref!r} not found (looked for {str(path)!r}; paths are "
                                        "relative to the data file's folder)")
            self.index[key] = len(self.blobs)
            self.blobs.append(path.read_bytes())
            self.prompts.append(prompt)
        return self.index[key]


def read_dataset(path: str | os.PathLike, task: str, max_rows: int | None = None) -> LabelledSet:
    """Read a JSONL (or, for ``pairwise``, a Pick-a-Pic-style parquet) file for ``task``, or, for
    ``pairwise``, a hub dataset ``hub:OWNER/NAME[:SPLIT]`` with Pick-a-Pic v2's columns (streamed
    through the ``datasets`` package; ``max_rows``: the first N rows)."""
    if str(path).startswith("hub:"):
        if task != "pairwise":
            raise ValueError(f"{path}: hub datasets are read as Pick-a-Pic-style pairs, for task 'pairwise' "
                             f"(got {task!r}); for {task} labels give a JSONL file")
        repo, _, split = str(path)[4:].partition(":")
        return _read_hub_pairs(repo, split or "train", max_rows)
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file {str(path)!r} not found")
    if task not in ("pairwise", "rating", "binary"):
        raise ValueError(f"task={task!r}: choose one of ['pairwise', 'rating', 'binary']")
    if path.suffix == ".parquet":
        if task != "pairwise":
            raise ValueError(f"{path}: parquet input is the Pick-a-Pic pair format, for task 'pairwise' (got {task!r})")
        return _read_pickapic(path)
    rows = _rows(path)
    items = _Items(path.parent)
    if task == "pairwise":
        pairs, labels = [], []
        for n, row in enumerate(rows, 1):
            _need(row, ("chosen", "rejected"), path, n, task)
            where = f"{path}:{n}"
            pairs.append((items.add(row["chosen"], row.get("prompt"), where),
                          items.add(row["rejected"], row.get("prompt"), where)))
            labels.append(float(row.get("label", 1.0)))
        lab = torch.tensor(labels, dtype=torch.float32)
        if ((lab < 0) | (lab > 1)).any():
            raise ValueError(f"{path}: 'label' is P(chosen preferred), in [0, 1]; got {lab.min():g}..{lab.max():g}")
        return LabelledSet(items.blobs, items.prompts, None, torch.tensor(pairs, dtype=torch.long), lab)
    key = "score" if task == "rating" else "label"
    targets = []
    for n, row in enumerate(rows, 1):
        _need(row, ("image", key), path, n, task)
        value = row[key]
        if task == "binary":
            if value not in (0, 1, True, False):
                raise ValueError(f"{path} row {n}: label must be 0/1 or true/false, got {value!r}")
        elif not isinstance(value, (int, float)) or isinstance(value, bool):
            raise ValueError(f"{path} row {n}: score must be a number, got {value!r}")
        items.index.clear()  # rows are items, even when a file repeats
        items.add(row["image"], row.get("prompt"), f"{path}:{n}")
        targets.append(float(value))
    return LabelledSet(items.blobs, items.prompts, torch.tensor(targets, dtype=torch.float32))


def _read_pickapic(path: Path) -> LabelledSet:
    try:
        import pyarrow.parquet as pq
    except ImportError as err:  # optional dependency
        raise ImportError("reading parquet pairs needs pyarrow: pip install 'visalign[parquet]'") from err
    table = pq.read_table(str(path)).to_pydict()
    need = ("caption", "jpg_0", "jpg_1", "label_0")
    missing = [k for k in need if k not in table]
    if missing:
        raise ValueError(f"{path}: a Pick-a-Pic-style parquet needs columns {list(need)}; missing {missing} "
                         f"(has {sorted(table)})")
    rows = ({"caption": c, "jpg_0": a, "jpg_1": b, "label_0": l0}
            for c, a, b, l0 in zip(table["caption"], table["jpg_0"], table["jpg_1"], table["label_0"]))
    return _pickapic_rows(rows, str(path))


def _pickapic_rows(rows, where: str, max_rows: int | None = None) -> LabelledSet:
    """Pick-a-Pic v2 rows (``caption``, ``jpg_0``, ``jpg_1``, ``label_0``) -> a pairwise set whose label
    is P(image 0 preferred): ``label_0`` is 1 when image 0 won, 0 when image 1 won, 0.5 for a tie (kept:
    the Bradley-Terry loss takes soft labels)."""
    blobs: list[bytes] = []
    prompts: list[str | None] = []
    pairs, labels = [], []
    for n, row in enumerate(rows):
        if max_rows is not None and n >= max_rows:
            break
        missing = [k for k in ("caption", "jpg_0", "jpg_1", "label_0") if k not in row]
        if missing:
            raise ValueError(f"{where}: row {n} lacks column(s) {missing}; preference pairs need Pick-a-Pic v2's "
                             "columns caption, jpg_0, jpg_1, label_0")
        a, b = (v.get("bytes") if isinstance(v, dict) else v for v in (row["jpg_0"], row["jpg_1"]))
        blobs += [a, b]
        prompts += [row["caption"], row["caption"]]
        pairs.append((len(blobs) - 2, len(blobs) - 1))
        labels.append(float(row["label_0"]))
    if not pairs:
        raise ValueError(f"{where}: no preference pairs read")
    return LabelledSet(blobs, prompts, None, torch.tensor(pairs, dtype=torch.long), torch.tensor(labels))


def _read_hub_pairs(repo: str, split: str, max_rows: int | None) -> LabelledSet:
    """Stream a hub dataset with Pick-a-Pic v2's columns (e.g. ``yuvalkirstain/pickapic_v2``; the
    datasets ``Image`` feature's ``{bytes, path}`` dicts are read as their bytes)."""
    try:
        import datasets
    except ImportError:
        raise ImportError(f"data.train hub:{repo}: reading a hub dataset needs the datasets package "
                          "(pip install 'visalign[datasets]'), or download it (huggingface-cli download "
                          f"{repo} --repo-type dataset --local-dir DIR) and give a parquet file of DIR") from None
    ds = datasets.load_dataset(repo, split=split, streaming=True)
    return _pickapic_rows(iter(ds), f"hub:{repo}[{split}]", max_rows)


# ---------------------------------------------------------------------------------------------
# Embedding cache
# ---------------------------------------------------------------------------------------------
class EmbeddingCache:
    """Frozen-backbone features keyed by content, in one safetensors file per backbone identity.

    Keys are ``img/<sha256 of the image bytes or uint8 pixels>`` and ``txt/<sha256 of the prompt>``;
    the file is ``<root>/<backbone digest>.safetensors`` (:meth:`.head.BackboneConfig.digest`), so
    another backbone, other weights or another feature never reuse these features.  Written
    atomically after each :meth:`features` call that computed something new.
    """

    def __init__(self, root: str | os.PathLike | None, backbone_digest: str) -> None:
        self.path = Path(root) / f"{backbone_digest}.safetensors" if root is not None else None  # None: memory only
        self.store: dict[str, torch.Tensor] = {}
        self.hits = self.misses = 0
        if self.path is not None and self.path.is_file():
            from safetensors.torch import load_file

            self.store = load_file(str(self.path))

    def save(self) -> None:
        from safetensors.torch import save_file

        from visalign.io import atomic_write

        if self.path is None:
            return
        state = {k: v.contiguous() for k, v in self.store.items()}
        atomic_write(self.path, lambda p: save_file(state, str(p)))

    def features(self, data: LabelledSet, image_fn: Callable[[torch.Tensor], torch.Tensor],
                 text_fn: Callable[[list[str]], torch.Tensor] | None, batch: int = 64,
                 log: Callable[[str], None] = lambda s: None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Image features ``(N, D)`` (and text features ``(N, D_t)`` when ``text_fn``) of ``data``'s
        items, computing only those not cached.  Images that share a size are embedded together."""
        if isinstance(data.images, torch.Tensor):
            keys = ["img/" + image_digest(data.images[i].numpy().tobytes() + str(tuple(data.images[i].shape)).encode())
                    for i in range(len(data))]
        else:
            keys = ["img/" + image_digest(b) for b in data.images]
        todo = sorted({k: i for i, k in enumerate(keys) if k not in self.store}.values())
        self.hits += len(keys) - len(todo)
        self.misses += len(todo)
        new = bool(todo)
        if todo:
            by_size: dict[tuple, list[int]] = {}
            for i in todo:
                img = data.image_batch(torch.tensor([i]))
                by_size.setdefault(tuple(img.shape[1:]), []).append(i)
            done = 0
            for idx in by_size.values():
                for s in range(0, len(idx), batch):
                    chunk = torch.tensor(idx[s:s + batch])
                    with torch.no_grad():
                        feats = image_fn(data.image_batch(chunk)).float().cpu()
                    for i, f in zip(chunk.tolist(), feats):
                        self.store[keys[i]] = f.clone()
                    done += len(chunk)
                    log(f"embedded {done}/{len(todo)} images")
        image_feats = torch.stack([self.store[k] for k in keys])
        text_feats = None
        if text_fn is not None:
            if any(p is None for p in data.prompts):
                raise ValueError("this head reads prompts, but some rows have no 'prompt'; add them or set "
                                 "head.use_prompt: false")
            tkeys = ["txt/" + text_digest(p) for p in data.prompts]
            missing = sorted({k: p for k, p in zip(tkeys, data.prompts) if k not in self.store}.items())
            for s in range(0, len(missing), batch):
                chunk = missing[s:s + batch]
                with torch.no_grad():
                    feats = text_fn([p for _, p in chunk]).float().cpu()
                for (k, _), f in zip(chunk, feats):
                    self.store[k] = f.clone()
            new = new or bool(missing)
            text_feats = torch.stack([self.store[k] for k in tkeys])
        if new:
            self.save()
        return image_feats, text_feats
