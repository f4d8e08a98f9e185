"""The evaluate stage's opt-in extras through the real pipeline on tiny models: sequence-level divergence
under greedy and sampled decoding, a perturbation slice, and human review export/import, all gate-able."""

from __future__ import annotations

import copy
import csv
import json
import math

import pytest
import torch

from tests.helpers import tiny_llama, tiny_recipe


@pytest.fixture(autouse=True)
def one_thread():
    # as in test_report: on a loaded machine two threads make each tiny matmul wait on the other (100x slower)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_sequence_divergence_identical_and_different(trained_tiny_teacher, tiny_tokenizer, lee_text):
    from rouge_score import rouge_scorer

    from distillery.evaluate.sequence import sequence_divergence

    ids = tiny_tokenizer(lee_text[:20_000])["input_ids"]
    blocks = torch.tensor(ids[: 6 * 32]).view(6, 32)
    other = tiny_llama(layers=2, seed=3)
    res = sequence_divergence({"copy": copy.deepcopy(trained_tiny_teacher), "other": other}, trained_tiny_teacher,
                              tiny_tokenizer, blocks, prompts=5, prompt_tokens=8, new_tokens=10,
                              sampling={"temperature": 1.0, "top_p": 1.0, "top_k": 0}, seed=1, batch_size=2)
    m = res["metrics"]
    # a separate copy of the teacher draws the same samples: common random numbers
    for name in ("seq_rouge_l_greedy", "seq_exact_match_greedy", "seq_rouge_l_sampling", "seq_exact_match_sampling"):
        assert m["copy"][name]["value"] == 1.0 and len(res["per_example"]["copy"][name]) == 5
    assert res["samples"]["sampling"]["teacher"] != res["samples"]["greedy"]["teacher"]
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    for decoding in ("greedy", "sampling"):
        t, o = res["samples"][decoding]["teacher"], res["samples"][decoding]["other"]
        want = [1.0 if a == b else scorer.score(a, b)["rougeL"].fmeasure for a, b in zip(t, o)]
        assert m["other"][f"seq_rouge_l_{decoding}"]["value"] == pytest.approx(sum(want) / 5)
        assert m["other"][f"seq_exact_match_{decoding}"]["value"] == sum(a == b for a, b in zip(t, o)) / 5
    assert m["other"]["seq_rouge_l_greedy"]["value"] < 1


def test_perturbed_blocks_score_as_hand_encoded_text(trained_tiny_teacher, tiny_tokenizer, lee_text):
    from distillery.evaluate.quality import evaluate_models
    from distillery.evaluate.robustness import perturbed_blocks

    ids = tiny_tokenizer(lee_text[:20_000])["input_ids"]
    blocks = torch.tensor(ids[: 4 * 32]).view(4, 32)
    pairs = perturbed_blocks(tiny_tokenizer, blocks, ("uppercase", "typos"), seed=2)
    assert set(pairs) == {"uppercase", "typos"}
    before, after = pairs["uppercase"]
    got = evaluate_models({}, after, teacher=trained_tiny_teacher)["teacher"]["perplexity"]
    nll = count = 0
    for row in blocks:  # independently: each block's text upper-cased, encoded, scored by transformers' loss
        enc = torch.tensor([tiny_tokenizer(tiny_tokenizer.decode(row.tolist()).upper())["input_ids"]])
        with torch.no_grad():
            loss = trained_tiny_teacher(input_ids=enc, labels=enc).loss.item()
        nll, count = nll + loss * (enc.shape[1] - 1), count + enc.shape[1] - 1
    assert got == pytest.approx(math.exp(nll / count), rel=1e-5)
    # before: the same text encoded the same way (byte-level BPE gives back the blocks' own tokens)
    assert torch.equal(before["input_ids"], blocks) and before["attention_mask"].all()


