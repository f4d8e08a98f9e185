"""Task results of several variants, pooled into the shape the gate reads.

``metrics = {variant: {metric: {"value", "interval"}}, "slices": {slice: {variant: {metric: value}}}}``
and ``per_example`` of the same shape with ``{"<task>/<id>": score}`` in place of each value, so a
paired rule lines the variants up by example. Multiple-choice tasks give ``accuracy``,
``accuracy_norm`` and ``answer_ece``/``answer_mce`` (calibration of the answer confidence; ``ece``
is left for next-token calibration); generation tasks give ``exact_match`` and ``token_f1``. Each
is pooled over every example of every task of its kind; slices are each task's name and each tag.
"""

from __future__ import annotations

import math
from collections import defaultdict

from distillery.evaluate.calibration import calibration_errors
from distillery.evaluate.stats import bootstrap_ci

_FIELDS = {"multiple_choice": {"accuracy": "correct", "accuracy_norm": "correct_norm"},
           "generation": {"exact_match": "exact_match", "token_f1": "token_f1"}}


def _scores(task_results: list[dict]) -> tuple[dict, dict, list[tuple[float, float]]]:
    """``{metric: {key: score}}``, ``{slice: set(keys)}`` and (confidence, correct) pairs."""
    scores: dict[str, dict[str, float]] = defaultdict(dict)
    slices: dict[str, set[str]] = defaultdict(set)
    answers = []
    for res in task_results:
        for ex in res["examples"]:
            key = f"{res['task']}/{ex['id']}"
            for metric, field in _FIELDS[res["kind"]].items():
                scores[metric][key] = float(ex[field])
            for name in (res["task"], *ex["tags"]):
                slices[name].add(key)
            if res["kind"] == "multiple_choice":
                answers.append((ex["confidence"], ex["correct"]))
    return scores, slices, answers


def gate_inputs(results: dict[str, list[dict]], *, n_resamples: int = 1000, seed: int = 0) -> tuple[dict, dict]:
    """``(metrics, per_example)`` from ``{variant: [evaluate_task(...) result, ...]}``."""
    metrics: dict = {"slices": defaultdict(dict)}
    per_example: dict = {"slices": defaultdict(dict)}
    for variant, task_results in results.items():
        scores, slices, answers = _scores(task_results)
        metrics[variant], per_example[variant] = {}, dict(scores)
        for metric, by_key in scores.items():
            ci = bootstrap_ci(list(by_key.values()), n_resamples=n_resamples, seed=seed)
            metrics[variant][metric] = {"value": ci["value"], "interval": [ci["low"], ci["high"]]}
        if answers:
            cal = calibration_errors(*zip(*answers))
            metrics[variant].update(answer_ece=cal["ece"], answer_mce=cal["mce"])
        for name, keys in slices.items():
            mine = {m: {k: v for k, v in by_key.items() if k in keys} for m, by_key in scores.items()}
            mine = {m: d for m, d in mine.items() if d}
            per_example["slices"][name][variant] = mine
            metrics["slices"][name][variant] = {m: math.fsum(d.values()) / len(d) for m, d in mine.items()}
    metrics["slices"], per_example["slices"] = dict(metrics["slices"]), dict(per_example["slices"])
    return metrics, per_example
