"""The evaluate stage's work: every variant scored the same way, in the numeric format it ships in, and
everything merged into one table the gate and the report read.

Files (under ``eval/``): ``summary.json`` (held-out perplexity, KL to the teacher, top-1 agreement),
``slices.json`` (the same on each text slice), ``calibration.json`` (next-token ECE/MCE and reliability
bins), ``tasks.json`` (each task's summary per variant; per-example results in ``tasks/<variant>.json``),
``speed.json`` (operational metrics), and ``metrics.json``: ``{"metrics": {variant: {metric: value or
{value, interval}}, "slices": {...}}, "per_example": {...}}``, what gate rules are evaluated on.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import torch

from distillery.evaluate.quality import Examples, evaluate_models, head
from distillery.io import atomic_write_json


def evaluate_variants(cfg, run: Path, models: dict[str, torch.nn.Module], teacher: torch.nn.Module, tokenizer,
                      held: Examples, slices: dict[str, torch.Tensor], *, with_teacher: bool = True,
                      teacher_folder: Path | None = None, log: Callable[[str], None] = print,
                      progress: bool = False) -> list[str]:
    """Score ``models`` and, ``with_teacher``, the teacher (as ``teacher``; it is always the reference of the
    KL and agreement), and write the files above; returns their paths relative to ``run``."""
    wanted = (["teacher"] if with_teacher else []) + list(models)
    everyone = {"teacher": teacher, **models}
    held = head(held, cfg.eval_blocks)
    summary = _only(evaluate_models(models, held, teacher=teacher, batch_size=cfg.batch_size, progress=progress),
                    wanted)
    units = text_units(tokenizer, held)
    for m in summary.values():
        m.update(per_text_unit(m, units))
    outputs = {"eval/summary.json": summary}
    metrics: dict = {v: dict(m) for v, m in summary.items()}
    metrics["slices"], per_example = {}, {"slices": {}}
    if slices:
        table = {}
        for name, blocks in slices.items():
            table[name] = _only(evaluate_models(models, blocks[: cfg.eval_blocks], teacher=teacher,
                                                batch_size=cfg.batch_size, progress=progress), wanted)
            metrics["slices"][name] = table[name]
            for variant, m in table[name].items():
                log(f"evaluate: [{name}] {variant:13s} perplexity {m['perplexity']:12.2f}   "
                    f"KL to teacher {m['kl_to_teacher']:.4f}")
        outputs["eval/slices.json"] = table
    if cfg.calibration:
        from distillery.evaluate.calibration import next_token_calibration

        cal = {v: next_token_calibration(everyone[v], held, batch_size=cfg.batch_size) for v in wanted}
        for v, c in cal.items():
            metrics[v].update(ece=c["ece"], mce=c["mce"])
        outputs["eval/calibration.json"] = cal
    if cfg.tasks:
        task_metrics, per_example = _tasks(cfg, run, {v: everyone[v] for v in wanted}, tokenizer, outputs, log)
        for v in wanted:
            metrics[v].update(task_metrics.get(v, {}))
        metrics["slices"].update(task_metrics.get("slices", {}))
    if cfg.tasks:
        outputs["eval/paired.json"] = paired_comparisons(per_example, seed=cfg.tasks[0].seed)
    if cfg.speed is not None:
        from distillery.evaluate.speed import measure_variants

        speed = measure_variants({v: everyone[v] for v in wanted}, tokenizer, cfg.speed, run=run, log=log,
                                 folders={"teacher": teacher_folder} if teacher_folder else None)
        for v, m in speed.items():
            metrics[v].update(m.get("metrics", {}))
        outputs["eval/speed.json"] = speed
    outputs["eval/metrics.json"] = {"metrics": metrics, "per_example": per_example}
    for path, data in outputs.items():
        if data is not None:
            atomic_write_json(run / path, data)
    for name, m in summary.items():
        log(f"evaluate: {name:13s} perplexity {m['perplexity']:12.2f}   KL to teacher {m['kl_to_teacher']:.4f}"
            f"   top-1 agreement {m['top1_agreement']:.3f}" + (f"   ECE {metrics[name]['ece']:.4f}"
                                                             if "ece" in metrics[name] else ""))
    return sorted(outputs)


def text_units(tokenizer, examples: Examples) -> dict[str, int]:
    """UTF-8 bytes and whitespace-separated words of the text the scored tokens spell (position t predicts
    token t+1; prompt and padding targets are not scored), so models with different tokenizers compare."""
    ids = examples["input_ids"]
    labels = examples.get("labels")
    mask = examples.get("attention_mask")
    n_bytes = n_words = 0
    for i in range(len(ids)):
        keep = torch.ones(ids.shape[1] - 1, dtype=torch.bool)
        if labels is not None:
            keep &= labels[i, 1:] != -100
        if mask is not None:
            keep &= mask[i, 1:].bool()
        text = tokenizer.decode(ids[i, 1:][keep].tolist())
        n_bytes += len(text.encode("utf-8"))
        n_words += len(text.split())
    return {"bytes": n_bytes, "words": n_words}


def per_text_unit(scores: dict, units: dict[str, int]) -> dict[str, float]:
    """Bits per byte and word-level perplexity from a model's mean token NLL over ``scores["tokens"]``."""
    total = scores["nll"] * scores["tokens"]
    return {"bits_per_byte": total / (units["bytes"] * math.log(2)) if units["bytes"] else math.nan,
            "word_perplexity": math.exp(total / units["words"]) if units["words"] else math.nan}


