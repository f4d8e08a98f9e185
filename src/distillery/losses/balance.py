"""Combining loss terms: static weights, or magnitude balancing (each term rescaled to the size of
a reference term, ModelOpt-style), with every term logged on its own."""

from __future__ import annotations

from collections.abc import Mapping

import torch

BALANCE_MODES = ("static", "magnitude")


class LossBalancer:
    """``total = sum_i w_i * c_i * L_i`` where ``c_i = 1`` (static) or, for ``magnitude``,
    ``c_i = |L_ref| / |L_i|`` computed without gradient, so every term enters at the size of the
    reference term (the task loss when there is one) and ``w_i`` is a pure relative weight.

    The reference term itself is never rescaled. ``__call__`` returns ``(total, logs)``; ``logs`` has
    ``loss/<name>`` (raw value), ``loss/<name>_weighted`` (its contribution) and ``loss/total``.
    """

    def __init__(self, weights: Mapping[str, float], mode: str = "static", reference: str | None = None,
                 eps: float = 1e-12):
        if mode not in BALANCE_MODES:
            raise ValueError(f"balance.mode: unknown {mode!r}; expected one of {', '.join(BALANCE_MODES)}")
        for name, w in weights.items():
            if w < 0:
                raise ValueError(f"balance.weights.{name}: must be >= 0, got {w}")
        if mode == "magnitude" and reference is None:
            raise ValueError("balance.reference: magnitude balancing needs a reference term (e.g. 'ce' or 'kd')")
        self.weights = dict(weights)
        self.mode = mode
        self.reference = reference
        self.eps = eps

    def __call__(self, losses: Mapping[str, torch.Tensor], weights: Mapping[str, float] | None = None
                 ) -> tuple[torch.Tensor, dict[str, float]]:
        """``weights`` overrides the static ones for this step (e.g. from schedules)."""
        w = {**self.weights, **(weights or {})}
        unknown = set(losses) - set(w)
        if unknown:
            raise ValueError(f"balance: no weight for loss term(s) {sorted(unknown)}")
        if self.mode == "magnitude" and self.reference not in losses:
            raise ValueError(f"balance.reference: term {self.reference!r} not among {sorted(losses)}")
        ref = losses[self.reference].detach().abs() if self.mode == "magnitude" else None
        total, logs = None, {}
        for name, value in losses.items():
            scale = 1.0
            if ref is not None and name != self.reference:
                scale = ref / value.detach().abs().clamp_min(self.eps)
            term = w[name] * scale * value
            total = term if total is None else total + term
            logs[f"loss/{name}"] = float(value.detach())
            logs[f"loss/{name}_weighted"] = float(term.detach())
        if total is None:
            raise ValueError("balance: no loss terms")
        logs["loss/total"] = float(total.detach())
        return total, logs
