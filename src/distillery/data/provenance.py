"""The generate stage's output on disk, and its dataset card.

``data/`` layout (format version 1):

- ``shards/records-NNNNN.jsonl``  every record, kept or not, with full provenance: ``id``,
  ``prompt_id``, ``prompt`` (as sent), ``raw_prompt``, ``response``, ``teacher`` (id, fingerprint,
  backend), ``decoding``, ``seed``, ``sample``, ``scores``, ``decisions``, ``dropped_by``, ``kept``,
  ``stage``, ``split``, ``correct`` (checkable tasks), ``generated_at``.
- ``train.jsonl`` / ``valid.jsonl``  kept ``seed`` + ``pool`` records as ``{id, prompt, response}``:
  a ``jsonl`` data source for sequence-level KD (cross-entropy on the teacher's responses).
- ``seed.jsonl``, ``pool.jsonl``  the staged sets; ``review.jsonl`` the lowest-confidence kept
  records with ``verdict: null`` for a person to set to accept/reject and import via
  ``generate.curate.review_file``.
- ``provenance.json``  dataset-level: teacher, settings, counts, PII counts, timings.
- ``card.md``  the dataset card: counts per filter, score histograms, confidence vs correctness.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from distillery.io import atomic_write_json, atomic_write_text

FORMAT_VERSION = 1
SHARD_SIZE = 10_000


def _jsonl(rows) -> str:
    return "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows)


def write_dataset(data_dir: Path, records: list[dict], meta: dict) -> dict:
    """Write every file of the layout above; returns ``{name: path}``."""
    data_dir = Path(data_dir)
    files = {}
    for i in range(0, max(len(records), 1), SHARD_SIZE):
        p = atomic_write_text(data_dir / "shards" / f"records-{i // SHARD_SIZE:05d}.jsonl",
                              _jsonl(records[i:i + SHARD_SIZE]))
        files[p.name] = p
    train_rows = [r for r in records if r["kept"] and r["stage"] in ("seed", "pool")]
    for split in ("train", "valid"):
        rows = [{"id": r["id"], "prompt": r["prompt"], "response": r["response"]}
                for r in train_rows if r["split"] == split]
        files[split] = atomic_write_text(data_dir / f"{split}.jsonl", _jsonl(rows))
    for st in ("seed", "pool"):
        files[st] = atomic_write_text(data_dir / f"{st}.jsonl", _jsonl(r for r in records if r["stage"] == st))
    review = [{"id": r["id"], "prompt": r["raw_prompt"], "response": r["response"], "scores": r["scores"],
               "verdict": None} for r in records if r["stage"] == "review"]
    files["review"] = atomic_write_text(data_dir / "review.jsonl", _jsonl(review))
    files["provenance"] = atomic_write_json(data_dir / "provenance.json", {"format_version": FORMAT_VERSION, **meta})
    files["card"] = atomic_write_text(data_dir / "card.md", dataset_card(records, meta))
    return files


def read_records(data_dir: Path) -> list[dict]:
    rows = []
    for shard in sorted((Path(data_dir) / "shards").glob("records-*.jsonl")):
        rows += [json.loads(line) for line in shard.read_text("utf-8").splitlines() if line.strip()]
    return rows


# ---------------------------------------------------------------- the card


def histogram(values: list[float], bins: int = 10, width: int = 30) -> str:
    xs = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    if not xs:
        return "(no values)"
    lo, hi = min(xs), max(xs)
    step = (hi - lo) / bins or 1.0
    counts = [0] * bins
    for x in xs:
        counts[min(int((x - lo) / step), bins - 1)] += 1
    top = max(counts)
    return "\n".join(f"{lo + i * step:9.3f} .. {lo + (i + 1) * step:9.3f} | {'#' * round(width * c / top):<{width}} {c}"
                     for i, c in enumerate(counts))


def dataset_card(records: list[dict], meta: dict) -> str:
    counts = meta.get("curation", {})
    lines = [f"# Dataset card: {meta.get('name', 'teacher data')}", "",
             f"- teacher: `{meta['teacher']['id']}` (fingerprint `{meta['teacher']['fingerprint'][:16]}`, "
             f"backend {meta['teacher']['backend']})",
             f"- prompts: {meta['prompts']} from `{meta['prompt_source']}`; records: {len(records)}; "
             f"kept: {sum(r['kept'] for r in records)}",
             f"- decoding: " + "; ".join(f"{d['name']} ({d['prompts']} prompts x n={d['n']})" for d in meta["decoding"]),
             f"- seed: {meta['seed']}; format version {FORMAT_VERSION}", "",
             "## Filters", "", "| filter | failed | dropped (first reason) |", "|---|---:|---:|"]
    names = list(dict.fromkeys([*counts.get("failed", {}), *counts.get("dropped_by", {})]))
    lines += [f"| {n} | {counts.get('failed', {}).get(n, 0)} | {counts.get('dropped_by', {}).get(n, 0)} |"
              for n in names] or ["| (none failed) | 0 | 0 |"]
    stages = {s: sum(r["stage"] == s for r in records) for s in ("seed", "pool", "review")}
    splits = {s: sum(r["kept"] and r["stage"] in ("seed", "pool") and r["split"] == s for r in records)
              for s in ("train", "valid")}
    lines += ["", f"Stages: {stages}. Splits (seed + pool): {splits}.", ""]
    pii = meta.get("pii", {})
    lines += ["## PII scrubbing", "", f"Enabled: {pii.get('enabled')}; replaced in prompts: "
              f"{pii.get('prompts', {})}; in responses: {pii.get('responses', {})}.", ""]
    acc = meta.get("confidence_accuracy")
    if acc:
        lines += ["## Confidence vs correctness (checkable tasks)", "",
                  "| | records | correct | accuracy |", "|---|---:|---:|---:|",
                  f"| kept by the confidence filters | {acc['kept_n']} | {acc['kept_correct']} | {acc['kept_accuracy']:.3f} |",
                  f"| dropped by them | {acc['dropped_n']} | {acc['dropped_correct']} | {acc['dropped_accuracy']:.3f} |",
                  f"| all | {acc['kept_n'] + acc['dropped_n']} | {acc['kept_correct'] + acc['dropped_correct']} "
                  f"| {acc['all_accuracy']:.3f} |", ""]
    lines += ["## Score histograms", ""]
    score_names = sorted({k for r in records for k in r["scores"]})
    for name in score_names:
        lines += [f"### {name}", "", "```", histogram([r["scores"].get(name) for r in records]), "```", ""]
    return "\n".join(lines)