def paired_comparisons(per_example: dict, *, against: tuple[str, ...] = ("teacher", "student_init"),
                       seed: int = 0) -> list[dict]:
    """Every variant against the teacher and the cut student on the same examples, per metric: the
    difference, its paired-bootstrap interval, and McNemar's exact p for 0/1 scores (else the bootstrap's)."""
    from distillery.evaluate.stats import mcnemar, paired_bootstrap

    rows = []
    variants = [v for v in per_example if v != "slices"]
    for base in against:
        for v in variants:
            if v == base or base not in per_example:
                continue
            for metric, scores in per_example[v].items():
                theirs = per_example[base].get(metric, {})
                keys = [k for k in scores if k in theirs]
                if not keys:
                    continue
                a, b = [scores[k] for k in keys], [theirs[k] for k in keys]
                boot = paired_bootstrap(a, b, seed=seed)
                binary = all(x in (0, 1) for x in a + b)
                rows.append({"variant": v, "against": base, "metric": metric, "difference": boot["difference"],
                             "interval": [boot["low"], boot["high"]],
                             "p_value": mcnemar(a, b)["p_value"] if binary else boot["p_value"],
                             "test": "mcnemar" if binary else "paired_bootstrap", "n": len(keys)})
    return rows


def _only(results: dict, wanted: list[str]) -> dict:
    return {k: v for k, v in results.items() if k in wanted}


def _tasks(cfg, run: Path, models: dict, tokenizer, outputs: dict, log) -> tuple[dict, dict]:
    from distillery.evaluate.collect import gate_inputs
    from distillery.evaluate.task_builders import build_task
    from distillery.evaluate.tasks import evaluate_task, read_task

    results: dict[str, list[dict]] = {v: [] for v in models}
    for t in cfg.tasks:
        path = run / "eval" / "tasks" / f"{t.name}.jsonl"
        build_task(t.name, path, seed=t.seed, **task_size(t))
        task = read_task(path, t.name)
        for v, model in models.items():
            res = evaluate_task(model, tokenizer, task, batch_size=t.batch_size, seed=t.seed)
            results[v].append(res)
            main = res["metrics"].get("accuracy", res["metrics"].get("exact_match"))
            log(f"evaluate: [{t.name}] {v:13s} {len(res['examples'])} examples, "
                f"{'accuracy' if 'accuracy' in res['metrics'] else 'exact match'} {main:.3f}")
        outputs[f"eval/tasks/{t.name}.jsonl"] = None  # written by build_task; listed as an output
    outputs["eval/tasks.json"] = {v: [{k: x for k, x in r.items() if k != "examples"} for r in rs]
                                  for v, rs in results.items()}
    for v, rs in results.items():
        outputs[f"eval/tasks/{v}.json"] = rs
    return gate_inputs(results, seed=cfg.tasks[0].seed)


def task_size(t) -> dict:
    """The builder's size option for a TaskConfig: sentiment takes ``limit`` (of its 200 sentences), the
    others ``n`` (how many to build)."""
    if t.limit is None:
        return {}
    return {"limit": t.limit} if t.name == "sentiment" else {"n": t.limit}
