"""The files of a run folder the report reads, by name; each section of the page appears only when
its file exists. Shapes are documented in docs/evaluation.md ("Files the report reads")."""

from __future__ import annotations

import json
from pathlib import Path

# key -> path inside the run folder
FILES = {
    "recipe": "recipe.yaml",
    "manifest": "manifest.json",
    "train": "train.jsonl",
    "summary": "eval/summary.json",
    "slices": "eval/slices.json",
    "generations": "eval/generations.json",
    "tasks": "eval/tasks.json",
    "calibration": "eval/calibration.json",
    "speed": "eval/speed.json",
    "paired": "eval/paired.json",
    "sequence": "eval/sequence.json",
    "robustness": "eval/robustness.json",
    "review": "eval/review.json",
    "gate": "gate.json",
    "router": "router.json",
    "card": "data/card.md",
    "mixture": "data/mixture.json",
}
# lm-eval results as evaluate/lmeval.write_lmeval stores them: eval/<variant>/lmeval_<task>.json
LMEVAL_GLOB = "eval/*/lmeval_*.json"


class ReportError(ValueError):
    """A run file the report cannot read; the message names the file (and the field where known)."""


def _read(path: Path):
    if path.suffix == ".json":
        try:
            return json.loads(path.read_text("utf-8"))
        except json.JSONDecodeError as e:
            raise ReportError(f"{path}: not valid JSON ({e.msg}, line {e.lineno})") from None
    if path.suffix == ".jsonl":
        from distillery.data.sources import DataError, jsonl_rows  # here: data.sources imports torch

        try:  # a run killed while writing a line leaves it half written: stop there, as resume does
            return [row for _, row in jsonl_rows(path, torn_tail=True)]
        except DataError as e:
            raise ReportError(str(e)) from None
    return path.read_text("utf-8")


def load_inputs(run: Path) -> dict:
    """``{key: content}`` for every file of :data:`FILES` present in ``run`` (JSON parsed, JSONL as a
    list of records, text as text), plus ``lmeval: {variant: {task: result}}`` when there are any."""
    out = {}
    for key, rel in FILES.items():
        path = run / rel
        if path.is_file():
            out[key] = _read(path)
    lmeval: dict = {}
    for path in sorted(run.glob(LMEVAL_GLOB)):
        lmeval.setdefault(path.parent.name, {})[path.stem.removeprefix("lmeval_")] = _read(path)
    if lmeval:
        out["lmeval"] = lmeval
    return out
