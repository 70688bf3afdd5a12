"""Offline preference pairs for DPO: sources, robust image decoding and a VAE-latent cache.

Sources (``DPOConfig.pairs``):

- a local **parquet / arrow** file or folder with Pick-a-Pic v2's columns ``caption``, ``jpg_0``,
  ``jpg_1`` (encoded image bytes) and ``label_0`` (1: ``jpg_0`` preferred, 0: ``jpg_1``, 0.5: a tie,
  dropped as Diffusion-DPO does); read in record batches with pyarrow (``pip install
  visalign[parquet]``), so a dataset larger than memory streams;
- a **folder with ``pairs.jsonl``** (or a ``.jsonl`` file): one pair per line, ``{"prompt",
  "chosen", "rejected"}`` with image (or video) paths relative to the file, optional
  ``chosen_score`` / ``rejected_score`` (the labeller's scores, logged);
- a Hugging Face **hub dataset id** with the Pick-a-Pic columns, through ``datasets`` (``pip install
  visalign[datasets]``), streamed;
- a **registered source** ``NAME:ARG`` (:func:`visalign.pairs.register_pair_source`): a function
  that makes or finds pairs (e.g. samples of the model being trained, labelled by a reward, made in
  ``DIR`` when missing) and returns one of the above.

The first epoch is expensive (decode, resize, VAE-encode every image), so :func:`build_latent_cache`
does it once: images are decoded in worker processes (:mod:`visalign.media`, the gallery's readers),
a file that does not decode is reported by name and its pair skipped (never fatal), the latents are written to safetensors shards (atomically; an
interrupted build resumes at the first missing shard), and :class:`LatentCache` reads pairs back by
index through memory maps.  The cache folder's name is a hash of the source, the model's VAE and the
image geometry, so another model or resolution never reads stale latents.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

__all__ = ["PairRecord", "open_pairs", "register_pair_source", "pair_sources", "decode_image", "load_media",
           "build_latent_cache", "LatentCache", "CACHE_VERSION"]

#: bump when the cache layout or the preprocessing changes
CACHE_VERSION = 1


@dataclass
class PairRecord:
    """One preference pair before decoding: ``chosen`` / ``rejected`` are encoded image bytes, a
    file path or a folder of frames; ``key`` names it in reports; ``scores`` are the labeller's
    ``(chosen, rejected)`` scores when the source has them."""

    prompt: str
    chosen: Any
    rejected: Any
    key: str
    scores: tuple[float, float] | None = None


@dataclass
class PairSource:
    """An ordered, re-iterable stream of :class:`PairRecord` (ties already dropped).

    ``identity`` names the data for the cache key; ``stats`` counts what was read and dropped."""

    identity: str
    iterate: Callable[[], Iterator[PairRecord]]
    stats: dict = field(default_factory=dict)

    def __iter__(self) -> Iterator[PairRecord]:
        return self.iterate()


# ---- registered sources (visalign.pairs) ----------------------------------------------------
from visalign.pairs import pair_sources, register_pair_source  # noqa: E402  (re-exported)
from visalign.pairs import registered_pair_source as _registered  # noqa: E402


# ---- opening a source ---------------------------------------------------------------------------
def open_pairs(spec: str, *, split: str = "train", max_pairs: int | None = None, sampler=None,
               options: dict | None = None) -> PairSource:
    """The pair source named by ``spec`` (see the module docstring); ``options`` are keyword
    options of a registered source (``dpo.pairs_options``).  Errors name the spec and what would be
    accepted."""
    fn, arg = _registered(spec)
    if fn is not None:
        spec = str(fn(arg, sampler=sampler, **(options or {})))
    elif options:
        raise ValueError(f"dpo.pairs_options {options} applies to a registered source "
                         f"({', '.join(s + ':...' for s in pair_sources())}), not to {spec!r}")
    path = Path(spec).expanduser()
    if path.is_dir() and (path / "pairs.jsonl").is_file():
        return _limit(_jsonl_source(path / "pairs.jsonl"), max_pairs)
    if path.is_file() and path.suffix == ".jsonl":
        return _limit(_jsonl_source(path), max_pairs)
    if path.exists():
        files = _arrow_files(path)
        if not files:
            raise FileNotFoundError(
                f"dpo.pairs: {spec} holds neither pairs.jsonl nor .parquet / .arrow files; give a folder with "
                "pairs.jsonl ({prompt, chosen, rejected} per line), a parquet / arrow file or folder with Pick-a-Pic "
                "columns (caption, jpg_0, jpg_1, label_0), or a hub dataset id")
        return _limit(_arrow_source(files), max_pairs)
    if "/" in spec and not spec.startswith((".", "/", "~")) and spec.count("/") == 1:
        return _limit(_hub_source(spec, split), max_pairs)
    known = ", ".join(f"{s}:..." for s in pair_sources())
    raise FileNotFoundError(f"dpo.pairs: {spec!r} does not exist; give a local folder or file, a hub dataset id "
                            f"(owner/name) or a registered source ({known})")


def _limit(source: PairSource, max_pairs: int | None) -> PairSource:
    if max_pairs is None:
        return source
    inner = source.iterate

    def iterate():
        for k, rec in enumerate(inner()):
            if k >= max_pairs:
                return
            yield rec

    return PairSource(f"{source.identity}|first={max_pairs}", iterate, source.stats)


def _file_identity(paths: list[Path]) -> str:
    h = hashlib.sha1()
    for p in paths:
        st = p.stat()
        h.update(f"{p.resolve()}|{st.st_size}|{int(st.st_mtime)}".encode())
    return h.hexdigest()


def _jsonl_source(path: Path) -> PairSource:
    root = path.parent
    stats = {"rows": 0, "ties": 0}

    def resolve(value):
        p = Path(value)
        return p if p.is_absolute() else root / p

    def iterate():
        from visalign.io import iter_jsonl

        stats.update(rows=0, ties=0)
        for n, row in iter_jsonl(path, strict=True):
            try:
                prompt, chosen, rejected = str(row["prompt"]), row["chosen"], row["rejected"]
            except (KeyError, TypeError) as err:
                raise ValueError(f"{path}:{n}: a pair needs prompt, chosen and rejected ({err}); got "
                                 f"{json.dumps(row)[:120]!r}") from None
            stats["rows"] += 1
            scores = None
            if row.get("chosen_score") is not None and row.get("rejected_score") is not None:
                scores = (float(row["chosen_score"]), float(row["rejected_score"]))
            yield PairRecord(prompt, resolve(chosen), resolve(rejected), f"{path.name}:{n}", scores)

    return PairSource(f"jsonl:{_file_identity([path])}", iterate, stats)


def _arrow_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path] if path.suffix in (".parquet", ".arrow") else []
    return sorted(p for p in path.rglob("*") if p.suffix in (".parquet", ".arrow") and p.is_file())


def _pyarrow():
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        raise ImportError("reading parquet / arrow pairs needs pyarrow: pip install 'visalign[parquet]'") from None
    import pyarrow.ipc
    import pyarrow.parquet

    return pyarrow


def _record_batches(path: Path):
    pa = _pyarrow()
    if path.suffix == ".parquet":
        yield from pa.parquet.ParquetFile(str(path)).iter_batches(batch_size=256)
        return
    with pa.memory_map(str(path)) as src:  # datasets' cache files are IPC streams; files also occur
        try:
            reader = pa.ipc.open_stream(src)
        except pa.ArrowInvalid:
            reader = pa.ipc.open_file(src)
            for i in range(reader.num_record_batches):
                yield reader.get_batch(i)
            return
        yield from reader


_PICKAPIC = ("caption", "jpg_0", "jpg_1", "label_0")


def _rows_to_records(rows: Iterator[dict], where: str, stats: dict) -> Iterator[PairRecord]:
    """Pick-a-Pic rows -> pairs: label_0 1 -> jpg_0 preferred, 0 -> jpg_1, anything else a tie (dropped)."""
    for n, row in enumerate(rows):
        missing = [c for c in _PICKAPIC if c not in row]
        if missing:
            raise ValueError(f"{where}: row {n} lacks column(s) {missing}; preference datasets need Pick-a-Pic v2's "
                             f"columns {list(_PICKAPIC)}")
        stats["rows"] += 1
        label = row["label_0"]
        if label not in (0, 1, 0.0, 1.0):
            stats["ties"] += 1
            continue
        a, b = _image_bytes(row["jpg_0"]), _image_bytes(row["jpg_1"])
        chosen, rejected = (a, b) if float(label) == 1.0 else (b, a)
        yield PairRecord(str(row["caption"] or ""), chosen, rejected, f"{where}#{n}")


def _image_bytes(value):
    if isinstance(value, dict):  # datasets' Image feature stored as {bytes, path}
        return value.get("bytes") or value.get("path")
    return value


def _arrow_source(files: list[Path]) -> PairSource:
    stats = {"rows": 0, "ties": 0}

    def rows():
        for f in files:
            for batch in _record_batches(f):
                cols = [c for c in _PICKAPIC if c in batch.schema.names]
                yield from batch.select(cols).to_pylist()

    def iterate():
        stats.update(rows=0, ties=0)
        yield from _rows_to_records(rows(), files[0].parent.name if len(files) > 1 else files[0].name, stats)

    return PairSource(f"arrow:{_file_identity(files)}", iterate, stats)


def _hub_source(repo_id: str, split: str) -> PairSource:
    try:
        import datasets
    except ImportError:
        raise ImportError(f"dpo.pairs: there is no local file or folder {repo_id!r}; read as a hub dataset id it needs "
                          "the datasets package (pip install 'visalign[datasets]'), or download it (huggingface-cli "
                          f"download {repo_id} --repo-type dataset --local-dir DIR) and give DIR") from None
    stats = {"rows": 0, "ties": 0}

    def iterate():
        stats.update(rows=0, ties=0)
        ds = datasets.load_dataset(repo_id, split=split, streaming=True)
        yield from _rows_to_records(iter(ds), f"{repo_id}[{split}]", stats)

    return PairSource(f"hub:{repo_id}:{split}", iterate, stats)


# ---- decoding -------------------------------------------------------------------------------------
def _resize_crop(img, height: int, width: int):
    """Resize so the image covers ``height x width`` (bilinear, as the Diffusion-DPO script's
    ``Resize``), then crop the centre."""
    from PIL import Image

    w, h = img.size
    scale = max(height / h, width / w)
    nw, nh = max(width, round(w * scale)), max(height, round(h * scale))
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), Image.BILINEAR)
    left, top = (nw - width) // 2, (nh - height) // 2
    return img.crop((left, top, left + width, top + height))


def _to_tensor(img) -> torch.Tensor:
    import numpy as np

    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255.0


def decode_image(data, height: int, width: int) -> torch.Tensor:
    """Encoded bytes, a path or a Pillow image -> ``(3, height, width)`` float in ``[0, 1]`` (RGB as
    :mod:`visalign.media` reads it, resized and centre-cropped; an animation's first frame).  Raises
    :class:`~visalign.media.MediaError` naming the file when it does not decode (callers report and
    skip it)."""
    from PIL import Image

    from visalign.media import read_image

    pixels, _ = read_image(data, max_frames=1)
    return _to_tensor(_resize_crop(Image.fromarray(pixels), height, width))


def _frames(data) -> list:
    """The frames of a folder of frame images, a video file (:data:`visalign.media.VIDEO_SUFFIXES`)
    or an animation, as ``(H, W, 3)`` uint8 arrays."""
    from visalign.media import read_frame_folder, read_media

    path = Path(data)
    if path.is_dir():
        return read_frame_folder(path)
    pixels, _ = read_media(path)
    return list(pixels) if pixels.ndim == 4 else [pixels]


def load_media(data, height: int, width: int, num_frames: int | None) -> torch.Tensor:
    """An image ``(3, H, W)`` or, with ``num_frames``, a video ``(F, 3, H, W)`` (its first
    ``num_frames`` frames; a folder of frame images or a video file) in ``[0, 1]``."""
    from PIL import Image

    if num_frames is None:
        return decode_image(data, height, width)
    frames = _frames(data)
    if len(frames) < num_frames:
        raise ValueError(f"{data}: {len(frames)} frames, fewer than the {num_frames} needed")
    return torch.stack([_to_tensor(_resize_crop(Image.fromarray(f), height, width)) for f in frames[:num_frames]])


def _decode_pair(args):
    """Worker: one record -> (index, chosen, rejected) or (index, None, reason)."""
    index, rec, height, width, frames = args
    try:
        w = load_media(rec.chosen, height, width, frames)
    except Exception as err:  # noqa: BLE001 - any undecodable file is reported, never fatal
        return index, None, f"chosen: {type(err).__name__}: {err}"
    try:
        lose = load_media(rec.rejected, height, width, frames)
    except Exception as err:  # noqa: BLE001
        return index, None, f"rejected: {type(err).__name__}: {err}"
    return index, w, lose


def _collate(items):
    return items


class _DecodeJobs(torch.utils.data.Dataset):
    """Records of one shard, decoded by the DataLoader's workers (:func:`_decode_pair`)."""

    def __init__(self, jobs: list) -> None:
        self.jobs = jobs

    def __len__(self) -> int:
        return len(self.jobs)

    def __getitem__(self, i: int):
        return _decode_pair(self.jobs[i])


# ---- the latent cache -------------------------------------------------------------------------------
def cache_key(source: PairSource, sampler, *, height: int, width: int, num_frames: int | None, hflip: bool,
              dtype: str, shard_size: int) -> tuple[str, dict]:
    """A hash of everything the cached latents depend on, and the description it hashes."""
    vae = getattr(getattr(sampler, "pipeline", None), "vae", None)
    vae_cfg = dict(vae.config) if vae is not None else {"patch": getattr(sampler, "patch", None)}
    info = {"version": CACHE_VERSION, "source": source.identity, "family": sampler.family,
            "model": str(getattr(sampler, "name", "")), "vae": json.loads(json.dumps(vae_cfg, default=str)),
            "height": height, "width": width, "num_frames": num_frames, "hflip": hflip, "dtype": dtype,
            "shard_size": shard_size}
    digest = hashlib.sha1(json.dumps(info, sort_keys=True).encode()).hexdigest()[:16]
    return digest, info


def build_latent_cache(source: PairSource, sampler, root: str | Path, *, height: int, width: int,
                       num_frames: int | None = None, hflip: bool = False, dtype: str = "float16",
                       num_workers: int = 2, encode_batch_size: int = 16, shard_size: int = 512,
                       progress: bool = True, log: Callable[[str], None] | None = print) -> "LatentCache":
    """Decode, encode (``sampler.encode_images``, the VAE posterior mean) and store every pair of
    ``source`` once; return the cache.  Reuses a complete cache with the same key; resumes a partial
    one at its first missing shard.  Undecodable files are listed in ``skipped.jsonl`` and in the
    returned cache's ``skipped`` count."""
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    from visalign.io import atomic_write, atomic_write_json

    key, info = cache_key(source, sampler, height=height, width=width, num_frames=num_frames, hflip=hflip,
                          dtype=dtype, shard_size=shard_size)
    folder = Path(root) / key
    if (folder / "manifest.json").is_file():
        return LatentCache(folder)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_json(folder / "key.json", info)
    store = getattr(torch, dtype)

    def shard_done(k: int) -> bool:
        return (folder / f"shard_{k:05d}.safetensors").is_file()

    def encode(images: list[torch.Tensor]) -> torch.Tensor:
        out = []
        with torch.no_grad():
            for b0 in range(0, len(images), encode_batch_size):
                out.append(sampler.encode_images(torch.stack(images[b0: b0 + encode_batch_size])).to("cpu", store))
        return torch.cat(out)

    def write_shard(k: int, records: list[PairRecord]) -> tuple[int, list[dict]]:
        if shard_done(k):  # written by an earlier, interrupted build
            meta = json.loads((folder / f"shard_{k:05d}.json").read_text())
            return meta["pairs"], meta["skipped"]
        jobs = [(j, r, height, width, num_frames) for j, r in enumerate(records)]
        loader = torch.utils.data.DataLoader(_DecodeJobs(jobs), batch_size=max(1, encode_batch_size), num_workers=num_workers,
                                             collate_fn=_collate)
        good, skipped = [], []
        for batch in loader:
            for j, w, lose in batch:
                if w is None:
                    skipped.append({"key": records[j].key, "reason": lose})
                else:
                    good.append((j, w, lose))
        rows = [{"prompt": records[j].prompt, "key": records[j].key, "scores": records[j].scores} for j, _, _ in good]
        tensors: dict[str, torch.Tensor] = {}
        if good:
            tensors["chosen"] = encode([w for _, w, _ in good])
            tensors["rejected"] = encode([lose for _, _, lose in good])
            if hflip:
                tensors["chosen_flip"] = encode([w.flip(-1) for _, w, _ in good])
                tensors["rejected_flip"] = encode([lose.flip(-1) for _, _, lose in good])
        atomic_write_json(folder / f"shard_{k:05d}.json", {"pairs": len(good), "records": rows, "skipped": skipped})
        atomic_write(folder / f"shard_{k:05d}.safetensors",
                     lambda p: save_file({n: t.contiguous() for n, t in tensors.items()}, str(p)))
        return len(good), skipped

    total, skipped_all, shards = 0, [], 0
    buf: list[PairRecord] = []
    bar = tqdm(desc="caching pair latents", unit="pair", disable=not progress, leave=False)
    for rec in source:
        buf.append(rec)
        if len(buf) == shard_size:
            n, sk = write_shard(shards, buf)
            total, shards = total + n, shards + 1
            skipped_all += sk
            bar.update(len(buf))
            buf = []
    if buf:
        n, sk = write_shard(shards, buf)
        total, shards = total + n, shards + 1
        skipped_all += sk
        bar.update(len(buf))
    bar.close()
    for sk in skipped_all:
        if log is not None:
            log(f"dpo: skipped pair {sk['key']}: {sk['reason']}")
    if total == 0:
        raise ValueError(f"dpo.pairs: no usable pair in {source.identity} ({source.stats.get('rows', 0)} rows, "
                         f"{source.stats.get('ties', 0)} ties dropped, {len(skipped_all)} pairs with undecodable files; "
                         f"see {folder}/shard_*.json)")
    atomic_write_json(folder / "manifest.json", {"pairs": total, "shards": shards, "skipped": len(skipped_all),
                                                 "rows": source.stats.get("rows"), "ties": source.stats.get("ties"),
                                                 "hflip": hflip, **{k: info[k] for k in ("height", "width", "num_frames")}})
    if log is not None:
        log(f"dpo: cached {total} pairs in {folder} ({source.stats.get('ties', 0)} ties dropped, "
            f"{len(skipped_all)} pairs skipped for undecodable files)")
    return LatentCache(folder)


class LatentCache:
    """Cached pair latents, read by pair index through memory-mapped safetensors shards."""

    def __init__(self, folder: str | Path) -> None:
        from safetensors import safe_open

        self.folder = Path(folder)
        manifest = json.loads((self.folder / "manifest.json").read_text())
        self.manifest = manifest
        self.hflip = bool(manifest.get("hflip"))
        self.records: list[dict] = []
        self._where: list[tuple[int, int]] = []
        self._handles = {}
        for k in range(int(manifest["shards"])):
            meta = json.loads((self.folder / f"shard_{k:05d}.json").read_text())
            for j, row in enumerate(meta["records"]):
                self.records.append(row)
                self._where.append((k, j))
            if meta["pairs"]:
                self._handles[k] = safe_open(str(self.folder / f"shard_{k:05d}.safetensors"), framework="pt")
        self.skipped = int(manifest.get("skipped", 0))

    def __len__(self) -> int:
        return len(self.records)

    def get(self, indices, flip: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(chosen, rejected)`` float32 latents of pairs ``indices``; ``flip[i]`` picks the mirrored
        copy of pair ``i`` (caches built with ``hflip``)."""
        ws, ls = [], []
        for n, i in enumerate(int(x) for x in indices):
            k, j = self._where[i]
            h = self._handles[k]
            suffix = "_flip" if flip is not None and bool(flip[n]) else ""
            ws.append(h.get_slice("chosen" + suffix)[j: j + 1])
            ls.append(h.get_slice("rejected" + suffix)[j: j + 1])
        return torch.cat(ws).float(), torch.cat(ls).float()

    def prompts(self, indices) -> list[str]:
        return [self.records[int(i)]["prompt"] for i in indices]

    def scores(self, indices) -> torch.Tensor | None:
        """``(B, 2)`` labeller scores (chosen, rejected) when every pair has them, else None."""
        rows = [self.records[int(i)].get("scores") for i in indices]
        if any(r is None for r in rows):
            return None
        return torch.tensor(rows, dtype=torch.float32)

    def __getstate__(self):  # handles are not picklable; reopen on unpickle
        return {"folder": str(self.folder)}

    def __setstate__(self, state):
        self.__init__(state["folder"])


def cache_root(config_value: str | None, run_dir: str | Path) -> Path:
    return Path(os.path.expanduser(config_value)) if config_value else Path(run_dir) / "latent_cache"
