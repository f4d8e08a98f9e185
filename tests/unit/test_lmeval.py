"""The lm-evaluation-harness adapter: on the tiny model, lm-eval's per-example log-likelihoods and
accuracy equal ours (tasks.py) on the same local multiple-choice examples."""

import pytest

from distillery.evaluate.lmeval import run_lmeval, task_yaml
from distillery.evaluate.task_builders import analogy_rows, sentiment_rows
from distillery.evaluate.tasks import TaskError, evaluate_task, read_task, write_task
from tests.helpers import tiny_llama


@pytest.mark.parametrize("builder", [lambda: sentiment_rows(seed=0, limit=12), lambda: analogy_rows(n=14, seed=0)])
def test_lmeval_accuracy_equals_ours(builder, tiny_tokenizer, tmp_path):
    model = tiny_llama(seed=5)
    task = read_task(write_task(tmp_path / "t.jsonl", builder()))
    ours = evaluate_task(model, tiny_tokenizer, task)
    theirs = run_lmeval(model, tiny_tokenizer, task, workdir=tmp_path)
    assert [e["id"] for e in theirs["examples"]] == [e["id"] for e in ours["examples"]]
    for a, b in zip(ours["examples"], theirs["examples"]):
        assert b["loglik"] == pytest.approx(a["loglik"], abs=1e-4)
    n = len(task.examples)
    assert theirs["metrics"]["n"] == n
    assert abs(theirs["metrics"]["accuracy"] - ours["metrics"]["accuracy"]) <= 1 / n + 1e-12
    assert abs(theirs["metrics"]["accuracy_norm"] - ours["metrics"]["accuracy_norm"]) <= 1 / n + 1e-12
    agree = sum(a["correct"] == b["correct"] for a, b in zip(ours["examples"], theirs["examples"]))
    assert agree >= n - 1
    assert [p.name for p in tmp_path.iterdir()] == ["t.jsonl"]  # its temporary task folder is gone


def test_task_yaml_reads_our_fields(tmp_path):
    y = task_yaml("distillery_x", tmp_path / "x.jsonl", tmp_path / "cache")
    assert (y["dataset_path"], y["doc_to_text"], y["doc_to_choice"], y["doc_to_target"]) == \
        ("json", "prompt", "choices", "answer")
    assert y["dataset_kwargs"]["data_files"] == {"test": str(tmp_path / "x.jsonl")}


def test_lmeval_refuses_generation_tasks(tiny_tokenizer, tmp_path):
    task = read_task(write_task(tmp_path / "g.jsonl", [{"id": "a", "prompt": "p", "answer": "1"}]))
    with pytest.raises(TaskError, match="runs multiple-choice tasks"):
        run_lmeval(tiny_llama(), tiny_tokenizer, task)
