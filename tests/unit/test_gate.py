"""Gate rules: the grammar and its errors, each kind of comparison, paired rules (McNemar, paired
bootstrap), validation against known names, exit codes and gate.json."""

import json
import re

import numpy as np
import pytest
from scipy import stats as sps

from distillery.gate import (Operand, RuleError, check_rules, evaluate_rules, exit_code, format_table, parse_rule,
                             write_gate)

METRICS = {
    "teacher": {"accuracy": 0.80, "kl_to_teacher": 0.0, "ece": 0.05, "latency_p99": 0.40},
    "student_init": {"accuracy": 0.50, "kl_to_teacher": 2.9, "ece": 0.20, "latency_p99": 0.19},
    "student": {"accuracy": {"value": 0.78, "interval": [0.70, 0.85]}, "kl_to_teacher": 0.75, "ece": 0.06,
                "latency_p99": 0.21},
    "slices": {"label:pos": {"student": {"accuracy": 0.9}, "teacher": {"accuracy": 0.95}}},
}


def verdicts(rules, subject="student", per_example=None):
    return [r["verdict"] for r in evaluate_rules(rules, METRICS, subject, per_example)]


# ---------------------------------------------------------------- grammar


def test_parse_every_form():
    r = parse_rule("accuracy >= 0.95 * teacher.accuracy")
    assert (r.left, r.op, r.right, r.scale, r.offset) == (Operand(None, "accuracy"), ">=",
                                                          Operand("teacher", "accuracy"), 0.95, 0.0)
    r = parse_rule("ece <= teacher.ece + 0.02")
    assert (r.right.variant, r.scale, r.offset) == ("teacher", 1.0, 0.02)
    r = parse_rule("ece <= teacher.ece * 2 - 1e-2")
    assert (r.scale, r.offset) == (2.0, -0.01)
    r = parse_rule("accuracy[gram6-nationality-adjective] > -0.5")
    assert (r.left.slice, r.right, r.offset) == ("gram6-nationality-adjective", None, -0.5)
    r = parse_rule("  accuracy not worse than student_init (paired, p < 0.01) ")
    assert (r.op, r.against, r.alpha, r.paired) == ("not_worse", "student_init", 0.01, True)
    r = parse_rule("token_f1[arithmetic] better than student_init (paired)")
    assert (r.op, r.left.slice, r.alpha) == ("better", "arithmetic", 0.05)


@pytest.mark.parametrize("text,message", [
    ("accuracy", "expected a comparison"),
    ("accuracy >=", "expected a metric name, found 'the end'"),
    ("accuracy >= 0.9 0.8", "expected the end of the rule, found '0.8'"),
    ("accuracy => 0.9", "cannot read"),
    ("accuracy >= teacher.", "expected a metric name after '.'"),
    ("accuracy[] >= 0.5", "empty slice"),
    ("accuracy not better than teacher (paired)", "expected 'worse' after 'not'"),
    ("accuracy not worse than teacher", "expected '(paired'"),
    ("accuracy not worse than teacher (paired, p < 2)", "p must be below a level in"),
    ("accuracy >= 0.9; import os", "cannot read"),
    ("", "empty"),
])
def test_parse_errors_name_the_rule(text, message):
    with pytest.raises(RuleError, match=re.escape(message)) as e:
        parse_rule(text)
    assert repr(text.strip()) in str(e.value)


def test_check_rules_names_unknown_metric_variant_and_slice():
    rules = ["accuracy >= 0.9 * teacher.accuracy", "acc >= 0.5", "ece <= techer.ece + 0.02",
             "accuracy[long] >= 0.5", "accuracy not worse than base (paired)", "kl_to_teacher <<= 1"]
    errors = check_rules(rules, {"accuracy", "ece", "kl_to_teacher"}, {"teacher", "student", "student_init"},
                         {"label:pos"})
    assert errors[0].startswith("rules[1] 'acc >= 0.5': unknown metric 'acc' (known: accuracy, ece, kl_to_teacher)")
    assert errors[1].startswith("rules[2] 'ece <= techer.ece + 0.02': unknown variant 'techer'")
    assert errors[2].startswith("rules[3] 'accuracy[long] >= 0.5': unknown slice 'long' (known: label:pos)")
    assert errors[3].startswith("rules[4] 'accuracy not worse than base (paired)': unknown variant 'base'")
    assert errors[4].startswith("rules[5] 'kl_to_teacher <<= 1':")
    assert len(errors) == 5
    assert check_rules(rules[:1], {"accuracy"}, {"teacher"}) == []


# ---------------------------------------------------------------- comparisons


