"""Schedules for loss weights and temperature, as pure functions of the optimizer step.

A :class:`Ramp` holds ``start`` for ``delay`` steps, then goes to ``end`` over ``steps`` steps,
linearly or along a half cosine, and stays there (``constant`` jumps to ``end`` at ``delay``). The curriculum of representation losses is a ramp with a delay:
weight 0 until step N, then the configured weight.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

RAMP_KINDS = ("constant", "linear", "cosine")


@dataclass(frozen=True)
class Ramp:
    start: float
    end: float
    kind: str = "linear"
    steps: int = 0
    delay: int = 0

    def __post_init__(self) -> None:
        if self.kind not in RAMP_KINDS:
            raise ValueError(f"schedule.kind: unknown {self.kind!r}; expected one of {', '.join(RAMP_KINDS)}")
        if self.steps < 0 or self.delay < 0:
            raise ValueError(f"schedule: steps and delay must be >= 0 (got {self.steps}, {self.delay})")

    def __call__(self, step: int) -> float:
        t = step - self.delay
        if t < 0:
            return self.start
        if self.kind == "constant" or self.steps == 0 or t >= self.steps:
            return self.end
        frac = t / self.steps
        if self.kind == "cosine":
            frac = 0.5 * (1.0 - math.cos(math.pi * frac))
        return self.start + (self.end - self.start) * frac


def constant(value: float) -> Ramp:
    return Ramp(value, value, "constant")


def curriculum(weight: float, start_step: int, ramp_steps: int = 0, kind: str = "linear") -> Ramp:
    """A representation loss that is off (0) before ``start_step``, then ramps to ``weight``."""
    return Ramp(0.0, weight, kind if ramp_steps else "constant", ramp_steps, start_step)


def temperature_annealing(start: float, end: float, steps: int, kind: str = "linear", delay: int = 0) -> Ramp:
    """Temperature from ``start`` to ``end`` (both > 0), e.g. a soft 4.0 down to 1.0."""
    if start <= 0 or end <= 0:
        raise ValueError(f"temperature schedule: start and end must be > 0 (got {start}, {end})")
    return Ramp(start, end, kind, steps, delay)
