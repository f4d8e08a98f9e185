"""Calibrating the router: from held-out prompts, the student's confidence and how good each of its
answers was (agreement with the teacher's answer, or a task metric against a reference), fit an
isotonic map confidence -> expected quality and choose the threshold that reaches a target share
of the teacher's quality with the fewest teacher calls.

The rule, exactly (``choose_threshold``; the tests check it against a brute-force search):

- keep the student's answer iff ``confidence >= threshold``; otherwise the teacher answers;
- candidate thresholds: 0 (the student answers everything), the midpoints between consecutive
  distinct confidences, and +inf (the teacher answers everything);
- expected quality at a threshold = mean over prompts of ``iso(confidence)`` where the student
  answers and the teacher's quality where it does not (``iso`` is the isotonic fit, so a noisy
  label does not pick the threshold; the empirical quality is in the curve beside it);
- the chosen threshold is the lowest candidate (fewest teacher calls) whose expected quality is at
  least ``target`` x the teacher's mean quality; +inf always qualifies when ``target <= 1``.
"""

from __future__ import annotations

import math
import os
from dataclasses import MISSING, asdict, dataclass, field, fields

import numpy as np

from distillery.io import atomic_write_json, read_json

FORMAT_VERSION = 1


def fit_isotonic(confidence, quality) -> tuple[np.ndarray, np.ndarray]:
    """The non-decreasing least-squares fit of quality on confidence (scipy's pool-adjacent-violators),
    at each distinct confidence: ``(x, y)``; tied confidences enter once, weighted by their count."""
    from scipy.optimize import isotonic_regression

    c, q = np.asarray(confidence, dtype=float), np.asarray(quality, dtype=float)
    if c.shape != q.shape or c.ndim != 1 or len(c) == 0:
        raise ValueError(f"fit_isotonic: need equal-length non-empty 1-d inputs, got {c.shape} and {q.shape}")
    x, inverse, counts = np.unique(c, return_inverse=True, return_counts=True)
    means = np.bincount(inverse, weights=q) / counts
    return x, isotonic_regression(means, weights=counts.astype(float), increasing=True).x


def predict_isotonic(x: np.ndarray, y: np.ndarray, confidence) -> np.ndarray:
    """The fitted map at any confidence: linear between fitted points, flat beyond them."""
    return np.interp(np.asarray(confidence, dtype=float), x, y)


def choose_threshold(confidence, student_quality, teacher_quality=None, *, target: float = 0.95,
                     isotonic: bool = True) -> dict:
    """The threshold of the module doc and the whole cost-quality curve. ``teacher_quality`` defaults to 1
    per prompt (agreement with the teacher's own answer)."""
    c = np.asarray(confidence, dtype=float)
    sq = np.asarray(student_quality, dtype=float)
    tq = np.ones_like(c) if teacher_quality is None else np.asarray(teacher_quality, dtype=float)
    if not (len(c) == len(sq) == len(tq)) or len(c) == 0:
        raise ValueError(f"choose_threshold: {len(c)} confidences, {len(sq)} student and {len(tq)} teacher "
                         "qualities; need the same non-zero number")
    if not 0 < target:
        raise ValueError(f"choose_threshold: target must be > 0, got {target}")
    x, y = fit_isotonic(c, sq)
    expected = predict_isotonic(x, y, c) if isotonic else sq
    order = np.argsort(c, kind="stable")
    cs, es, ss, ts = c[order], expected[order], sq[order], tq[order]
    n = len(c)
    # Candidate j defers the j' < j lowest distinct confidences: cut[j] = first sorted index kept.
    cut = np.concatenate([[0], np.searchsorted(cs, x[1:], side="left"), [n]])
    thresholds = np.concatenate([[0.0], (x[:-1] + x[1:]) / 2, [math.inf]])
    head_t = np.concatenate([[0.0], np.cumsum(ts)])  # teacher quality of the deferred head
    tail = lambda v: np.concatenate([np.cumsum(v[::-1])[::-1], [0.0]])  # noqa: E731 - student quality kept
    q_expected = (head_t[cut] + tail(es)[cut]) / n
    q_empirical = (head_t[cut] + tail(ss)[cut]) / n
    share = cut / n
    goal = target * tq.mean()
    ok = np.nonzero(q_expected >= goal - 1e-12)[0]
    j = int(ok[0]) if len(ok) else len(thresholds) - 1
    curve = [{"threshold": _finite(t), "teacher_share": float(s), "expected_quality": float(qe),
              "quality": float(qm)} for t, s, qe, qm in zip(thresholds, share, q_expected, q_empirical)]
    return {"threshold": float(thresholds[j]), "teacher_share": float(share[j]),
            "expected_quality": float(q_expected[j]), "quality": float(q_empirical[j]),
            "teacher_quality": float(tq.mean()), "student_quality": float(sq.mean()), "goal": float(goal),
            "curve": curve, "isotonic": {"confidence": x.tolist(), "quality": y.tolist()}}


def _finite(v: float) -> float | None:
    return None if math.isinf(v) else float(v)  # JSON has no infinity: null means "the teacher always"


@dataclass
class Calibration:
    """What ``distillery route calibrate`` writes and the server reads: the threshold, the curve, the
    isotonic map, and the calibration set's confidences and prompt lengths (the drift reference)."""

    score: str
    target: float
    threshold: float
    teacher_share: float
    expected_quality: float
    quality: float
    teacher_quality: float
    student_quality: float
    metric: str
    n: int
    curve: list[dict]
    isotonic: dict
    reference: dict = field(default_factory=dict)  # {"confidence": [...], "prompt_tokens": [...]}
    student: str = ""
    teacher: str = ""
    version: int = FORMAT_VERSION

    @classmethod
    def fit(cls, confidence, student_quality, teacher_quality=None, *, score: str, target: float, metric: str,
            prompt_tokens=None, student: str = "", teacher: str = "") -> Calibration:
        r = choose_threshold(confidence, student_quality, teacher_quality, target=target)
        reference = {"confidence": [float(v) for v in confidence]}
        if prompt_tokens is not None:
            reference["prompt_tokens"] = [float(v) for v in prompt_tokens]
        return cls(score=score, target=target, threshold=r["threshold"], teacher_share=r["teacher_share"],
                   expected_quality=r["expected_quality"], quality=r["quality"], teacher_quality=r["teacher_quality"],
                   student_quality=r["student_quality"], metric=metric, n=len(reference["confidence"]),
                   curve=r["curve"], isotonic=r["isotonic"], reference=reference, student=student, teacher=teacher)

    def to_json(self) -> dict:
        d = asdict(self)
        d["threshold"] = _finite(self.threshold)
        return d

    def save(self, path: str | os.PathLike) -> None:
        atomic_write_json(path, self.to_json())

    @classmethod
    def load(cls, path: str | os.PathLike) -> Calibration:
        d = read_json(path)
        if not isinstance(d, dict) or d.get("version") != FORMAT_VERSION:
            raise ValueError(f"{path}: not a router calibration of format version {FORMAT_VERSION}")
        required = [f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING]
        missing = [n for n in required if n not in d]
        if missing:
            raise ValueError(f"{path}: missing fields {', '.join(missing)}")
        d["threshold"] = math.inf if d["threshold"] is None else float(d["threshold"])
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})
