"""Intervals for evaluation figures: a proportion's Wilson interval, and a paired bootstrap interval of a
mean difference (the same prompts and seeds scored before and after)."""

from __future__ import annotations

import math

import numpy as np


def wilson_interval(successes: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of ``successes / n`` (95% for ``z = 1.96``); ``(0, 1)`` when ``n == 0``."""
    if n <= 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def paired_bootstrap(diff: np.ndarray, *, resamples: int = 2000, level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile interval of ``mean(diff)`` over ``resamples`` resamplings of the pairs (seeded, so the same
    numbers give the same interval)."""
    d = np.asarray(diff, dtype=np.float64)
    if d.size == 0:
        raise ValueError("paired_bootstrap needs at least one pair")
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, d.size, size=(resamples, d.size))].mean(axis=1)
    tail = 100 * (1 - level) / 2
    return float(np.percentile(means, tail)), float(np.percentile(means, 100 - tail))
