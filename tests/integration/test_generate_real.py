"""The generate stage on the real SmolLM2-135M-Instruct teacher: confidence means something.

On checkable prompts (small arithmetic and copying, answers known), the responses kept by the
confidence filter must be right more often than the ones it drops, and the card must say so.
"""

import json

import pytest

from distillery.data.generate import run_generate
from distillery.data.sources import read_jsonl
from distillery.recipe import parse_recipe

pytestmark = pytest.mark.slow


def test_confidence_filter_keeps_more_correct_answers(tmp_path):
    recipe = parse_recipe({
        "name": "gen-real", "seed": 0, "student": {"from_teacher": {"every": 2}},
        "data": {"source": {"kind": "corpus", "name": "austen"}},
        "generate": {
            "prompts": {"kind": "tasks", "tasks": ["arithmetic", "copy"], "limit": 32},
            "decoding": [{"name": "greedy", "max_new_tokens": 12}],
            "backend": {"batch_size": 16},
            "curate": {"filters": [{"score": "mean_logprob", "quantile_min": 0.5}], "near_dup_threshold": None,
                       "seed_fraction": 0.25, "review_fraction": 0.0},
        }})
    summary = run_generate(recipe, tmp_path, progress=False)
    acc = summary["confidence_accuracy"]
    assert acc["kept_n"] >= 10 and acc["dropped_n"] >= 10
    assert acc["kept_accuracy"] > acc["dropped_accuracy"], acc
    card = (tmp_path / "data" / "card.md").read_text()
    assert "Confidence vs correctness" in card and f"| {acc['kept_n']} | {acc['kept_correct']} |" in card
    rows = read_jsonl(tmp_path / "data" / "train.jsonl") + read_jsonl(tmp_path / "data" / "valid.jsonl")
    assert rows and all("<|im_start|>assistant" in d.text for d in rows)  # chat-formatted prompt + response
    prov = json.loads((tmp_path / "data" / "provenance.json").read_text())
    assert prov["teacher"]["id"] == "builtin:smollm2-135m-instruct" and prov["format_version"] == 1
