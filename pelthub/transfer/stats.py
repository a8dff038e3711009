"""Small statistics for the transfer study: means with confidence intervals, AUC, Spearman ρ.

The study's cells are not independent draws of one population (a target's seeds share its
data), so intervals are reported over the smallest independent-enough unit the caller
chooses (per (target, seed) cell, sources of a group averaged first) and read as a guide.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np


def mean_ci(values: Sequence[float], level: float = 0.95) -> tuple[float, float, int]:
    """(mean, half-width of the Student-t interval, n) of the finite values; NaN half-width for n < 2."""
    x = np.asarray([v for v in values if np.isfinite(v)], dtype=float)
    if len(x) == 0:
        return math.nan, math.nan, 0
    if len(x) < 2:
        return float(x.mean()), math.nan, 1
    from scipy.stats import t  # scipy loads in ~0.5 s: only when a study is summarised
    return float(x.mean()), float(t.ppf(0.5 + level / 2, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x))), len(x)


def auc(positive: Sequence[float], negative: Sequence[float]) -> float:
    """P(score of a positive > score of a negative), ties counting 1/2 (Mann-Whitney); NaN if a side is empty."""
    pos, neg = np.asarray(positive, dtype=float), np.asarray(negative, dtype=float)
    if len(pos) == 0 or len(neg) == 0:
        return math.nan
    diff = pos[:, None] - neg[None, :]
    return float(((diff > 0) + 0.5 * (diff == 0)).mean())


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman ρ; NaN with fewer than 3 points or a constant side."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return math.nan
    from scipy.stats import spearmanr
    return float(spearmanr(x, y)[0])


def fmt_ci(mean: float, half: float, scale: float = 1.0, digits: int = 3, signed: bool = False) -> str:
    """'0.654 ± 0.033' (or '+0.098 ± 0.089'); '—' for NaN."""
    if not math.isfinite(mean):
        return "—"
    sign = "+" if signed else ""
    text = f"{mean * scale:{sign}.{digits}f}"
    return text + (f" ± {half * scale:.{digits}f}" if math.isfinite(half) else "")
