"""Perturbation slices (deterministic, numbers kept, tagged rows) and metric changes under them."""

from __future__ import annotations

import random
import re

import pytest

from distillery.evaluate.robustness import (
    RobustnessError,
    add_typos,
    changes_by_perturbation,
    metric_changes,
    perturbation_slice,
    teacher_paraphraser,
    vary_whitespace,
)
from distillery.evaluate.stats import paired_bootstrap

ROWS = [
    {"id": "a1", "prompt": "What is 12 + 35? Reply with the number only.", "answer": "47", "tags": ["arithmetic"]},
    {"id": "s1", "prompt": "Review: A thoroughly charming and surprisingly moving picture.\nIs this review "
                           "positive or negative? Answer:", "choices": ["negative", "positive"], "answer": 1,
     "tags": ["sentiment"]},
    {"id": "lc", "prompt": "already lower case words only here", "answer": "x", "tags": []},
]


def _one_edit(a: str, b: str) -> bool:
    """b is a with two neighbouring letters swapped, one letter dropped, doubled or replaced."""
    if len(b) == len(a) - 1:
        return any(a[:i] + a[i + 1:] == b for i in range(len(a)))
    if len(b) == len(a) + 1:
        return any(a[:i + 1] + a[i] + a[i + 1:] == b for i in range(len(a)))
    if len(b) == len(a):
        diff = [i for i in range(len(a)) if a[i] != b[i]]
        return len(diff) == 1 or (len(diff) == 2 and diff[1] == diff[0] + 1
                                  and a[diff[0]] == b[diff[1]] and a[diff[1]] == b[diff[0]])
    return False


def test_slice_is_deterministic_and_independent_of_row_order():
    one = perturbation_slice(ROWS, seed=3)
    two = perturbation_slice(list(reversed(ROWS)), seed=3)
    assert sorted(map(str, one)) == sorted(map(str, two))
    assert one == perturbation_slice(ROWS, seed=3)
    other = perturbation_slice(ROWS, seed=4)
    assert [r["prompt"] for r in other if r["perturbation"] == "typos"] != \
           [r["prompt"] for r in one if r["perturbation"] == "typos"]


def test_rows_are_tagged_and_unchanged_rows_dropped():
    rows = perturbation_slice(ROWS, kinds=("lowercase", "uppercase"), seed=0)
    ids = {r["id"] for r in rows}
    # "lc" is already lower case: its lowercase copy would equal it and is dropped
    assert ids == {"a1~lowercase", "s1~lowercase", "a1~uppercase", "s1~uppercase", "lc~uppercase"}
    s1 = next(r for r in rows if r["id"] == "s1~uppercase")
    assert s1["prompt"] == ROWS[1]["prompt"].upper()
    assert s1["choices"] == ["negative", "positive"] and s1["answer"] == 1  # only the prompt changes
    assert s1["source_id"] == "s1" and s1["perturbation"] == "uppercase"
    assert s1["tags"] == ["sentiment", "perturbed", "perturbation:uppercase"]
    assert ROWS[1]["tags"] == ["sentiment"]  # the input rows are not modified


def test_typos_edit_words_once_and_never_touch_numbers():
    text = ROWS[0]["prompt"]
    for seed in range(30):
        out = add_typos(text, random.Random(seed), rate=0.3)
        assert out != text
        assert re.findall(r"\d+", out) == ["12", "35"]
        words, new = text.split(" "), out.split(" ")
        assert len(words) == len(new)
        changed = [(a, b) for a, b in zip(words, new) if a != b]
        assert changed and all(_one_edit(a, b) for a, b in changed), changed
        assert all(len(re.sub(r"\W", "", a)) >= 4 for a, _ in changed)


def test_whitespace_keeps_words_and_ends():
    text = ROWS[1]["prompt"]
    for seed in range(10):
        out = vary_whitespace(text, random.Random(seed))
        assert out != text and out.split() == text.split()
        assert out.endswith("Answer:") and out.startswith("Review:")
        assert out.count("\n") == text.count("\n") + 1


def test_bare_strings_and_paraphrase_callable():
    texts = ["The quick brown fox jumps.", "Another sentence here."]
    rows = perturbation_slice(texts, kinds=("paraphrase",), paraphrase=lambda ts: [t[::-1] for t in ts])
    assert [r["text"] for r in rows] == [".spmuj xof nworb kciuq ehT", ".ereh ecnetnes rehtonA"]
    assert [r["id"] for r in rows] == ["0~paraphrase", "1~paraphrase"]
    with pytest.raises(RobustnessError, match="paraphrase callable"):
        perturbation_slice(texts, kinds=("paraphrase",))
    with pytest.raises(RobustnessError, match="returned 1 texts for 2 rows"):
        perturbation_slice(texts, kinds=("paraphrase",), paraphrase=lambda ts: ts[:1])
    with pytest.raises(RobustnessError, match="unknown perturbation 'shout'"):
        perturbation_slice(texts, kinds=("shout",))
    with pytest.raises(RobustnessError, match="row 1 needs an 'id'"):
        perturbation_slice([{"id": "x", "prompt": "p"}, {"prompt": "q"}])


