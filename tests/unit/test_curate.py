"""Curation: verifiers, filters, dedup, review round trip, staging, the card."""

import json
import math

import pytest

from distillery.data.curate import (CurateError, confidence_accuracy, curate, import_review, make_verifier,
                                    repetition, score_bounds, stage)
from distillery.data.provenance import histogram, read_records, write_dataset
from distillery.recipe import CurateConfig, ScoreFilterConfig, VerifierConfig


def rec(i, response, logprob=-1.0, prompt=None, correct=None):
    return {"id": f"r{i}", "prompt_id": f"p{i}", "prompt": prompt or f"prompt number {i}", "raw_prompt": f"p{i}",
            "response": response, "scores": {"mean_logprob": logprob, "mean_entropy": -logprob},
            "correct": correct}


def is_short(record):  # a python verifier, imported by name
    return len(record["response"]) < 20


def test_verifiers_regex_python_json_schema():
    r_ok, r_bad = rec(0, '{"answer": 4}'), rec(1, "the answer is four, I think, probably")
    schema = VerifierConfig(name="js", kind="json_schema", schema={"type": "object", "required": ["answer"]})
    assert make_verifier(schema)(r_ok) and not make_verifier(schema)(r_bad)
    regex = VerifierConfig(name="num", kind="regex", pattern=r"\d")
    assert make_verifier(regex)(r_ok) and not make_verifier(regex)(r_bad)
    py = VerifierConfig(name="short", kind="python", function=f"{__name__}:is_short")
    assert make_verifier(py)(r_ok) and not make_verifier(py)(r_bad)
    with pytest.raises(CurateError, match="verifier nope"):
        make_verifier(VerifierConfig(name="nope", kind="python", function="no.such.module:f"))


def test_repetition():
    assert repetition("a b c d e f") == 0
    assert repetition("go on go on go on go on") > 0.5


def test_quantile_bounds_match_numpy():
    import numpy as np

    records = [rec(i, "x", logprob=-v) for i, v in enumerate([3.0, 1.0, 2.0, 5.0, 4.0])]
    lo, hi = score_bounds(records, ScoreFilterConfig(score="mean_logprob", quantile_min=0.3, quantile_max=0.9))
    vals = [-3.0, -1.0, -2.0, -5.0, -4.0]
    assert lo == pytest.approx(np.quantile(vals, 0.3)) and hi == pytest.approx(np.quantile(vals, 0.9))
    # by hand, sorted -5 -4 -3 -2 -1: rank 0.3 * 4 = 1.2 -> -4 + 0.2, rank 0.9 * 4 = 3.6 -> -2 + 0.6
    assert lo == pytest.approx(-3.8) and hi == pytest.approx(-1.4)


def test_curate_counts_every_filter_and_dedups():
    records = [rec(0, "Paris is the capital.", -0.1, correct=True),
               rec(1, "Paris is the capital.", -0.2, prompt="prompt number 0", correct=True),  # exact dup of 0
               rec(2, "no no no no no no no no no no", -0.3),  # repetition
               rec(3, "", -0.1),  # too short
               rec(4, "A guess, maybe 7.", -3.0, correct=False),  # low confidence
               rec(5, "Another fine answer here, with a few more words to share.", -0.5, correct=True),
               rec(6, "Another fine answer here, with a few more words to share today.", -0.6, prompt="prompt number 5", correct=True)]  # near dup
    cfg = CurateConfig(filters=[ScoreFilterConfig(score="mean_logprob", min=-1.0)], near_dup_threshold=0.8,
                       seed_fraction=0.5, review_fraction=0.0, valid_fraction=0.0)
    counts = curate(records, cfg)
    assert [r["dropped_by"] for r in records] == [None, "exact_dedup", "repetition", "length",
                                                  "score:mean_logprob[min=-1.0]", None, "near_dedup"]
    assert counts["kept"] == 2 and counts["dropped_by"]["exact_dedup"] == 1
    acc = confidence_accuracy(records)
    assert acc["kept_accuracy"] == 1.0 and acc["dropped_accuracy"] == 0.0 and acc["dropped_n"] == 1
    stage(records, cfg)
    assert records[0]["stage"] == "seed" and records[5]["stage"] == "pool"  # higher confidence first


def test_review_export_import_round_trip(tmp_path):
    records = [rec(i, f"answer {i} is here", -i / 10) for i in range(10)]
    cfg = CurateConfig(seed_fraction=0.2, review_fraction=0.2, near_dup_threshold=None, valid_fraction=0.0)
    curate(records, cfg)
    stage(records, cfg)
    meta = {"teacher": {"id": "t", "fingerprint": "f" * 64, "backend": "x"}, "prompts": 10, "prompt_source": "s",
            "decoding": [], "seed": 0, "curation": {}}
    write_dataset(tmp_path, records, meta)
    review = [json.loads(x) for x in (tmp_path / "review.jsonl").read_text().splitlines()]
    assert {r["id"] for r in review} == {"r9", "r8"}  # the lowest-confidence kept records
    for r in review:
        r["verdict"] = "reject" if r["id"] == "r9" else "accept"
    (tmp_path / "reviewed.jsonl").write_text("".join(json.dumps(r) + "\n" for r in review))
    assert import_review(records, tmp_path / "reviewed.jsonl") == 2
    stage(records, cfg)
    by_id = {r["id"]: r for r in records}
    assert not by_id["r9"]["kept"] and by_id["r9"]["dropped_by"] == "human_review"
    assert by_id["r8"]["stage"] == "seed"  # human-accepted records go to the seed set first
    (tmp_path / "bad.jsonl").write_text('{"id": "r1", "verdict": "maybe"}\n')
    with pytest.raises(CurateError, match="bad.jsonl:1: verdict"):
        import_review(records, tmp_path / "bad.jsonl")
    assert len(read_records(tmp_path)) == 10


def test_histogram_counts_all_finite_values():
    h = histogram([0.0, 0.1, 0.5, 1.0, math.nan], bins=2)
    assert [int(line.split()[-1]) for line in h.splitlines()] == [2, 2]