def test_each_comparison_kind():
    res = evaluate_rules(["kl_to_teacher <= 0.8", "accuracy >= 0.95 * teacher.accuracy",
                          "latency_p99 <= 0.5 * teacher.latency_p99", "ece <= teacher.ece + 0.02",
                          "accuracy[label:pos] >= 0.5", "accuracy[label:pos] >= teacher.accuracy[label:pos]",
                          "student_init.kl_to_teacher > 2 * kl_to_teacher", "accuracy == 0.78"], METRICS, "student")
    assert [r["verdict"] for r in res] == ["pass", "pass", "fail", "pass", "pass", "fail", "pass", "pass"]
    assert res[1]["value"] == 0.78 and res[1]["threshold"] == pytest.approx(0.76)
    assert res[1]["interval"] == [0.70, 0.85]  # the subject's own interval, where the metrics carry one
    assert res[2]["threshold"] == pytest.approx(0.20) and res[2]["value"] == 0.21
    assert res[3]["threshold"] == pytest.approx(0.07)
    assert res[6]["value"] == 2.9 and res[6]["threshold"] == pytest.approx(1.5)
    # the same rules on the cut student: KL, accuracy and calibration fail
    assert verdicts(["kl_to_teacher <= 0.8", "accuracy >= 0.95 * teacher.accuracy", "ece <= teacher.ece + 0.02"],
                    "student_init") == ["fail", "fail", "fail"]


def test_missing_values_are_errors_naming_the_rule():
    res = evaluate_rules(["accuracy[long] >= 0.5", "perplexity <= 60", "accuracy >= 0.9 * base.accuracy",
                          "accuracy not worse than teacher (paired)"], METRICS, "student")
    assert [r["verdict"] for r in res] == ["error"] * 4
    assert res[0]["error"] == "gate rule 'accuracy[long] >= 0.5': no metric for slice 'long'"
    assert "variant 'student' has no metric 'perplexity'" in res[1]["error"]
    assert "no metric for variant 'base'" in res[2]["error"]
    assert "needs per-example scores" in res[3]["error"]


# ---------------------------------------------------------------- paired rules


def _paired_outcomes(b, c, both_right=30, both_wrong=10):
    """Per-example 0/1 correctness with b (subject right, other wrong) and c (the reverse) discordant."""
    subject = [1] * b + [0] * c + [1] * both_right + [0] * both_wrong
    other = [0] * b + [1] * c + [1] * both_right + [0] * both_wrong
    return subject, other


@pytest.mark.parametrize("b,c,not_worse,better", [(3, 15, "fail", "fail"), (15, 3, "pass", "pass"),
                                                   (6, 9, "pass", "fail"), (0, 0, "pass", "fail")])
def test_paired_rule_uses_mcnemar(b, c, not_worse, better):
    subject, other = _paired_outcomes(b, c)
    per_example = {"student": {"accuracy": subject}, "student_init": {"accuracy": other}}
    res = evaluate_rules(["accuracy not worse than student_init (paired, p < 0.05)",
                          "accuracy better than student_init (paired)"], METRICS, "student", per_example)
    assert [r["verdict"] for r in res] == [not_worse, better]
    r = res[0]
    assert r["test"] == "mcnemar" and r["n"] == len(subject) and r["threshold"] == 0.05
    assert r["p_value"] == pytest.approx(1.0 if b + c == 0 else sps.binomtest(b, b + c, 0.5).pvalue)
    assert r["value"] == pytest.approx((b - c) / len(subject))
    assert r["interval"][0] <= r["value"] <= r["interval"][1]


def test_paired_rule_by_id_on_a_slice_and_lower_is_better():
    # per-example dicts keyed by id line up whatever their order
    subject = {f"e{i}": v for i, v in enumerate([1, 1, 1, 1, 1, 1, 1, 0])}
    other = {f"e{i}": 0 for i in reversed(range(8))}
    per_example = {"slices": {"label:pos": {"student": {"accuracy": subject}, "teacher": {"accuracy": other}}}}
    r = evaluate_rules(["accuracy[label:pos] better than teacher (paired)"], METRICS, "student", per_example)[0]
    assert r["verdict"] == "pass" and r["p_value"] == pytest.approx(2 / 2 ** 7)  # b = 7, c = 0
    # a per-example loss (continuous, lower is better): the paired bootstrap, and lower wins
    rng = np.random.default_rng(0)
    base = rng.gamma(2.0, 1.0, 300)
    per_example = {"student": {"nll": (base - 0.3).tolist()},
                   "student_init": {"nll": (base + rng.normal(0, 0.1, 300)).tolist()}}
    res = evaluate_rules(["nll better than student_init (paired)", "nll not worse than student_init (paired)"],
                         {}, "student", per_example)
    assert [r["verdict"] for r in res] == ["pass", "pass"] and res[0]["test"] == "paired_bootstrap"
    assert res[0]["value"] < 0 and res[0]["p_value"] < 0.01
    res = evaluate_rules(["nll not worse than student (paired)"], {}, "student_init", per_example)
    assert res[0]["verdict"] == "fail"


