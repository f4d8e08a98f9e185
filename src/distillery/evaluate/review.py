"""Human review: paired samples of two variants exported for rating, and the ratings read back as a metric.

Export writes three files into a folder:

- ``review.csv`` and ``review.jsonl``, the same rows for raters: ``id, prompt, response_a,
  response_b, rating, rater, comment``. Which variant is A is drawn per item (seeded), so a rater
  cannot learn a side; ``rating`` is to be filled with ``A``, ``B`` or ``tie``;
- ``review_key.json``, kept from raters: ``{"variants": [first, second], "seed", "key": {id:
  {"A": variant, "B": variant}}}``.

Import reads a filled CSV or JSONL (any number of rows per item, e.g. one per rater; rows with an
empty rating are counted as unrated and skipped) and scores the *subject* variant per rating: 1 for
a win, 0.5 for a tie, 0 for a loss. An item's score is the mean of its ratings, and the win rate is
the mean over items with a percentile bootstrap interval over items (``stats.bootstrap_ci``), so
an item rated by many raters does not count as many independent items.
"""

from __future__ import annotations

import csv
import io
import json
import math
import random
from collections.abc import Sequence
from pathlib import Path

from distillery.evaluate.stats import bootstrap_ci
from distillery.io import atomic_write_json, atomic_write_text, read_json

COLUMNS = ("id", "prompt", "response_a", "response_b", "rating", "rater", "comment")
RATINGS = {"a": "A", "b": "B", "tie": "tie"}


class ReviewError(ValueError):
    """A review file that cannot be used; the message names the file, line and field."""


def generate_pairs(prompts: Sequence[str | dict], models: dict, *, max_new_tokens: int = 64, chat: bool = True,
                   batch_size: int = 8) -> list[dict]:
    """Greedy responses of two (or more) variants to the same prompts: ``{"id", "prompt", <variant>:
    response, ...}``. ``models`` maps a variant name to ``(model, tokenizer)``; prompts are strings
    or ``{"id", "prompt"}``."""
    from distillery.data.prompts import Prompt, render
    from distillery.evaluate.tasks import greedy_responses

    rows = [{"id": str(i), "prompt": p} if isinstance(p, str) else {"id": str(p["id"]), "prompt": p["prompt"]}
            for i, p in enumerate(prompts)]
    for name, (model, tok) in models.items():
        texts = [render(Prompt(r["id"], r["prompt"]), tok, chat=chat) for r in rows]
        for r, response in zip(rows, greedy_responses(model, tok, texts, max_new_tokens, batch_size)):
            r[name] = response.strip()
    return rows


