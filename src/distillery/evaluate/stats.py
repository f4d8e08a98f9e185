"""Uncertainty of a metric and paired comparisons of two variants scored on the same examples.

- :func:`bootstrap_ci`: percentile bootstrap interval of a mean. Resamples are drawn exactly as
  ``scipy.stats.bootstrap`` draws them (``rng.integers(0, n, (B, n))`` from ``default_rng(seed)``),
  so the same seed gives scipy's interval.
- :func:`paired_bootstrap`: the same indices resample both variants, so the interval is of the
  *difference* ``mean(a - b)`` and example difficulty cancels. Two-sided p-value by shifting the
  bootstrap distribution to the null (Efron & Tibshirani 1993, section 16.4):
  ``p = (1 + #{|d*_i - d| >= |d|}) / (B + 1)``.
- :func:`mcnemar`: the exact test for paired 0/1 outcomes. Only discordant pairs carry
  information: with ``b`` = a right and b wrong, ``c`` = a wrong and b right, under the null each
  discordant pair is a fair coin, so ``p = min(1, 2 * P[Binom(b + c, 1/2) <= min(b, c)])``.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import binom


def _vector(x, name: str) -> np.ndarray:
    v = np.asarray(x, dtype=np.float64).reshape(-1)
    if v.size == 0:
        raise ValueError(f"stats: {name} is empty")
    if np.isnan(v).any():
        raise ValueError(f"stats: {name} contains NaN")
    return v


def _percentile_interval(boots: np.ndarray, confidence: float) -> tuple[float, float]:
    if not 0 < confidence < 1:
        raise ValueError(f"stats: confidence must be in (0, 1), got {confidence}")
    alpha = (1 - confidence) / 2
    low, high = np.quantile(boots, [alpha, 1 - alpha])
    return float(low), float(high)


def _resample_indices(n: int, n_resamples: int, seed: int) -> np.ndarray:
    if n_resamples < 1:
        raise ValueError(f"stats: n_resamples must be at least 1, got {n_resamples}")
    return np.random.default_rng(seed).integers(0, n, (n_resamples, n))


def bootstrap_ci(values, *, n_resamples: int = 1000, confidence: float = 0.95, seed: int = 0) -> dict:
    """``{"value": mean, "low", "high", "n"}``: the mean of ``values`` and its percentile interval."""
    v = _vector(values, "values")
    boots = v[_resample_indices(v.size, n_resamples, seed)].mean(axis=1)
    low, high = _percentile_interval(boots, confidence)
    return {"value": float(v.mean()), "low": low, "high": high, "n": int(v.size)}


def paired_bootstrap(a, b, *, n_resamples: int = 1000, confidence: float = 0.95, seed: int = 0) -> dict:
    """``{"difference": mean(a - b), "low", "high", "p_value", "n"}`` for per-example scores of two
    variants on the same examples, in the same order."""
    va, vb = _vector(a, "a"), _vector(b, "b")
    if va.shape != vb.shape:
        raise ValueError(f"stats: paired samples differ in length ({va.size} and {vb.size})")
    d = va - vb
    observed = float(d.mean())
    boots = d[_resample_indices(d.size, n_resamples, seed)].mean(axis=1)
    low, high = _percentile_interval(boots, confidence)
    extreme = np.count_nonzero(np.abs(boots - observed) >= abs(observed) - 1e-12)
    p = (1 + extreme) / (1 + n_resamples)
    return {"difference": observed, "low": low, "high": high, "p_value": float(min(p, 1.0)), "n": int(d.size)}


def mcnemar(a_correct, b_correct) -> dict:
    """Exact McNemar test of two variants' 0/1 correctness on the same examples.

    ``{"b": a right & b wrong, "c": a wrong & b right, "difference": acc(a) - acc(b), "p_value", "n"}``."""
    ra, rb = _vector(a_correct, "a_correct"), _vector(b_correct, "b_correct")
    if ra.shape != rb.shape:
        raise ValueError(f"stats: paired samples differ in length ({ra.size} and {rb.size})")
    if not (np.isin(ra, (0, 1)).all() and np.isin(rb, (0, 1)).all()):
        raise ValueError("stats: McNemar's test needs 0/1 correctness values")
    b = int(np.count_nonzero((ra == 1) & (rb == 0)))
    c = int(np.count_nonzero((ra == 0) & (rb == 1)))
    p = 1.0 if b + c == 0 else min(1.0, 2 * float(binom.cdf(min(b, c), b + c, 0.5)))
    return {"b": b, "c": c, "difference": (b - c) / ra.size, "p_value": p, "n": int(ra.size)}