def test_teacher_paraphraser_runs_a_model(tiny_tokenizer):
    from tests.helpers import tiny_llama

    para = teacher_paraphraser(tiny_llama(layers=2), tiny_tokenizer, max_new_tokens=6, chat=False)
    out = para(["The minister said on Tuesday.", "Rain fell."])
    assert len(out) == 2 and all(isinstance(t, str) for t in out)


def test_metric_changes_numbers_and_dicts():
    before = {"accuracy": 0.8, "perplexity": {"value": 10.0, "interval": [9.0, 11.0]}, "zero": 0.0, "only": 1.0}
    after = {"accuracy": 0.7, "perplexity": {"value": 12.5, "interval": [11.0, 14.0]}, "zero": 0.1}
    ch = metric_changes(before, after)
    assert set(ch) == {"accuracy", "perplexity", "zero"}
    assert ch["accuracy"]["change"] == pytest.approx(-0.1) and ch["accuracy"]["relative"] == pytest.approx(-0.125)
    assert ch["perplexity"] == {"before": 10.0, "after": 12.5, "change": 2.5, "relative": 0.25}
    assert ch["zero"]["relative"] is None


def test_changes_by_perturbation_match_paired_bootstrap():
    before = [{"id": f"e{i}", "correct": float(i % 3 != 0), "confidence": 0.5 + i / 40, "tags": []} for i in range(12)]
    typos = [{"id": f"e{i}~typos", "correct": float(i % 2 == 0), "confidence": 0.5, "tags": ["perturbation:typos"]}
             for i in range(0, 12, 2)]
    lower = [{"id": f"e{i}~lowercase", "correct": 1.0, "confidence": 0.9, "tags": ["perturbation:lowercase"]}
             for i in range(6)]
    ch = changes_by_perturbation(before, typos + lower, n_resamples=500, seed=1)
    assert set(ch) == {"typos", "lowercase"}
    # typos covered e0, e2, ..., e10: before correct 0,1,1,0,1,1 -> 4/6, after all 1
    acc = ch["typos"]["accuracy"]
    assert acc["before"] == pytest.approx(4 / 6) and acc["after"] == 1.0 and acc["n"] == 6
    ref = paired_bootstrap([1.0] * 6, [0, 1, 1, 0, 1, 1], n_resamples=500, seed=1)
    assert acc["interval"] == [ref["low"], ref["high"]] and acc["p_value"] == ref["p_value"]
    conf = ch["lowercase"]["answer_confidence"]
    assert conf["before"] == pytest.approx(sum(0.5 + i / 40 for i in range(6)) / 6)
    assert conf["change"] == pytest.approx(0.9 - conf["before"])
    with pytest.raises(RobustnessError, match="no 'perturbation:<kind>' tag"):
        changes_by_perturbation(before, [{"id": "e1~x", "correct": 1.0, "tags": []}])


def test_perturbed_task_scored_by_evaluate_task(tiny_tokenizer, tmp_path):
    from distillery.evaluate.tasks import evaluate_task, read_task, write_task
    from tests.helpers import tiny_llama

    rows = [{"id": f"s{i}", "prompt": f"Review: the film number {i} was a splendid, careful piece. Answer:",
             "choices": ["negative", "positive"], "answer": i % 2, "tags": ["sentiment"]} for i in range(6)]
    model = tiny_llama(layers=2)
    base = evaluate_task(model, tiny_tokenizer, read_task(write_task(tmp_path / "t.jsonl", rows)))
    slice_rows = perturbation_slice(rows, kinds=("uppercase", "typos"), seed=0)
    pert = evaluate_task(model, tiny_tokenizer, read_task(write_task(tmp_path / "p.jsonl", slice_rows)))
    assert {"perturbation:uppercase", "perturbation:typos", "perturbed"} <= set(pert["slices"])
    ch = changes_by_perturbation(base["examples"], pert["examples"])
    assert set(ch) == {"uppercase", "typos"}
    for kind in ch:
        mine = [e for e in pert["examples"] if f"perturbation:{kind}" in e["tags"]]
        assert ch[kind]["accuracy"]["after"] == pytest.approx(sum(e["correct"] for e in mine) / len(mine))
        assert ch[kind]["accuracy"]["n"] == len(mine) == 6
