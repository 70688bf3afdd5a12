"""Checkpoints that resume exactly: everything is plain tensors and numbers, loaded with
``torch.load(weights_only=True)`` and written atomically.

A run on one process or with data parallelism writes one file per checkpoint,
``checkpoints/iter_NNNNNN.pt``; a sharded run (FSDP2, DeepSpeed ZeRO) writes a folder
``checkpoints/iter_NNNNNN/`` (``accelerator.save_state`` in ``accelerate/`` and each process's own
state in ``trainer_rankR.pt``), which takes its name only once every process has written its part."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch

from visalign.io import atomic_write

__all__ = ["save_checkpoint", "load_checkpoint", "latest_checkpoint", "checkpoint_path", "checkpoint_iteration",
           "list_checkpoints", "sharded_checkpoint_path", "prune_checkpoints"]


def checkpoint_path(run_dir: str | Path, iteration: int) -> Path:
    """``run_dir/checkpoints/iter_{iteration:06d}.pt`` (whether or not it exists)."""
    return Path(run_dir) / "checkpoints" / f"iter_{int(iteration):06d}.pt"


def sharded_checkpoint_path(run_dir: str | Path, iteration: int) -> Path:
    """``run_dir/checkpoints/iter_{iteration:06d}``: a sharded run's checkpoint folder."""
    return Path(run_dir) / "checkpoints" / f"iter_{int(iteration):06d}"


def checkpoint_iteration(path: str | Path) -> int:
    """The iteration a :func:`checkpoint_path` (or :func:`sharded_checkpoint_path`) name stands for."""
    return int(Path(path).name.removeprefix("iter_").removesuffix(".pt"))


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """The checkpoints on disk (files and sharded runs' folders), oldest first."""
    root = Path(run_dir) / "checkpoints"
    found = [p for p in root.glob("iter_*") if (p.is_file() and p.suffix == ".pt") or p.is_dir()]
    return sorted(found, key=checkpoint_iteration)


def prune_checkpoints(run_dir: str | Path, keep: int) -> None:
    """Delete all but the newest ``keep`` checkpoints."""
    for old in list_checkpoints(run_dir)[:-keep]:
        if old.is_dir():
            shutil.rmtree(old)
        else:
            old.unlink()


def save_checkpoint(run_dir: str | Path, iteration: int, state: dict[str, Any], keep: int = 2) -> Path:
    """Write ``checkpoints/iter_{iteration:06d}.pt``; keep the newest ``keep`` checkpoints."""
    path = checkpoint_path(run_dir, iteration)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda p: torch.save(state, p))
    prune_checkpoints(run_dir, keep)
    return path


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    files = list_checkpoints(run_dir)
    return files[-1] if files else None


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)