def export_review(samples: Sequence[dict], folder: str | Path, *, variants: tuple[str, str] = ("teacher", "student"),
                  seed: int = 0) -> dict[str, Path]:
    """Write ``review.csv``, ``review.jsonl`` and ``review_key.json`` into ``folder`` from samples
    ``{"id", "prompt", variants[0]: response, variants[1]: response}``."""
    first, second = variants
    rng = random.Random(seed)
    rows, key, seen = [], {}, set()
    for i, s in enumerate(samples):
        missing = [f for f in ("id", "prompt", first, second) if f not in s]
        if missing:
            raise ReviewError(f"review: sample {i} has no field {missing[0]!r}")
        item = str(s["id"])
        if item in seen:
            raise ReviewError(f"review: sample {i} repeats id {item!r}")
        seen.add(item)
        a, b = (first, second) if rng.random() < 0.5 else (second, first)
        key[item] = {"A": a, "B": b}
        rows.append({"id": item, "prompt": s["prompt"], "response_a": s[a], "response_b": s[b], "rating": "",
                     "rater": "", "comment": ""})
    folder = Path(folder)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
    return {"csv": atomic_write_text(folder / "review.csv", buf.getvalue()),
            "jsonl": atomic_write_text(folder / "review.jsonl",
                                       "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)),
            "key": atomic_write_json(folder / "review_key.json",
                                     {"variants": [first, second], "seed": seed, "key": key})}


def read_ratings(path: str | Path) -> list[tuple[str, dict]]:
    """``(where, row)`` for every row of a filled review file (CSV or JSONL, by suffix)."""
    from distillery.data.sources import DataError, jsonl_rows  # here: data.sources imports torch

    path = Path(path)
    try:
        if path.suffix == ".jsonl":
            return [(f"{path}:{n}", row) for n, row in jsonl_rows(path)]
        text = path.read_text("utf-8")
    except FileNotFoundError:
        raise ReviewError(f"{path}: no such ratings file") from None
    except DataError as e:
        raise ReviewError(str(e)) from None
    if path.suffix != ".csv":
        raise ReviewError(f"{path}: ratings are read from .csv or .jsonl")
    reader = csv.DictReader(io.StringIO(text))
    for need in ("id", "rating"):
        if need not in (reader.fieldnames or []):
            raise ReviewError(f"{path}: no {need!r} column")
    # line numbers count the header and any newlines inside quoted responses
    return [(f"{path}:{reader.line_num}", row) for row in reader]


def check_ratings(path: str | Path, exported: str | Path) -> None:
    """Refuse ratings of other samples: every rated row's responses must be the ones ``exported``
    (a ``review.jsonl`` of this run) holds under its id, so ratings made before the variant changed
    are never counted for the new one."""
    from distillery.data.sources import jsonl_rows

    rows = {str(r["id"]): r for _, r in jsonl_rows(Path(exported))}
    for where, row in read_ratings(path):
        mine = rows.get(str(row.get("id", "")))
        if mine is None:
            raise ReviewError(f"{where}: id {row.get('id')!r} is not in {exported}")
        for field in ("response_a", "response_b"):
            if field in row and row[field] != mine[field]:
                raise ReviewError(f"{where}: field {field!r} differs from {exported} (ratings of other samples: "
                                  "export again and rate the new file)")


def import_ratings(path: str | Path, key_path: str | Path, *, subject: str | None = None,
                   n_resamples: int = 1000, seed: int = 0) -> dict:
    """The subject's win rate (default: the second variant exported) against the other, from ratings.

    ``{"metric": "win_rate", "subject", "against", "value", "interval", "wins", "losses", "ties",
    "ratings", "items", "unrated", "per_item": {id: score}}``."""
    key_file = read_json(key_path)
    variants, key = key_file["variants"], key_file["key"]
    subject = subject or variants[1]
    if subject not in variants:
        raise ReviewError(f"{key_path}: subject {subject!r} is not one of the variants {variants}")
    against = variants[0] if subject == variants[1] else variants[1]
    scores: dict[str, list[float]] = {}
    counts = {"wins": 0, "losses": 0, "ties": 0, "unrated": 0}
    for where, row in read_ratings(path):
        item = str(row.get("id", ""))
        if item not in key:
            raise ReviewError(f"{where}: id {item!r} is not in {key_path}")
        raw = str(row.get("rating") or "").strip()
        if not raw:
            counts["unrated"] += 1
            continue
        rating = RATINGS.get(raw.lower())
        if rating is None:
            raise ReviewError(f"{where}: field 'rating' must be A, B or tie, got {raw!r}")
        score = 0.5 if rating == "tie" else float(key[item][rating] == subject)
        counts["ties" if score == 0.5 else "wins" if score == 1 else "losses"] += 1
        scores.setdefault(item, []).append(score)
    if not scores:
        raise ReviewError(f"{path}: no rated rows")
    per_item = {item: math.fsum(v) / len(v) for item, v in scores.items()}
    ci = bootstrap_ci(list(per_item.values()), n_resamples=n_resamples, seed=seed)
    return {"metric": "win_rate", "subject": subject, "against": against, "value": ci["value"],
            "interval": [ci["low"], ci["high"]], **counts, "ratings": sum(len(v) for v in scores.values()),
            "items": len(per_item), "per_item": per_item}
