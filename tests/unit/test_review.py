"""Human review: export with hidden, seeded side order; ratings back as a win rate with a bootstrap interval."""

from __future__ import annotations

import csv
import json

import pytest

from distillery.evaluate.review import ReviewError, export_review, generate_pairs, import_ratings
from distillery.evaluate.stats import bootstrap_ci

SAMPLES = [{"id": f"p{i}", "prompt": f"Question {i}?", "teacher": f"teacher answer {i}",
            "student": f"student answer {i}, with a comma\nand a newline"} for i in range(40)]


def _fill(path, ratings: dict[str, list[str]]):
    """Write a rated CSV: one row per (item, rating), as several raters would."""
    rows = list(csv.DictReader(path.open(newline="")))
    out = []
    for row in rows:
        for j, r in enumerate(ratings.get(row["id"], [""])):
            out.append({**row, "rating": r, "rater": f"r{j}"})
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(out)


def test_export_hides_sides_and_keeps_the_key(tmp_path):
    paths = export_review(SAMPLES, tmp_path, seed=7)
    key = json.loads(paths["key"].read_text())
    assert key["variants"] == ["teacher", "student"] and key["seed"] == 7
    rows = list(csv.DictReader(paths["csv"].open(newline="")))
    jsonl = [json.loads(line) for line in paths["jsonl"].read_text().splitlines()]
    assert rows == jsonl  # the same rows in both formats, newlines and commas survive CSV quoting
    sides = []
    for row, sample in zip(rows, SAMPLES):
        k = key["key"][row["id"]]
        assert row["response_a"] == sample[k["A"]] and row["response_b"] == sample[k["B"]]
        assert row["rating"] == "" and row["rater"] == ""
        sides.append(k["A"])
    # randomised, both orders present, and the same draw for the same seed
    assert 10 <= sides.count("teacher") <= 30
    again = json.loads(export_review(SAMPLES, tmp_path / "again", seed=7)["key"].read_text())
    assert again["key"] == key["key"]
    other = json.loads(export_review(SAMPLES, tmp_path / "other", seed=8)["key"].read_text())
    assert other["key"] != key["key"]


def test_ratings_give_win_rate_with_bootstrap_interval(tmp_path):
    paths = export_review(SAMPLES, tmp_path, seed=1)
    key = json.loads(paths["key"].read_text())["key"]
    side = {i: next(s for s, v in key[i].items() if v == "student") for i in key}
    other = {i: "B" if side[i] == "A" else "A" for i in key}
    # p0..p19 student wins; p20..p29 teacher wins; p30..p34 tie; p35 two raters split; p36..p39 unrated
    ratings = {f"p{i}": [side[f"p{i}"]] for i in range(20)}
    ratings |= {f"p{i}": [other[f"p{i}"].lower()] for i in range(20, 30)}
    ratings |= {f"p{i}": ["tie"] for i in range(30, 35)}
    ratings["p35"] = [side["p35"], other["p35"]]
    _fill(paths["csv"], ratings)
    res = import_ratings(paths["csv"], paths["key"], n_resamples=400, seed=2)
    per_item = [1.0] * 20 + [0.0] * 10 + [0.5] * 5 + [0.5]
    assert res["subject"] == "student" and res["against"] == "teacher"
    assert (res["wins"], res["losses"], res["ties"], res["unrated"]) == (21, 11, 5, 4)
    assert res["items"] == 36 and res["ratings"] == 37
    ref = bootstrap_ci(per_item, n_resamples=400, seed=2)
    assert res["value"] == pytest.approx(sum(per_item) / 36) == ref["value"]
    assert res["interval"] == [ref["low"], ref["high"]]
    flipped = import_ratings(paths["csv"], paths["key"], subject="teacher", n_resamples=400, seed=2)
    assert flipped["value"] == pytest.approx(1 - res["value"])


def test_jsonl_ratings_and_errors_name_the_line(tmp_path):
    paths = export_review(SAMPLES[:3], tmp_path)
    rows = [json.loads(line) for line in paths["jsonl"].read_text().splitlines()]
    rows[0]["rating"], rows[1]["rating"] = "A", "B"
    paths["jsonl"].write_text("".join(json.dumps(r) + "\n" for r in rows))
    res = import_ratings(paths["jsonl"], paths["key"])
    assert res["items"] == 2 and res["unrated"] == 1 and res["wins"] + res["losses"] == 2
    rows[2]["rating"] = "maybe"
    paths["jsonl"].write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ReviewError, match=r"review.jsonl:3: field 'rating' must be A, B or tie, got 'maybe'"):
        import_ratings(paths["jsonl"], paths["key"])
    rows[2].update(rating="A", id="nope")
    paths["jsonl"].write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ReviewError, match="review.jsonl:3: id 'nope' is not in"):
        import_ratings(paths["jsonl"], paths["key"])
    with pytest.raises(ReviewError, match="sample 0 has no field 'student'"):
        export_review([{"id": 1, "prompt": "p", "teacher": "t"}], tmp_path / "x")
    with pytest.raises(ReviewError, match="no rated rows"):
        import_ratings(export_review(SAMPLES[:2], tmp_path / "y")["csv"], tmp_path / "y" / "review_key.json")


def test_generate_pairs_from_two_models(tiny_tokenizer, tmp_path):
    from tests.helpers import tiny_llama

    models = {"teacher": (tiny_llama(layers=2, seed=0), tiny_tokenizer),
              "student": (tiny_llama(layers=1, seed=1), tiny_tokenizer)}
    pairs = generate_pairs(["The minister said", {"id": "q7", "prompt": "Rain fell on"}], models,
                           max_new_tokens=5, chat=False)
    assert [p["id"] for p in pairs] == ["0", "q7"]
    assert all(isinstance(p["teacher"], str) and isinstance(p["student"], str) for p in pairs)
    paths = export_review(pairs, tmp_path)
    assert len(paths["csv"].read_text().splitlines()) >= 3
