"""Paired comparisons: two arms run with the same seeds, the mean difference and its t-interval.

A comparison of two configurations is a claim only with paired seeds and a confidence interval;
both the Stage 2 benchmark and the dashboards' overview read their A/B results through this.
"""

from __future__ import annotations

import math


def paired_interval(differences: list[float], confidence: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): the mean of paired differences and its t-interval (NaN bounds below 2 pairs)."""
    from scipy import stats

    n = len(differences)
    mean = sum(differences) / n if n else float("nan")
    if n < 2:
        return mean, float("nan"), float("nan")
    sd = math.sqrt(sum((d - mean) ** 2 for d in differences) / (n - 1))
    half = stats.t.ppf(0.5 + confidence / 2, n - 1) * sd / math.sqrt(n)
    return mean, mean - half, mean + half
