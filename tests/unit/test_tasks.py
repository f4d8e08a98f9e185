"""Local task files: reading and validation, the three builders on real data, and scoring on a tiny
model checked against log-probabilities and greedy decoding computed by hand from its logits."""

import json
import math

import pytest
import torch

from distillery.data.sources import gensim_data_dir
from distillery.evaluate.task_builders import analogy_rows, arithmetic_rows, build_task, sentiment_rows
from distillery.evaluate.tasks import (ChoiceExample, GenerationExample, TaskError, encode_pair, evaluate_task,
                                       example_rows, read_task, score_generation, score_multiple_choice, summarise,
                                       write_task)
from tests.helpers import tiny_llama


@pytest.fixture(scope="module")
def model():
    return tiny_llama(seed=3)


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ---------------------------------------------------------------- files


@pytest.mark.parametrize("row,message", [
    ({"prompt": "p", "choices": ["a", "b"], "answer": 0}, "2: no field 'id'"),
    ({"id": "x", "prompt": "p", "choices": ["a", "b"], "answer": 2}, "2: field 'answer' must be an index"),
    ({"id": "x", "prompt": "p", "choices": ["a"], "answer": 0}, "2: field 'choices' must be a list of at least"),
    ({"id": "x", "prompt": "", "choices": ["a", "b"], "answer": 0}, "2: field 'prompt' must be"),
    ({"id": "x", "prompt": "p", "choices": ["a", "b"], "answer": 0, "tags": "t"}, "2: field 'tags'"),
    ({"id": "x", "prompt": "p", "answer": "a"}, "2: mixes multiple-choice and generation"),
    ({"id": "0", "prompt": "p", "choices": ["a", "b"], "answer": 1}, "2: duplicate id '0'"),
])
def test_read_task_names_file_line_and_field(tmp_path, row, message):
    path = _write(tmp_path / "t.jsonl", [{"id": "0", "prompt": "p", "choices": ["a", "b"], "answer": 0}, row])
    with pytest.raises(TaskError, match=f"t.jsonl:{message}"):
        read_task(path)


def test_read_task_rejects_bad_json_and_answer_type(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"id": 1,\n')
    with pytest.raises(TaskError, match="bad.jsonl:1: not valid JSON"):
        read_task(tmp_path / "bad.jsonl")
    with pytest.raises(TaskError, match="answer_type"):
        write_task(tmp_path / "g.jsonl", [{"id": "a", "prompt": "p", "answer": "x", "answer_type": "date"}])
    with pytest.raises(TaskError, match="no such task file"):
        read_task(tmp_path / "missing.jsonl")


def test_write_read_round_trip(tmp_path):
    rows = sentiment_rows(seed=1, limit=5)
    task = read_task(write_task(tmp_path / "s.jsonl", rows))
    assert task.name == "s" and task.kind == "multiple_choice" and len(task.examples) == 5
    assert example_rows(task) == rows
    assert not list(tmp_path.glob(".*.tmp"))  # written atomically, nothing left behind


# ---------------------------------------------------------------- builders


def test_sentiment_builder_reads_every_labelled_sentence():
    rows = sentiment_rows(seed=0)
    assert len(rows) == 200 and sum(r["answer"] for r in rows) == 100
    by_id = {r["id"]: r for r in rows}
    first = by_id["sentiment/1"]  # the file's first line: "__label__neg simplistic , silly and tedious ."
    assert first["answer"] == 0 and "simplistic , silly and tedious ." in first["prompt"]
    assert first["tags"] == ["sentiment", "label:neg", "short"]
    # cp1252 in the source (0x97 is an em dash): decoded, not mangled
    assert any("\u2014" in r["prompt"] for r in rows)
    assert sentiment_rows(seed=0) == rows and [r["id"] for r in sentiment_rows(seed=1)] != [r["id"] for r in rows]


def test_analogy_builder_answers_and_distractors_from_the_section():
    lines = (gensim_data_dir() / "questions-words.txt").read_text().splitlines()
    section_of, current = {}, None
    for n, line in enumerate(lines, 1):
        current = line[2:] if line.startswith(":") else current
        section_of[n] = current
    rows = analogy_rows(n=140, seed=0)
    assert len(rows) == 140 and len({r["tags"][1] for r in rows}) == 14  # 10 from each of 14 sections
    for r in rows:
        line = int(r["id"].split("/")[1])
        a, b, c, d = lines[line - 1].split()
        assert r["prompt"] == f"{a} is to {b} as {c} is to" and r["choices"][r["answer"]] == d
        assert len(set(r["choices"])) == 4 and r["tags"][1] == section_of[line]
        section_answers = {ln.split()[3] for k, ln in enumerate(lines, 1) if section_of[k] == r["tags"][1]
                           and not ln.startswith(":")}
        assert set(r["choices"]) <= section_answers
    assert analogy_rows(n=140, seed=0) == rows and analogy_rows(n=140, seed=1) != rows


def test_arithmetic_builder_answers_are_right(tmp_path):
    rows = build_task("arithmetic", tmp_path / "a.jsonl", seed=2, n=30)
    assert read_task(tmp_path / "a.jsonl").kind == "generation"
    for r in rows:
        a, op, b = r["prompt"].split("?")[0].split()[2:5]
        assert int(r["answer"]) == (int(a) + int(b) if op == "+" else int(a) - int(b))
        assert r["answer_type"] == "number" and r["tags"][1] == f"digits:{max(len(a), len(b))}"
    fmt = [r for r in arithmetic_rows(6, kinds=("arithmetic", "format")) if "format" in r["tags"]]
    assert fmt and all(r["answer_type"] == "exact" and r["answer"].isupper() for r in fmt)
    with pytest.raises(Exception, match="unknown"):
        build_task("nope", tmp_path / "x.jsonl")


# ---------------------------------------------------------------- multiple choice on the tiny model


def _hand_loglik(model, tok, prompt, continuation):
    """Sum of log p(token) over the continuation's tokens, from one forward pass of prompt+continuation."""
    ctx = tok(prompt)["input_ids"]
    whole = tok(prompt + continuation)["input_ids"]
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([whole])).logits[0].double(), -1)
    return sum(logp[t - 1, whole[t]].item() for t in range(len(ctx), len(whole)))


