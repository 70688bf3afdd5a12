"""Checkpoints that resume exactly: everything is plain tensors and numbers, loaded with
``torch.load(weights_only=True)`` and written atomically."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from visalign.io import atomic_write

__all__ = ["save_checkpoint", "load_checkpoint", "latest_checkpoint"]


def save_checkpoint(run_dir: str | Path, iteration: int, state: dict[str, Any], keep: int = 2) -> Path:
    """Write ``checkpoints/iter_{iteration:06d}.pt``; keep the newest ``keep`` files."""
    folder = Path(run_dir) / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"iter_{iteration:06d}.pt"
    atomic_write(path, lambda p: torch.save(state, p))
    for old in sorted(folder.glob("iter_*.pt"))[:-keep]:
        old.unlink()
    return path


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    files = sorted((Path(run_dir) / "checkpoints").glob("iter_*.pt"))
    return files[-1] if files else None


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)
