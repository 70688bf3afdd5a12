"""Per-reward statistics of a scored gallery, the console summary and ``summary.json``."""

from __future__ import annotations

from collections import Counter
from typing import Sequence

import numpy as np

__all__ = ["summarize", "format_summary", "QUANTILES"]

QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)


def _stats(values: list[float]) -> dict:
    if not values:
        return dict(mean=None, std=None, min=None, max=None, quantiles={})
    a = np.asarray(values, dtype=np.float64)
    return dict(
        mean=float(a.mean()),
        std=float(a.std(ddof=1)) if a.size > 1 else 0.0,  # sample std
        min=float(a.min()),
        max=float(a.max()),
        quantiles={f"q{round(q * 100):02d}": float(np.quantile(a, q)) for q in QUANTILES},  # linear interpolation
    )


def summarize(rows: Sequence[dict], rewards: Sequence[str]) -> dict:
    """``{files, scored, failed, failed_by_reason, rewards: {name: {count_valid, count_invalid, mean, std, ...}}}``.

    A file is *scored* when its row has no error; *failed* otherwise (by ``error_reason``).  Reward
    statistics use the valid scores only.
    """
    failed = Counter(r.get("error_reason") or "error" for r in rows if r.get("error"))
    out = dict(files=len(rows), scored=len(rows) - sum(failed.values()), failed=sum(failed.values()),
               failed_by_reason=dict(sorted(failed.items())), rewards={})
    for name in rewards:
        vals = [float(r[name]) for r in rows if r.get(f"{name}.valid") in (True, "true") and r.get(name) is not None]
        out["rewards"][name] = dict(count_valid=len(vals), count_invalid=len(rows) - len(vals), **_stats(vals))
    return out


def format_summary(summary: dict) -> str:
    """A few lines for the terminal."""
    lines = [f"{summary['scored']} scored, {summary['failed']} failed (of {summary['files']} files)"]
    for reason, n in summary["failed_by_reason"].items():
        lines.append(f"  failed: {n} x {reason}")
    for name, s in summary["rewards"].items():
        if s["mean"] is None:
            lines.append(f"  {name}: no valid scores")
        else:
            lines.append(f"  {name}: mean {s['mean']:.4g} std {s['std']:.4g} median {s['quantiles']['q50']:.4g} "
                         f"({s['count_valid']} valid)")
    return "\n".join(lines)