def test_multiple_choice_scores_equal_hand_computed(model, tiny_tokenizer):
    ex = ChoiceExample("e1", "The minister said the government", ("would act", "will not", "fire"), 1, ("x",))
    other = ChoiceExample("e2", "Police said", ("the fire", "a man was"), 0, ("y",))
    res = score_multiple_choice(model, tiny_tokenizer, [ex, other], batch_size=3)
    lls = [_hand_loglik(model, tiny_tokenizer, ex.prompt, " " + c) for c in ex.choices]
    assert res[0]["loglik"] == pytest.approx(lls, abs=1e-4)
    pred = max(range(3), key=lambda i: lls[i])
    norm = [ll / len(c) for ll, c in zip(lls, ex.choices)]
    assert res[0]["pred"] == pred and res[0]["pred_norm"] == max(range(3), key=lambda i: norm[i])
    assert res[0]["correct"] == float(pred == 1)
    assert res[0]["confidence"] == pytest.approx(math.exp(lls[pred]) / sum(math.exp(v) for v in lls), abs=1e-6)
    # the batch (right padding) does not change a score
    alone = score_multiple_choice(model, tiny_tokenizer, [other], batch_size=1)
    assert alone[0]["loglik"] == pytest.approx(res[1]["loglik"], abs=1e-4)


def test_encode_pair_moves_trailing_space_to_the_continuation(tiny_tokenizer):
    ctx, cont = encode_pair(tiny_tokenizer, "Sentiment: ", "positive")
    assert ctx == tiny_tokenizer("Sentiment:")["input_ids"]
    assert ctx + cont == tiny_tokenizer("Sentiment: positive")["input_ids"]


def test_evaluate_task_results_are_consistent(model, tiny_tokenizer, tmp_path):
    task = read_task(write_task(tmp_path / "sentiment.jsonl", sentiment_rows(seed=0, limit=16)))
    out = evaluate_task(model, tiny_tokenizer, task, batch_size=8)
    ex = out["examples"]
    assert len(ex) == 16 and [e["id"] for e in ex] == [e.id for e in task.examples]
    assert all(e["correct"] == float(e["pred"] == e["answer"]) and 0.5 <= e["confidence"] <= 1 for e in ex)
    assert out["metrics"]["accuracy"] == pytest.approx(sum(e["correct"] for e in ex) / 16)
    lo, hi = out["intervals"]["accuracy"]
    assert lo <= out["metrics"]["accuracy"] <= hi
    pos = [e for e in ex if "label:pos" in e["tags"]]
    assert out["slices"]["label:pos"]["n"] == len(pos)
    assert out["slices"]["label:pos"]["accuracy"] == pytest.approx(sum(e["correct"] for e in pos) / len(pos))
    assert sum(out["reliability"]["count"]) == 16


# ---------------------------------------------------------------- generation on the tiny model


def _hand_greedy(model, tok, prompt, steps):
    ids = tok(prompt)["input_ids"]
    for _ in range(steps):
        with torch.no_grad():
            ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    return tok.decode(ids[len(tok(prompt)["input_ids"]):], skip_special_tokens=True)


def test_generation_equals_hand_greedy_and_scores(model, tiny_tokenizer):
    exs = [GenerationExample("g1", "The minister said", "x"), GenerationExample("g2", "Police", "y"),
           GenerationExample("g3", "What is 2 + 2?", "4", answer_type="number")]
    res = score_generation(model, tiny_tokenizer, exs, max_new_tokens=6, batch_size=3)
    for ex, r in zip(exs, res):
        assert r["response"] == _hand_greedy(model, tiny_tokenizer, ex.prompt, 6)
    # score an example whose answer is the model's own first line: exact match and F1 are 1
    line = next(ln.strip() for ln in res[0]["response"].splitlines() if ln.strip())
    again = score_generation(model, tiny_tokenizer, [GenerationExample("g1", "The minister said", line)],
                             max_new_tokens=6)[0]
    assert again["prediction"] == line and again["exact_match"] == 1.0 and again["token_f1"] == 1.0


def test_summarise_generation_by_hand():
    rows = [{"tags": ["a"], "exact_match": 1.0, "token_f1": 1.0}, {"tags": ["a", "b"], "exact_match": 0.0,
            "token_f1": 0.5}, {"tags": ["b"], "exact_match": 0.0, "token_f1": 0.0}]
    out = summarise("generation", rows)
    assert out["metrics"] == {"exact_match": pytest.approx(1 / 3), "token_f1": pytest.approx(0.5), "n": 3}
    assert out["slices"]["a"] == {"exact_match": 0.5, "token_f1": 0.75, "n": 2}
    assert out["slices"]["b"] == {"exact_match": 0.0, "token_f1": 0.25, "n": 2}
