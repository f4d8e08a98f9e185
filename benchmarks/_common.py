"""Shared by every benchmark: machine info and the results JSON (benchmarks/results/NAME.json)."""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

from distillery.evaluate.speed import machine_info
from distillery.io import atomic_write_json

RESULTS = Path(__file__).resolve().parent / "results"


def spread(values: list[float]) -> dict:
    """median, min, max of repeated measurements."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def write_results(name: str, metrics: dict, config: dict) -> Path:
    return atomic_write_json(RESULTS / f"{name}.json", {"machine": machine_info(), "metrics": metrics, "config": config})


def print_table(rows: list[tuple], header: tuple) -> None:
    cols = [header, *[tuple(str(c) for c in r) for r in rows]]
    widths = [max(len(r[i]) for r in cols) for i in range(len(header))]
    for j, r in enumerate(cols):
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)))
        if j == 0:
            print("  ".join("-" * w for w in widths))


# The exit status of a benchmark this machine cannot run (no GPU, an opt-in model not installed):
# `make bench` reports it as skipped instead of failed.
CANNOT_RUN_HERE = 3


def cannot_run_here(reason: str) -> None:
    print(f"skipped: {reason}", file=sys.stderr)
    raise SystemExit(CANNOT_RUN_HERE)


def gpu_args(name: str, doc: str) -> argparse.Namespace:
    """A GPU benchmark's arguments (``--quick``), or a clear exit where there is no CUDA device."""
    ap = argparse.ArgumentParser(description=doc.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        cannot_run_here(f"{name}: no CUDA device here; run it on a GPU machine")
    return args
