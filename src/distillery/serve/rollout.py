"""Staged rollout: a share of router traffic uses a candidate student beside the current one; when
the candidate's live confidence, error rate or latency regresses past the gate, all traffic returns
to the current student at once. The decision is written to disk (atomically) before it takes
effect, so a restarted server keeps it; it is logged and counted in ``/metrics``."""

from __future__ import annotations

import logging
import random
import statistics
import time
from collections import deque
from pathlib import Path

from distillery.io import atomic_write_json, read_json
from distillery.serve.config import RolloutConfig

log = logging.getLogger(__name__)


class Arm:
    """Recent outcomes of one arm: confidence and latency of answered queries, and failures."""

    def __init__(self, window: int):
        self.confidence: deque[float] = deque(maxlen=window)
        self.latency: deque[float] = deque(maxlen=window)
        self.errors: deque[bool] = deque(maxlen=window)

    def summary(self) -> dict:
        return {"n": len(self.errors),
                "mean_confidence": statistics.fmean(self.confidence) if self.confidence else None,
                "median_latency_s": statistics.median(self.latency) if self.latency else None,
                "error_rate": sum(self.errors) / len(self.errors) if self.errors else None}


class Rollout:
    def __init__(self, cfg: RolloutConfig, current: str, *, metrics=None):
        self.cfg, self.current, self.metrics = cfg, current, metrics
        self.rng = random.Random(cfg.seed)
        self.arms = {"current": Arm(cfg.gate.window), "candidate": Arm(cfg.gate.window)}
        self.state = self._load()
        self._gauge()

    # ------------------------------------------------------------ state on disk

    def _load(self) -> dict:
        path = Path(self.cfg.state)
        fresh = {"candidate": self.cfg.candidate, "current": self.current, "share": self.cfg.share,
                 "status": "active", "events": []}
        if not path.exists():
            fresh["events"].append(self._event("start"))
            atomic_write_json(path, fresh)
            return fresh
        state = read_json(path)
        if state.get("candidate") != self.cfg.candidate or state.get("current") != self.current:
            # Another rollout (a new candidate): start it, keeping the history of the old one.
            fresh["events"] = [*state.get("events", []), self._event("start")]
            atomic_write_json(path, fresh)
            return fresh
        return state

    def _event(self, kind: str, **details) -> dict:
        return {"time": time.time(), "event": kind, "candidate": self.cfg.candidate, **details}

    def _gauge(self) -> None:
        if self.metrics is not None:
            self.metrics.rollout_share.labels(self.cfg.candidate).set(self.share)

    # ------------------------------------------------------------ routing

    @property
    def active(self) -> bool:
        return self.state["status"] == "active"

    @property
    def share(self) -> float:
        return float(self.state["share"]) if self.active else 0.0

    def pick(self) -> str:
        return "candidate" if self.active and self.rng.random() < self.share else "current"

    def record(self, arm: str, *, confidence: float | None = None, error: bool = False,
               latency_s: float | None = None) -> None:
        a = self.arms[arm]
        a.errors.append(error)
        if confidence is not None:
            a.confidence.append(confidence)
        if latency_s is not None and not error:
            a.latency.append(latency_s)
        if arm == "candidate" and self.active:
            found = self.regression()
            if found:
                self.roll_back(*found)

    def regression(self) -> tuple[str, str] | None:
        """(what, why) the candidate fails the gate on (error_rate, confidence, latency), or None while it
        passes or has too few queries to judge."""
        g, cand, cur = self.cfg.gate, self.arms["candidate"].summary(), self.arms["current"].summary()
        if cand["n"] < g.min_requests:
            return None
        if cand["error_rate"] > g.max_error_rate:
            return "error_rate", f"error rate {cand['error_rate']:.3f} > {g.max_error_rate}"
        if cur["mean_confidence"] is not None and cand["mean_confidence"] is not None and \
                cur["mean_confidence"] - cand["mean_confidence"] > g.max_confidence_drop:
            return "confidence", (f"mean confidence {cand['mean_confidence']:.3f} is more than "
                                  f"{g.max_confidence_drop} below the current student's {cur['mean_confidence']:.3f}")
        if cur["median_latency_s"] and cand["median_latency_s"] is not None and \
                cand["median_latency_s"] > g.max_latency_ratio * cur["median_latency_s"]:
            return "latency", (f"median latency {cand['median_latency_s']:.3f}s is more than "
                               f"{g.max_latency_ratio}x the current student's {cur['median_latency_s']:.3f}s")
        return None

    def roll_back(self, what: str, reason: str) -> None:
        self.state = {**self.state, "status": "rolled_back",
                      "events": [*self.state["events"], self._event("rollback", gate=what, reason=reason,
                                                                     candidate_stats=self.arms["candidate"].summary(),
                                                                     current_stats=self.arms["current"].summary())]}
        atomic_write_json(self.cfg.state, self.state)  # on disk before it takes effect
        log.warning("rollout: candidate %s rolled back, all traffic to %s: %s", self.cfg.candidate, self.current,
                    reason)
        if self.metrics is not None:
            self.metrics.rollbacks.labels(self.cfg.candidate, what).inc()
        self._gauge()

    def describe(self) -> dict:
        return {**{k: v for k, v in self.state.items() if k != "events"}, "share": self.share,
                "arms": {k: a.summary() for k, a in self.arms.items()}, "events": self.state["events"][-5:]}
