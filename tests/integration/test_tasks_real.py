"""Local tasks on the real SmolLM2-135M-Instruct teacher: the sentiment task runs and every
per-example result agrees with the summary (accuracy above chance is not asserted: a 135M model
need not have it), and lm-eval's accuracy equals ours on the teacher and on a cut student."""

import math

import pytest

from distillery.evaluate.lmeval import run_lmeval
from distillery.evaluate.task_builders import build_sentiment
from distillery.evaluate.tasks import evaluate_task, read_task
from distillery.models.load import load_model
from distillery.models.student import cut_layers

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def teacher():
    return load_model("builtin:smollm2-135m-instruct", device="cpu")


def _sentiment(path, limit):
    build_sentiment(path, seed=0, limit=limit)
    return read_task(path)


def test_sentiment_on_the_real_teacher(teacher, tmp_path):
    # 8 reviews (16 scored continuations) keep this to seconds on 2 cores
    task = _sentiment(tmp_path / "sentiment.jsonl", 8)
    out = evaluate_task(teacher.model, teacher.tokenizer, task, batch_size=16)
    ex = out["examples"]
    assert len(ex) == 8
    for e in ex:
        assert len(e["loglik"]) == 2 and all(math.isfinite(v) and v < 0 for v in e["loglik"])
        assert e["pred"] == max((0, 1), key=lambda i: e["loglik"][i])
        assert e["correct"] == float(e["pred"] == e["answer"])
        assert 0.5 <= e["confidence"] <= 1
    assert out["metrics"]["accuracy"] == pytest.approx(sum(e["correct"] for e in ex) / 8)
    assert out["slices"]["label:pos"]["n"] + out["slices"]["label:neg"]["n"] == 8
    assert 0 <= out["metrics"]["ece"] <= 1 and sum(out["reliability"]["count"]) == 8


def test_lmeval_equals_ours_on_teacher_and_student(teacher, tmp_path):
    task = _sentiment(tmp_path / "sentiment.jsonl", 6)
    student = cut_layers(teacher.model, list(range(0, 30, 2)))
    for model in (teacher.model, student):
        ours = evaluate_task(model, teacher.tokenizer, task, batch_size=16)
        theirs = run_lmeval(model, teacher.tokenizer, task, batch_size=16, workdir=tmp_path)
        assert abs(theirs["metrics"]["accuracy"] - ours["metrics"]["accuracy"]) <= 1 / 6 + 1e-12
        for a, b in zip(ours["examples"], theirs["examples"]):
            assert a["id"] == b["id"] and b["loglik"] == pytest.approx(a["loglik"], abs=1e-3)
