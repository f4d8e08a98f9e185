"""Drift of live router traffic against the calibration set: the population stability index (PSI)
of the student's confidence and of prompt length, in ``/metrics``, with a logged warning when it
crosses the threshold (0.1 is commonly read as a small shift, 0.2 as a real one).

PSI = sum over bins of (live share - reference share) * ln(live share / reference share), with the
bins at the reference's quantiles, so each holds about the same share of the calibration set.
"""

from __future__ import annotations

import logging
from collections import deque

import numpy as np

log = logging.getLogger(__name__)

EPS = 1e-4  # an empty bin counts as this share, so one empty bin does not make the PSI infinite


def psi(reference, live, bins: int = 10) -> float:
    ref, cur = np.asarray(reference, dtype=float), np.asarray(live, dtype=float)
    if len(ref) == 0 or len(cur) == 0:
        raise ValueError(f"psi: need values on both sides, got {len(ref)} reference and {len(cur)} live")
    inner = np.unique(np.quantile(ref, np.linspace(0, 1, bins + 1)[1:-1]))
    e = np.bincount(np.searchsorted(inner, ref, side="right"), minlength=len(inner) + 1) / len(ref)
    a = np.bincount(np.searchsorted(inner, cur, side="right"), minlength=len(inner) + 1) / len(cur)
    e, a = np.maximum(e, EPS), np.maximum(a, EPS)
    return float(np.sum((a - e) * np.log(a / e)))


class DriftMonitor:
    """Keeps the last ``window`` live values of each signal; after ``min_samples`` it recomputes the
    PSI every ``every`` observations, sets the gauge, and warns once per crossing of ``warn_at``."""

    def __init__(self, reference: dict[str, list[float]], *, window: int = 500, min_samples: int = 50,
                 bins: int = 10, warn_at: float = 0.2, every: int = 10, gauge=None, warnings=None):
        self.reference = {k: np.asarray(v, dtype=float) for k, v in reference.items() if len(v)}
        self.live = {k: deque(maxlen=window) for k in self.reference}
        self.min_samples, self.bins, self.warn_at, self.every = min_samples, bins, warn_at, every
        self.gauge, self.warnings = gauge, warnings
        self.values: dict[str, float] = {}
        self._above: set[str] = set()
        self._seen = 0

    def observe(self, **values: float) -> None:
        for k, v in values.items():
            if k in self.live and v is not None:
                self.live[k].append(float(v))
        self._seen += 1
        if self._seen % self.every == 0:
            self.update()

    def update(self) -> dict[str, float]:
        for k, ref in self.reference.items():
            if len(self.live[k]) < self.min_samples:
                continue
            value = psi(ref, list(self.live[k]), self.bins)
            self.values[k] = value
            if self.gauge is not None:
                self.gauge.labels(k).set(value)
            if value > self.warn_at and k not in self._above:
                self._above.add(k)
                log.warning("drift: PSI of %s is %.3f over the last %d router queries (warning at %.2f): live "
                            "traffic no longer looks like the calibration set; recalibrate the router",
                            k, value, len(self.live[k]), self.warn_at)
                if self.warnings is not None:
                    self.warnings.labels(k).inc()
            elif value <= self.warn_at:
                self._above.discard(k)
        return self.values
