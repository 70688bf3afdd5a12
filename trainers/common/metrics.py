"""Metric logging (JSONL always; TensorBoard / W&B through accelerate trackers) and plots."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import torch

from visalign.io import JsonlAppender, read_jsonl

__all__ = ["MetricsLog", "masked_stats", "plot_metrics"]


def masked_stats(values: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[float, float]:
    """Mean and std of the finite (and masked-in) entries; NaN when there are none."""
    v = values.detach().float().flatten()
    keep = torch.isfinite(v)
    if mask is not None:
        keep &= mask.flatten().bool()
    v = v[keep]
    if v.numel() == 0:
        return float("nan"), float("nan")
    return float(v.mean()), float(v.std(unbiased=False)) if v.numel() > 1 else 0.0


class MetricsLog:
    """Appends one JSON row per iteration to ``metrics.jsonl`` and forwards to accelerate trackers."""

    def __init__(self, run_dir: str | Path, accelerator=None, enabled: bool = True) -> None:
        self.path = Path(run_dir) / "metrics.jsonl"
        self.accelerator = accelerator
        self.enabled = enabled
        self._writer = JsonlAppender(self.path) if enabled else None

    def log(self, row: dict) -> None:
        if not self.enabled:
            return
        if self._writer is None:  # closed by a finished Trainer.train(); a second train() continues the file
            self._writer = JsonlAppender(self.path)
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
        self._writer.write([clean])
        if self.accelerator is not None and getattr(self.accelerator, "trackers", None):
            numeric = {k: v for k, v in row.items() if isinstance(v, (int, float)) and k != "iteration"}
            self.accelerator.log(numeric, step=int(row.get("iteration", 0)))

    def truncate_after(self, iteration: int) -> None:
        """On resume: drop rows past the checkpoint so history is not duplicated."""
        rows = [r for r in read_jsonl(self.path) if int(r.get("iteration", -1)) <= iteration]
        if self._writer is not None:
            self._writer.close()
        import json

        from visalign.io import atomic_write_text

        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in rows))
        self._writer = JsonlAppender(self.path) if self.enabled else None

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def plot_metrics(run_dir: str | Path, keys: Sequence[str], eval_keys: Sequence[str], out: str | Path) -> Path | None:
    """A PNG with the training reward and the evaluation metrics over iterations."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from visalign.io import atomic_write

    run_dir = Path(run_dir)
    rows = read_jsonl(run_dir / "metrics.jsonl")
    evals = read_jsonl(run_dir / "eval.jsonl")
    if not rows and not evals:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for k in keys:
        pts = [(r["iteration"], r[k]) for r in rows if r.get(k) is not None]
        if pts:
            axes[0].plot(*zip(*pts), label=k)
    axes[0].set_title("training rewards")
    axes[0].set_xlabel("iteration")
    for k in eval_keys:
        pts = [(r["iteration"], r[k]) for r in evals if r.get(k) is not None]
        if pts:
            axes[1].plot(*zip(*pts), marker="o", label=k)
    axes[1].set_title("evaluation (held-out prompts, ODE)")
    axes[1].set_xlabel("iteration")
    for ax in axes:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    path = atomic_write(out, lambda p: fig.savefig(p, format="png", dpi=100))
    plt.close(fig)
    return path
