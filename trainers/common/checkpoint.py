"""Checkpoints that resume exactly: everything is plain tensors and numbers, loaded with
``torch.load(weights_only=True)`` and written atomically."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from visalign.io import atomic_write

__all__ = ["save_checkpoint", "load_checkpoint", "latest_checkpoint", "checkpoint_path", "checkpoint_iteration",
           "list_checkpoints"]


def checkpoint_path(run_dir: str | Path, iteration: int) -> Path:
    """``run_dir/checkpoints/iter_{iteration:06d}.pt`` (whether or not it exists)."""
    return Path(run_dir) / "checkpoints" / f"iter_{int(iteration):06d}.pt"


def checkpoint_iteration(path: str | Path) -> int:
    """The iteration a :func:`checkpoint_path` name stands for."""
    return int(Path(path).stem.removeprefix("iter_"))


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """The checkpoints on disk, oldest first."""
    return sorted((Path(run_dir) / "checkpoints").glob("iter_*.pt"))


def save_checkpoint(run_dir: str | Path, iteration: int, state: dict[str, Any], keep: int = 2) -> Path:
    """Write ``checkpoints/iter_{iteration:06d}.pt``; keep the newest ``keep`` files."""
    path = checkpoint_path(run_dir, iteration)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda p: torch.save(state, p))
    for old in list_checkpoints(run_dir)[:-keep]:
        old.unlink()
    return path


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    files = list_checkpoints(run_dir)
    return files[-1] if files else None


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)
