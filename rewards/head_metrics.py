"""Held-out measures of a reward head and its calibration plot (docs/reward_training.md).

- ``binary``: ROC AUC (the Mann-Whitney U statistic, Hanley & McNeil 1982), accuracy at 0.5, Brier
  score, negative log-likelihood, expected calibration error (ECE: the count-weighted mean of
  ``|mean predicted - observed frequency|`` over 10 equal-width bins of the predicted probability,
  Naeini et al. 2015).
- ``pairwise``: pair accuracy (ties left out), the Bradley-Terry negative log-likelihood, and the
  ECE of the predicted preference probability ``sigmoid(r_a - r_b)`` with each pair's order drawn
  at random (so both outcomes occur).
- ``rating``: Spearman and Pearson correlations, RMSE in the ratings' units.
- every task: ``uncertainty_mean`` and ``error_detection_auc``, the ROC AUC of the ensemble spread
  as a detector of the head's mistakes (a wrong binary or pair call; for ratings an absolute
  error above its median); 0.5 means the spread says nothing about where the head is wrong.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from visalign.stats import roc_auc

__all__ = ["roc_auc", "ece", "binary_metrics", "pairwise_metrics", "rating_metrics", "calibration_plot"]


def _bins(p: np.ndarray, y: np.ndarray, n_bins: int = 10):
    edges = np.linspace(0, 1, n_bins + 1)
    which = np.clip(np.digitize(p, edges[1:-1]), 0, n_bins - 1)
    rows = []
    for b in range(n_bins):
        m = which == b
        if m.any():
            rows.append((float(p[m].mean()), float(y[m].mean()), int(m.sum())))
    return rows


def ece(p: np.ndarray, y: np.ndarray, n_bins: int = 10) -> float:
    """Expected calibration error of probabilities ``p`` against outcomes ``y`` in [0, 1]."""
    rows = _bins(np.asarray(p, float), np.asarray(y, float), n_bins)
    n = sum(c for _, _, c in rows)
    return float(sum(c * abs(mp - fy) for mp, fy, c in rows) / max(n, 1))


def binary_metrics(p: np.ndarray, y: np.ndarray, unc: np.ndarray) -> dict:
    p, y = np.asarray(p, float), np.asarray(y, float) > 0.5
    wrong = (p > 0.5) != y
    eps = 1e-7
    return {
        "n": int(len(p)), "positive_rate": float(y.mean()), "roc_auc": roc_auc(p, y),
        "accuracy": float((~wrong).mean()), "brier": float(((p - y) ** 2).mean()),
        "nll": float(-(y * np.log(p + eps) + (~y) * np.log(1 - p + eps)).mean()), "ece": ece(p, y),
        "uncertainty_mean": float(np.mean(unc)), "error_detection_auc": roc_auc(unc, wrong),
    }


def pairwise_metrics(delta: np.ndarray, label: np.ndarray, unc: np.ndarray, flip: np.ndarray) -> dict:
    """``delta = r(first) - r(second)``; ``label`` = P(first preferred); ``unc`` the pair's
    uncertainty (e.g. the std of the members' deltas); ``flip`` random booleans for the ECE."""
    delta, label = np.asarray(delta, float), np.asarray(label, float)
    decided = label != 0.5
    correct = (delta > 0) == (label > 0.5)
    p = 1 / (1 + np.exp(-delta))
    eps = 1e-7
    p_o = np.where(flip, 1 - p, p)
    y_o = np.where(flip, 1 - label, label)
    return {
        "n": int(len(delta)), "ties": int((~decided).sum()),
        "pair_accuracy": float(correct[decided].mean()) if decided.any() else float("nan"),
        "bt_nll": float(-(label * np.log(p + eps) + (1 - label) * np.log(1 - p + eps)).mean()),
        "ece": ece(p_o, y_o), "uncertainty_mean": float(np.mean(unc)),
        "error_detection_auc": roc_auc(unc[decided], ~correct[decided]) if decided.any() else float("nan"),
    }


def rating_metrics(pred: np.ndarray, y: np.ndarray, unc: np.ndarray) -> dict:
    from scipy.stats import pearsonr, spearmanr

    pred, y = np.asarray(pred, float), np.asarray(y, float)
    err = np.abs(pred - y)
    flat = pred.std() == 0 or y.std() == 0
    return {
        "n": int(len(pred)), "spearman": float("nan") if flat else float(spearmanr(pred, y).statistic),
        "pearson": float("nan") if flat else float(pearsonr(pred, y).statistic),
        "rmse": float(np.sqrt(((pred - y) ** 2).mean())), "uncertainty_mean": float(np.mean(unc)),
        "error_detection_auc": roc_auc(unc, err > np.median(err)),
    }


def calibration_plot(path: str | Path, task: str, pred: np.ndarray, outcome: np.ndarray, unc: np.ndarray,
                     wrong: np.ndarray, title: str = "") -> Path:
    """Write the calibration plot (PNG, atomically).

    Left: for ``binary`` / ``pairwise`` a reliability diagram (mean predicted probability against
    the observed frequency per bin, the diagonal is perfect calibration, bar heights the bin
    counts); for ``rating`` predicted against actual ratings (binned means; the diagonal is
    perfect).  Right: how often the head is wrong (``rating``: absolute error) per quintile of the
    ensemble's uncertainty; a rising line means the uncertainty flags the head's mistakes.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from visalign.io import atomic_write

    pred, outcome, unc, wrong = (np.asarray(a, float) for a in (pred, outcome, unc, wrong))
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10, 4.2))
    if task == "rating":
        order = np.argsort(pred)
        chunks = np.array_split(order, min(10, max(1, len(pred))))
        xs = [pred[c].mean() for c in chunks if len(c)]
        ys = [outcome[c].mean() for c in chunks if len(c)]
        ax.scatter(pred, outcome, s=6, alpha=0.3, color="tab:gray", label="held-out samples")
        ax.plot(xs, ys, "o-", color="tab:blue", label="binned mean")
        lo, hi = float(min(pred.min(), outcome.min())), float(max(pred.max(), outcome.max()))
        ax.plot([lo, hi], [lo, hi], "--", color="k", lw=1, label="perfect")
        ax.set_xlabel("predicted rating")
        ax.set_ylabel("actual rating")
    else:
        rows = _bins(pred, outcome)
        counts = np.zeros(10)
        for mp, _, c in rows:
            counts[min(int(mp * 10), 9)] += c
        ax_c = ax.twinx()
        ax_c.bar([(i + 0.5) / 10 for i in range(10)], counts, width=0.09, color="tab:gray", alpha=0.25)
        ax_c.set_ylabel("samples per bin", color="tab:gray")
        ax.plot([r[0] for r in rows], [r[1] for r in rows], "o-", color="tab:blue", label="head", zorder=3)
        ax.plot([0, 1], [0, 1], "--", color="k", lw=1, label="perfect calibration")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("predicted probability" + (" (pair order drawn at random)" if task == "pairwise" else ""))
        ax.set_ylabel("observed frequency")
        ax.set_zorder(ax_c.get_zorder() + 1)
        ax.patch.set_visible(False)
    ax.legend(loc="upper left", fontsize=8)
    ax.set_title(f"{task}: calibration" + (f" ({title})" if title else ""), fontsize=10)
    order = np.argsort(unc, kind="stable")
    chunks = [c for c in np.array_split(order, 5) if len(c)]
    ax2.plot([unc[c].mean() for c in chunks], [wrong[c].mean() for c in chunks], "o-", color="tab:red")
    ax2.set_xlabel("ensemble uncertainty (quintile mean)")
    ax2.set_ylabel("absolute error" if task == "rating" else "error rate")
    ax2.set_title("does the uncertainty flag mistakes?", fontsize=10)
    fig.tight_layout()
    out = atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=100))
    plt.close(fig)
    return out