def test_paired_rule_refuses_misaligned_examples():
    per_example = {"student": {"accuracy": {"a": 1, "b": 0}}, "teacher": {"accuracy": {"a": 1, "c": 1}}}
    r = evaluate_rules(["accuracy not worse than teacher (paired)"], METRICS, "student", per_example)[0]
    assert r["verdict"] == "error" and "scored on different examples (2 ids not in both)" in r["error"]
    per_example = {"student": {"accuracy": [1, 0, 1]}, "teacher": {"accuracy": [1, 0]}}
    r = evaluate_rules(["accuracy not worse than teacher (paired)"], METRICS, "student", per_example)[0]
    assert r["verdict"] == "error" and "do not line up" in r["error"]


# ---------------------------------------------------------------- exit codes and gate.json


def test_exit_codes_and_gate_json(tmp_path):
    passing = evaluate_rules(["kl_to_teacher <= 0.8", "ece <= teacher.ece + 0.02"], METRICS, "student")
    failing = passing + evaluate_rules(["latency_p99 <= 0.5 * teacher.latency_p99"], METRICS, "student")
    bad = failing + evaluate_rules(["accuracy >= 0.9 *"], METRICS, "student")
    assert (exit_code(passing), exit_code(failing), exit_code(bad), exit_code([])) == (0, 1, 2, 0)
    write_gate(tmp_path / "gate.json", bad)
    out = json.loads((tmp_path / "gate.json").read_text())
    assert out["passed"] is False and out["exit_code"] == 2 and len(out["rules"]) == 4
    assert out["rules"][2]["verdict"] == "fail" and out["rules"][2]["threshold"] == pytest.approx(0.2)
    assert out["rules"][3]["rule"] == "accuracy >= 0.9 *" and "expected a metric name" in out["rules"][3]["error"]
    assert not list(tmp_path.glob(".*.tmp"))
    table = format_table(bad).splitlines()
    assert table[0].split() == ["verdict", "rule", "value", "threshold", "interval", "p"]
    assert table[3].startswith("FAIL") and "latency_p99" in table[3] and table[4].startswith("ERROR")


# ---------------------------------------------------------------- from task results to a verdict


def test_gate_on_task_results_of_two_tiny_models(tiny_tokenizer, tmp_path):
    from distillery.evaluate.collect import gate_inputs
    from distillery.evaluate.task_builders import arithmetic_rows, sentiment_rows
    from distillery.evaluate.tasks import evaluate_task, read_task, write_task
    from tests.helpers import tiny_llama

    tasks = [read_task(write_task(tmp_path / "sentiment.jsonl", sentiment_rows(limit=10))),
             read_task(write_task(tmp_path / "arithmetic.jsonl", arithmetic_rows(4)))]
    results = {name: [evaluate_task(tiny_llama(seed=seed), tiny_tokenizer, t, max_new_tokens=3) for t in tasks]
               for name, seed in (("teacher", 1), ("student", 2))}
    metrics, per_example = gate_inputs(results)
    for variant, (mc, gen) in results.items():
        assert metrics[variant]["accuracy"]["value"] == pytest.approx(mc["metrics"]["accuracy"])
        assert metrics[variant]["exact_match"]["value"] == pytest.approx(gen["metrics"]["exact_match"])
        assert metrics[variant]["answer_ece"] == pytest.approx(mc["metrics"]["ece"])
        pos = metrics["slices"]["label:pos"][variant]
        assert pos["accuracy"] == pytest.approx(mc["slices"]["label:pos"]["accuracy"])
        assert metrics["slices"]["sentiment"][variant] == {
            "accuracy": pytest.approx(mc["metrics"]["accuracy"]),
            "accuracy_norm": pytest.approx(mc["metrics"]["accuracy_norm"])}
        assert len(per_example[variant]["accuracy"]) == 10 and len(per_example[variant]["token_f1"]) == 4
    teacher = [e["correct"] for e in results["teacher"][0]["examples"]]
    student = [e["correct"] for e in results["student"][0]["examples"]]
    rules = ["accuracy not worse than teacher (paired, p < 0.05)", "accuracy[label:neg] >= 0",
             "accuracy >= teacher.accuracy + 1.01", "answer_ece <= 1"]  # the third cannot pass
    assert check_rules(rules, {m for v in ("teacher", "student") for m in metrics[v]}, results,
                       metrics["slices"]) == []
    res = evaluate_rules(rules, metrics, "student", per_example)
    assert res[0]["test"] == "mcnemar" and res[0]["n"] == 10
    b = sum(s == 1 and t == 0 for s, t in zip(student, teacher))
    c = sum(s == 0 and t == 1 for s, t in zip(student, teacher))
    assert res[0]["p_value"] == pytest.approx(1.0 if b + c == 0 else sps.binomtest(b, b + c, 0.5).pvalue)
    assert [r["verdict"] for r in res[1:]] == ["pass", "fail", "pass"]
    assert exit_code(res) == 1