def test_pooled_scores_equal_scoring_together(trained_tiny_teacher, tiny_tokenizer, lee_text):
    from distillery.evaluate.quality import evaluate_models
    from distillery.evaluate.suite import pool_scores

    ids = tiny_tokenizer(lee_text[:20_000])["input_ids"]
    blocks = torch.tensor(ids[: 6 * 32]).view(6, 32)
    student = {"s": tiny_llama(layers=1, seed=5)}
    parts = [evaluate_models(student, blocks[:2], teacher=trained_tiny_teacher)["s"],
             evaluate_models(student, blocks[2:], teacher=trained_tiny_teacher)["s"]]
    whole = evaluate_models(student, blocks, teacher=trained_tiny_teacher)["s"]
    pooled = pool_scores(parts)
    for m in ("perplexity", "nll", "kl_to_teacher", "top1_agreement", "tokens"):
        assert pooled[m] == pytest.approx(whole[m], rel=1e-9), m


def _recipe(tmp_path, teacher_dir, text, **evaluate):
    # the student keeps every layer: student_init is an exact, separately loaded copy of the teacher
    return tiny_recipe(tmp_path, teacher_dir, text, student={"from_teacher": {"keep_layers": [0, 1, 2, 3]}},
                       distill={"steps": 4, "eval_every": 4, "checkpoint_every": 4},
                       evaluate={"eval_blocks": 6, "calibration": False, **evaluate},
                       gate={"rules": ["seq_rouge_l_sampling >= 0.5", "kl_to_teacher[perturbed] <= 1",
                                       "robust_delta_top1_agreement >= -0.5", "seq_rouge_l_greedy[tail] >= 0",
                                       "seq_exact_match_greedy not worse than student_init (paired)"]})


def test_evaluate_stage_sequence_robustness_review(tiny_teacher_dir, lee_file, tmp_path):
    from distillery.evaluate.review import ReviewError, check_ratings
    from distillery.gate import recipe_problems
    from distillery.pipeline import run_stages
    from distillery.recipe import parse_recipe

    raw = _recipe(tmp_path, tiny_teacher_dir, lee_file,
                  sequence={"prompts": 4, "prompt_tokens": 8, "new_tokens": 8},
                  robustness={"blocks": 4, "kinds": ["lowercase", "typos", "paraphrase"]},
                  slices={"tail": {"kind": "text", "path": str(lee_file)}},
                  review={"prompts": 4, "prompt_tokens": 8, "new_tokens": 6},
                  tasks=[{"name": "sentiment", "limit": 6}])
    r = parse_recipe(raw)
    assert recipe_problems(r) == []
    assert r.intended_sampling() == ({"temperature": 0.7, "top_p": 0.95, "top_k": 0}, "default")
    run_stages(r, progress=False, log=lambda m: None)
    run = r.run_path
    table = json.loads((run / "eval" / "metrics.json").read_text())
    m, per = table["metrics"], table["per_example"]
    init = m["student_init"]
    for name in ("seq_rouge_l_greedy", "seq_exact_match_greedy", "seq_rouge_l_sampling", "seq_exact_match_sampling"):
        assert init[name]["value"] == 1.0 and name in m["student"] and len(per["student"][name]) == 4
    assert m["slices"]["tail"]["student_init"]["seq_rouge_l_sampling"]["value"] == 1.0  # per text slice too
    assert len(per["slices"]["tail"]["student"]["seq_exact_match_greedy"]) == 4
    seq = json.loads((run / "eval" / "sequence.json").read_text())
    assert seq["config"]["sampling_source"] == "default" and len(seq["samples"]["prompts"]) == 4
    assert seq["samples"]["sampling"]["student_init"] == seq["samples"]["sampling"]["teacher"]
    # robustness: an exact copy of the teacher stays at KL 0 and full agreement on the perturbed text
    rob = json.loads((run / "eval" / "robustness.json").read_text())
    assert {"lowercase", "typos"} <= set(rob["student"]) <= {"lowercase", "typos", "paraphrase"}
    assert {"perplexity", "kl_to_teacher", "sentiment/accuracy"} <= set(rob["student"]["typos"])
    slices = m["slices"]
    assert slices["perturbed"]["student_init"]["kl_to_teacher"] == pytest.approx(0, abs=1e-9)
    assert slices["perturbation:typos"]["student_init"]["top1_agreement"] == 1.0
    assert init["robust_delta_kl_to_teacher"] == pytest.approx(0, abs=1e-9)
    lower = rob["teacher"]["lowercase"]["perplexity"]
    assert lower["change"] == pytest.approx(lower["after"] - lower["before"]) and 1 <= lower["n"] <= 4
    assert "accuracy" in slices["perturbed"]["student"] and per["slices"]["perturbed"]["student"]["accuracy"]
    # the perturbed task accuracy change is the mean paired difference over the perturbed rows
    pert = per["slices"]["perturbed"]["student"]["accuracy"]
    want = sum(s - per["student"]["accuracy"][k.split("~")[0]] for k, s in pert.items()) / len(pert)
    assert m["student"]["robust_delta_accuracy"] == pytest.approx(want)
    gate = json.loads((run / "gate.json").read_text())
    assert [x["verdict"] for x in gate["rules"]] == ["pass"] * 5, gate
    # review: exported for raters, sides hidden; ratings back as a gate-able metric
    key = json.loads((run / "eval" / "review" / "review_key.json").read_text())
    assert key["variants"] == ["teacher", "student"] and "human_win_rate" not in m["student"]
    rated = tmp_path / "rated.csv"
    rows = list(csv.DictReader((run / "eval" / "review" / "review.csv").open(newline="")))
    for i, row in enumerate(rows):  # the student wins items 0 and 1, loses 2, tie on 3
        side = next(s for s, v in key["key"][row["id"]].items() if v == "student")
        row["rating"] = side if i < 2 else ("tie" if i == 3 else "AB".replace(side, ""))
    with rated.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    raw["evaluate"]["review"]["ratings"] = str(rated)
    raw["gate"]["rules"].append("human_win_rate >= 0.6")
    r = parse_recipe(raw)
    assert recipe_problems(r) == []
    run_stages(r, ["evaluate", "gate"], progress=False, log=lambda m: None)
    m = json.loads((run / "eval" / "metrics.json").read_text())["metrics"]
    assert m["student"]["human_win_rate"]["value"] == pytest.approx(2.5 / 4)
    assert json.loads((run / "gate.json").read_text())["rules"][-1]["verdict"] == "pass"
    assert json.loads((run / "eval" / "review.json").read_text())["student"]["wins"] == 2
    rows[0]["response_a"] += " (edited)"
    with rated.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    with pytest.raises(ReviewError, match=r"rated.csv:2: field 'response_a' differs"):  # what the stage checks
        check_ratings(rated, run / "eval" / "review" / "review.jsonl")


