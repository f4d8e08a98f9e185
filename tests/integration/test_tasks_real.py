"""The sentiment task on the real SmolLM2-135M-Instruct teacher: it runs, and every per-example result
agrees with the summary. (Accuracy above chance is not asserted: a 135M model need not have it.)"""

import math

import pytest

from distillery.evaluate.task_builders import build_sentiment
from distillery.evaluate.tasks import evaluate_task, read_task
from distillery.models.load import load_model

pytestmark = pytest.mark.slow


def test_sentiment_on_the_real_teacher(tmp_path):
    teacher = load_model("builtin:smollm2-135m-instruct", device="cpu")
    # 12 reviews (24 scored continuations) keep this to seconds on 2 cores
    build_sentiment(tmp_path / "sentiment.jsonl", seed=0, limit=12)
    task = read_task(tmp_path / "sentiment.jsonl")
    out = evaluate_task(teacher.model, teacher.tokenizer, task, batch_size=12)
    ex = out["examples"]
    assert len(ex) == 12
    for e in ex:
        assert len(e["loglik"]) == 2 and all(math.isfinite(v) and v < 0 for v in e["loglik"])
        assert e["pred"] == max((0, 1), key=lambda i: e["loglik"][i]) and e["correct"] == float(e["pred"] == e["answer"])
        assert 0.5 <= e["confidence"] <= 1
    assert out["metrics"]["accuracy"] == pytest.approx(sum(e["correct"] for e in ex) / 12)
    assert out["slices"]["label:pos"]["n"] + out["slices"]["label:neg"]["n"] == 12
    assert 0 <= out["metrics"]["ece"] <= 1 and sum(out["reliability"]["count"]) == 12
