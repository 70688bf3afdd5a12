"""The scoring loop: decoded batches -> every reward -> one flat row per file.

Row layout (the same for JSONL, CSV and Parquet):

- ``path``, ``prompt``, ``prompt_source``, ``kind`` (``image`` / ``video``), ``width``, ``height``,
  ``frames``, ``mode`` (the file's Pillow mode before conversion), ``error``, ``error_reason``;
- per reward ``R``: ``R`` (the score, ``None`` when invalid), ``R.valid`` (bool), and one
  ``R.<component>`` column per component; per-sample string/number extras as ``R.<extra>``.

Each reward gets the files' prompts and, as ``metadata``, their task metadata (``Item.task``:
GenEval fields or a manifest's ``metadata`` object; ``None`` for a file without), never the
manifest's bookkeeping.  Videos (``(B, F, 3, H, W)``) given to an image-only reward are scored
as the mean over 8 evenly spaced frames (:func:`visalign.rewards.video_frames`).  A reward that
raises on a batch is retried one file at a time, so one bad file cannot take its batch down;
the files that still fail carry ``error_reason = "reward_error"``.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import torch

from .decode import Decoded
from .discover import Item

__all__ = ["resolve_rewards", "split_specs", "Scorer", "score_stream", "HEAD_COLUMNS"]

HEAD_COLUMNS = ("path", "prompt", "prompt_source", "kind", "width", "height", "frames", "mode", "error", "error_reason")
REF_SIZE = 224
VIDEO_FRAMES = 8  # image rewards score videos as the mean over this many evenly spaced frames


def resolve_rewards(rewards: Any) -> dict[str, Any]:
    """``{column name: Reward}`` from a spec string (``"a,b:k=v"``), a list of specs / Rewards, or a dict.

    A reward's column is its registry name; the full spec when two specs share a name.
    """
    from visalign import rewards as R

    if isinstance(rewards, Mapping):
        return {str(k): (R.load(v) if isinstance(v, str) else v) for k, v in rewards.items()}
    if isinstance(rewards, str):
        rewards = split_specs(rewards)
    if isinstance(rewards, R.Reward):
        rewards = [rewards]
    items = list(rewards)
    if not items:
        raise ValueError("no rewards given: pass e.g. rewards='jpeg_compressibility,artifact'")
    names = [R.parse_spec(x)[0] if isinstance(x, str) else x.info.name for x in items]
    out: dict[str, Any] = {}
    for x, name in zip(items, names):
        col = name if names.count(name) == 1 else (x if isinstance(x, str) else f"{name}#{len(out)}")
        out[col] = R.load(x) if isinstance(x, str) else x
    return out


def split_specs(text: str) -> list[str]:
    """Split ``"a,b:k=v,k2=v2,c"`` into specs: a comma starts a new spec unless the next part is ``key=value``."""
    specs: list[str] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        if specs and ":" in specs[-1] and "=" in part and ":" not in part.split("=", 1)[0]:
            specs[-1] += "," + part
        else:
            specs.append(part)
    return specs


def _num(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def _base_row(item: Item, d: Decoded) -> dict:
    info = d.info
    kind = "video" if d.pixels is not None and d.pixels.ndim == 4 else ("image" if d.pixels is not None else None)
    return dict(path=item.path, prompt=item.prompt, prompt_source=item.prompt_source, kind=kind,
                width=info.get("width"), height=info.get("height"), frames=info.get("frames"), mode=info.get("mode"),
                error=d.error, error_reason=d.reason)


def _add_error(row: dict, reason: str, message: str) -> None:
    row["error"] = message if not row.get("error") else f"{row['error']}; {message}"
    row["error_reason"] = row.get("error_reason") or reason


def _to_tensor(batch: Sequence[Decoded], device) -> torch.Tensor:
    arr = np.stack([d.pixels for d in batch])  # (B, H, W, 3) or (B, F, H, W, 3) uint8
    t = torch.from_numpy(arr).to(device)
    t = t.permute(0, 3, 1, 2) if t.ndim == 4 else t.permute(0, 1, 4, 2, 3)
    return t.float().div_(255.0)


def load_reference(path: str, device=None) -> torch.Tensor:
    """A reference image as ``(3, 224, 224)``: shortest side to 224 (bicubic), centre crop."""
    from PIL import Image

    from .decode import decode_file

    d = decode_file(0, path)
    if d.pixels is None:
        raise ValueError(f"reference image {path!r} cannot be read: {d.error}")
    img = Image.fromarray(d.pixels[0] if d.pixels.ndim == 4 else d.pixels)
    s = REF_SIZE / min(img.size)
    img = img.resize((max(REF_SIZE, round(img.width * s)), max(REF_SIZE, round(img.height * s))), Image.BICUBIC)
    left, top = (img.width - REF_SIZE) // 2, (img.height - REF_SIZE) // 2
    img = img.crop((left, top, left + REF_SIZE, top + REF_SIZE))
    return torch.from_numpy(np.array(img)).permute(2, 0, 1).float().div(255.0).to(device)


def _fill(rows: list[dict], idx: list[int], name: str, out) -> None:
    scores = out.scores.detach().float().cpu().tolist()
    valid = out.valid.detach().cpu().tolist()
    comps = {k: v.detach().float().cpu().tolist() for k, v in out.components.items()}
    extras = {}
    for k, v in (out.extras or {}).items():
        if isinstance(v, torch.Tensor) and v.ndim == 1 and v.shape[0] == len(idx):
            extras[k] = [_num(x) for x in v.detach().float().cpu().tolist()]
        elif isinstance(v, (list, tuple)) and len(v) == len(idx) and all(isinstance(x, (str, int, float, bool, type(None))) for x in v):
            extras[k] = list(v)
    for j, i in enumerate(idx):
        row = rows[i]
        ok = bool(valid[j]) and math.isfinite(scores[j])
        row[name] = _num(scores[j]) if ok else None
        row[f"{name}.valid"] = ok
        for k, v in comps.items():
            row[f"{name}.{k}"] = _num(v[j])
        for k, v in extras.items():
            row[f"{name}.{k}"] = v[j]


class Scorer:
    """Scores decoded batches with every reward; holds the (lazily loaded) references."""

    def __init__(self, rewards: Mapping[str, Any], items: Sequence[Item], device=None,
                 shared_references: Sequence[str] = ()) -> None:
        self.rewards, self.items, self.device = dict(rewards), items, device
        self._shared_paths = list(shared_references)
        self._shared: torch.Tensor | None = None
        self._video: dict[str, Any] = {}

    def _for_video(self, name: str, reward):
        """An image reward applied to videos: the mean over 8 evenly spaced frames (``video_frames``)."""
        if name not in self._video:
            from visalign.rewards import video_frames

            self._video[name] = video_frames(reward, frames=VIDEO_FRAMES, reduce="mean")
        return self._video[name]

    def _references(self, batch: Sequence[Item]) -> torch.Tensor | None:
        if all(it.reference for it in batch):
            return torch.stack([load_reference(it.reference, self.device) for it in batch])  # (B, 3, S, S)
        if not self._shared_paths:
            return None
        if self._shared is None:
            self._shared = torch.stack([load_reference(p, self.device) for p in self._shared_paths])[None]
        return self._shared  # (1, R, 3, S, S)

    def _call(self, name: str, reward, images, prompts, items, rows, idx) -> None:
        needs = reward.info.inputs
        refs = self._references(items) if "references" in needs else None
        if "references" in needs and refs is None:
            for i in idx:
                _add_error(rows[i], "reward_error", f"reward {name}: needs reference images (pass --references DIR)")
            return
        # The contract's metadata: each file's task metadata (discover.task_metadata), never its
        # bookkeeping (path, seed, model), which a reward could mistake for its own format.
        tasks = [it.task for it in items]
        meta = tasks if any(t is not None for t in tasks) else None
        out = reward(images, prompts if "prompts" in needs else None, references=refs, metadata=meta)
        _fill(rows, idx, name, out)

    def score_batch(self, batch: Sequence[Decoded]) -> list[dict]:
        items = [self.items[d.index] for d in batch]
        rows = [_base_row(it, d) for it, d in zip(items, batch)]
        for row in rows:  # every row has every reward's score and valid columns, even a failed file's
            for name in self.rewards:
                row[name], row[f"{name}.valid"] = None, False
        if batch[0].pixels is None:
            return rows
        images = _to_tensor(batch, self.device)
        for name, reward in self.rewards.items():
            if images.ndim == 5 and "video" not in reward.info.modality:
                reward = self._for_video(name, reward)
            idx = list(range(len(batch)))
            if "prompts" in reward.info.inputs:
                for i in [i for i in idx if items[i].prompt is None]:
                    _add_error(rows[i], "no_prompt", f"reward {name}: no prompt for this file (manifest, .txt sidecar, --prompts or --prompt)")
                idx = [i for i in idx if items[i].prompt is not None]
            if not idx:
                continue
            sub = images[idx] if len(idx) < len(batch) else images
            try:
                self._call(name, reward, sub, [items[i].prompt for i in idx], [items[i] for i in idx], rows, idx)
            except Exception as err:  # noqa: BLE001 - isolate the failing file, then report it per row
                if len(idx) == 1:
                    _add_error(rows[idx[0]], "reward_error", f"reward {name}: {type(err).__name__}: {err}")
                    continue
                for i in idx:
                    try:
                        self._call(name, reward, images[i : i + 1], [items[i].prompt], [items[i]], rows, [i])
                    except Exception as err1:  # noqa: BLE001
                        _add_error(rows[i], "reward_error", f"reward {name}: {type(err1).__name__}: {err1}")
        return rows


def score_stream(batches: Iterable[list[Decoded]], scorer: Scorer, write: Callable[[list[dict]], None],
                 on_progress: Callable[[int], None] | None = None, thumbs: dict | None = None,
                 flush_errors_at: int = 16) -> None:
    """Score every batch and ``write`` rows per batch; failed files are written with the next batch."""
    failed: list[dict] = []
    with torch.inference_mode():
        for batch in batches:
            rows = scorer.score_batch(batch)
            if thumbs is not None:
                for d in batch:
                    if d.thumbnail:
                        thumbs[scorer.items[d.index].key] = d.thumbnail
            if batch[0].pixels is None:
                failed.extend(rows)
                if len(failed) >= flush_errors_at:
                    write(failed)
                    failed = []
            else:
                write(failed + rows)
                failed = []
            if on_progress is not None:
                on_progress(len(batch))
    if failed:
        write(failed)
