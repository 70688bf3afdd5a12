"""Small statistics shared by the reward kit and the toy world (numpy only)."""

from __future__ import annotations

from typing import Sequence

import numpy as np

__all__ = ["roc_auc"]


def roc_auc(scores: Sequence[float] | np.ndarray, labels: Sequence[bool] | np.ndarray) -> float:
    """ROC AUC as the Mann-Whitney U statistic: P(score of a positive > score of a negative), ties
    counting one half (Hanley & McNeil 1982).  NaN when one class is empty."""
    from scipy.stats import rankdata

    s, y = np.asarray(scores, np.float64), np.asarray(labels, bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(s)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))