def test_unknown_names_refused(tiny_teacher_dir, lee_file, tmp_path):
    from distillery.gate import recipe_problems
    from distillery.recipe import RecipeError, parse_recipe

    raw = _recipe(tmp_path, tiny_teacher_dir, lee_file)  # no extras: their metrics and slices are unknown
    problems = recipe_problems(parse_recipe(raw))
    assert any("unknown metric 'seq_rouge_l_sampling'" in p for p in problems)
    assert any("unknown slice 'perturbed'" in p for p in problems)
    raw["gate"]["rules"] = ["human_win_rate >= 0.5"]
    raw["evaluate"]["review"] = {}
    assert any("unknown metric 'human_win_rate'" in p for p in recipe_problems(parse_recipe(raw)))
    raw["evaluate"]["review"] = {"variant": "teacher"}
    with pytest.raises(RecipeError, match="evaluate.review: the rated variant and 'against' are both 'teacher'"):
        parse_recipe(raw)
    raw["evaluate"]["review"] = {"against": "nope"}
    with pytest.raises(RecipeError, match="evaluate.review.against: 'nope' is not evaluated"):
        parse_recipe(raw)
    raw["evaluate"]["review"] = {}
    raw["generate"] = {"decoding": [{"name": "g"}, {"name": "s", "do_sample": True, "temperature": 0.5,
                                                     "top_p": 0.9, "top_k": 20}]}
    assert parse_recipe(raw).intended_sampling() == ({"temperature": 0.5, "top_p": 0.9, "top_k": 20},
                                                     "generate.decoding[1] (s)")
