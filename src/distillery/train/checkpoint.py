"""Resumable training state: model, optimizer, scheduler, RNG states and the step (the data cursor
is a function of the step, so nothing else is needed to continue the same loss sequence)."""

from __future__ import annotations

import os
import random
import re
from pathlib import Path

import numpy as np
import torch

from distillery.io import atomic_path

_NAME = re.compile(r"^step-(\d+)\.pt$")


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(folder: Path, step: int, state: dict, keep: int) -> Path:
    """Write ``step-N.pt`` atomically, then drop all but the newest ``keep``. Streamed into the
    temporary file: serialising into memory first held a copy of the whole checkpoint (~1 GB for the
    quickstart's student and its AdamW state) on top of the training state, which made the last step
    the run's peak of resident memory (benchmarks/vs_trl.py); streamed, it costs a few MiB."""
    path = folder / f"step-{step:06d}.pt"
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save({"step": step, **state, "rng": rng_state()}, f)
        f.flush()
        os.fsync(f.fileno())
    for old in list_checkpoints(folder)[:-keep]:
        old.unlink(missing_ok=True)
    return path


def list_checkpoints(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


class CheckpointError(RuntimeError):
    """Checkpoints exist but none can be read: starting over would silently throw away their steps."""


def load_latest(folder: Path, log=print) -> dict | None:
    """The newest readable checkpoint; a torn or corrupt file is skipped, loudly, for an older one. None
    when there are no checkpoints; :class:`CheckpointError` when there are some and none is readable."""
    bad = []
    for path in reversed(list_checkpoints(folder)):
        try:
            state = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as e:  # noqa: BLE001 - any unreadable checkpoint: fall back to an older one
            bad.append(f"{path.name} ({type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else 'unreadable'})")
            continue
        if bad:
            log(f"distill: skipped unreadable checkpoint(s) {', '.join(bad)}; resuming from {path.name}")
        return state
    if bad:
        raise CheckpointError(f"{folder}: no checkpoint can be read ({'; '.join(bad)}); run again with --force to "
                              "start from step 0, or restore a checkpoint")
    return None
