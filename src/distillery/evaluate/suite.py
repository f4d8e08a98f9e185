"""The evaluate stage's work: every variant scored the same way, in the numeric format it ships in, and
everything merged into one table the gate and the report read.

Files (under ``eval/``): ``summary.json`` (held-out perplexity, KL to the teacher, top-1 agreement),
``slices.json`` (the same on each text slice), ``calibration.json`` (next-token ECE/MCE and reliability
bins), ``tasks.json`` (each task's summary per variant; per-example results in ``tasks/<variant>.json``),
``speed.json`` (operational metrics); opt-in: ``sequence.json`` (teacher/variant generations compared),
``robustness.json`` (each metric's change on a perturbation slice), ``review/`` (paired samples for
raters) and ``review.json`` (imported ratings); and ``metrics.json``: ``{"metrics": {variant: {metric: value or
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
                      progress: bool = False, sampling: tuple[dict, str] | None = None,
                      reviewed: str | None = None) -> list[str]:
    """Score ``models`` and, ``with_teacher``, the teacher (as ``teacher``; it is always the reference of the
    KL and agreement), and write the files above; returns their paths relative to ``run``. ``sampling``:
    the intended sampling settings and where they came from (``Recipe.intended_sampling()``) for
    ``cfg.sequence``; ``reviewed``: the
    variant ``cfg.review`` rates when it names none."""
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
            metrics["slices"][name] = {v: dict(m) for v, m in table[name].items()}  # slices.json stays as is
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
    task_results: dict = {}
    if cfg.tasks:
        task_metrics, per_example, task_results = _tasks(cfg, run, {v: everyone[v] for v in wanted}, tokenizer,
                                                         outputs, log)
        for v in wanted:
            metrics[v].update(task_metrics.get(v, {}))
        metrics["slices"].update(task_metrics.get("slices", {}))
    if cfg.sequence is not None:
        _sequence(cfg, {v: everyone[v] for v in wanted}, teacher, tokenizer, held, slices, sampling, metrics,
                  per_example, outputs, log)
    if cfg.robustness is not None:
        _robustness(cfg, run, {v: everyone[v] for v in wanted}, teacher, tokenizer, held, task_results, metrics,
                    per_example, outputs, log)
    if cfg.review is not None:
        _review(cfg, run, everyone, tokenizer, held, reviewed or "student", metrics, outputs, log)
    if cfg.tasks or cfg.sequence is not None:
        outputs["eval/paired.json"] = paired_comparisons(
            per_example, seed=cfg.tasks[0].seed if cfg.tasks else cfg.sequence.seed)
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


def _sequence(cfg, models: dict, teacher, tokenizer, held: Examples, slices: dict, sampling: tuple[dict, str] | None,
              metrics: dict, per_example: dict, outputs: dict, log) -> None:
    """Teacher and variant continuations of held-out prompts compared (evaluate/sequence.py), on the held-out
    blocks and on every text slice."""
    from distillery.evaluate.sequence import sequence_divergence
    from distillery.recipe import SamplingConfig

    sc = cfg.sequence
    settings, source = sampling or ((sc.sampling or SamplingConfig()).model_dump(), "evaluate.sequence")
    kw = {"prompts": sc.prompts, "prompt_tokens": sc.prompt_tokens, "new_tokens": sc.new_tokens,
          "sampling": settings, "seed": sc.seed, "batch_size": sc.batch_size}
    res = sequence_divergence(models, teacher, tokenizer, held, **kw)
    for v, m in res["metrics"].items():
        metrics[v].update(m)
        per_example.setdefault(v, {}).update(res["per_example"][v])
        log(f"evaluate: [sequence] {v:13s} ROUGE-L greedy {m['seq_rouge_l_greedy']['value']:.3f} sampled "
            f"{m['seq_rouge_l_sampling']['value']:.3f}   exact match greedy {m['seq_exact_match_greedy']['value']:.3f}"
            f" sampled {m['seq_exact_match_sampling']['value']:.3f}")
    table = {"config": {**kw, "sampling_source": source}, "metrics": res["metrics"], "samples": res["samples"],
             "slices": {}}
    for name, blocks in slices.items():
        r = sequence_divergence(models, teacher, tokenizer, blocks[: cfg.eval_blocks], prefix=f"{name}/", **kw)
        for v, m in r["metrics"].items():
            metrics["slices"].setdefault(name, {}).setdefault(v, {}).update(m)
            per_example["slices"].setdefault(name, {}).setdefault(v, {}).update(r["per_example"][v])
        table["slices"][name] = {"metrics": r["metrics"], "samples": r["samples"]}
    outputs["eval/sequence.json"] = table


TEXT_METRICS = ("perplexity", "nll", "kl_to_teacher", "top1_agreement")


def pool_scores(scores: list[dict]) -> dict:
    """evaluate_models results over disjoint token sets, pooled as if scored together (each is a mean
    per token, so weights are token counts; perplexity from the pooled NLL)."""
    n = sum(s["tokens"] for s in scores)
    nll = math.fsum(s["nll"] * s["tokens"] for s in scores) / n
    out = {"perplexity": math.exp(nll), "nll": nll, "tokens": n}
    for m in ("kl_to_teacher", "top1_agreement"):
        if all(m in s for s in scores):
            out[m] = math.fsum(s[m] * s["tokens"] for s in scores) / n
    return out


def _robustness(cfg, run: Path, models: dict, teacher, tokenizer, held: Examples, task_results: dict,
                metrics: dict, per_example: dict, outputs: dict, log) -> None:
    """Perturbed copies of held-out blocks (and of every task's rows) scored beside the same rows
    unperturbed: ``robustness.json`` ``{variant: {kind: {metric: change}}}`` (task metrics as
    ``<task>/<metric>``), slices ``perturbed`` and ``perturbation:<kind>``, and ``robust_delta_<metric>``
    (perturbed minus unperturbed, every kind pooled)."""
    from distillery.evaluate.robustness import metric_changes, perturbed_blocks, teacher_paraphraser

    rc = cfg.robustness
    paraphrase = teacher_paraphraser(teacher, tokenizer) if "paraphrase" in rc.kinds else None
    limit = getattr(getattr(teacher, "config", None), "max_position_embeddings", None)
    pairs = perturbed_blocks(tokenizer, head(held, rc.blocks), rc.kinds, seed=rc.seed, typo_rate=rc.typo_rate,
                             paraphrase=paraphrase, max_tokens=limit)
    changes: dict = {v: {} for v in models}
    pooled: dict = {v: ([], []) for v in models}
    for kind, (before, after) in pairs.items():
        b = evaluate_models(models, before, teacher=teacher, batch_size=cfg.batch_size)
        a = evaluate_models(models, after, teacher=teacher, batch_size=cfg.batch_size)
        for v in models:
            changes[v][kind] = metric_changes({m: b[v][m] for m in TEXT_METRICS}, {m: a[v][m] for m in TEXT_METRICS})
            for row in changes[v][kind].values():
                row["n"] = len(before["input_ids"])
            metrics["slices"].setdefault(f"perturbation:{kind}", {})[v] = {m: a[v][m] for m in TEXT_METRICS}
            pooled[v][0].append(b[v])
            pooled[v][1].append(a[v])
    for v in models:
        if pooled[v][0]:
            pb, pa = pool_scores(pooled[v][0]), pool_scores(pooled[v][1])
            metrics["slices"].setdefault("perturbed", {})[v] = {m: pa[m] for m in TEXT_METRICS}
            metrics[v].update({f"robust_delta_{m}": pa[m] - pb[m] for m in TEXT_METRICS})
            log(f"evaluate: [perturbed] {v:13s} perplexity {pb['perplexity']:.2f} -> {pa['perplexity']:.2f}   "
                f"KL to teacher {pb['kl_to_teacher']:.4f} -> {pa['kl_to_teacher']:.4f}")
    if task_results:
        _perturbed_tasks(cfg, run, models, tokenizer, task_results, paraphrase, changes, metrics, per_example,
                         outputs, log)
    outputs["eval/robustness.json"] = changes


def _perturbed_tasks(cfg, run: Path, models: dict, tokenizer, task_results: dict, paraphrase, changes: dict,
                     metrics: dict, per_example: dict, outputs: dict, log) -> None:
    from distillery.evaluate.collect import gate_inputs
    from distillery.evaluate.robustness import changes_by_perturbation, perturbation_slice
    from distillery.evaluate.tasks import evaluate_task, example_rows, read_task, write_task

    rc = cfg.robustness
    results: dict[str, list[dict]] = {v: [] for v in models}
    for i, t in enumerate(cfg.tasks):
        rows = perturbation_slice(example_rows(read_task(run / "eval" / "tasks" / f"{t.name}.jsonl", t.name)),
                                  rc.kinds, seed=rc.seed, typo_rate=rc.typo_rate, paraphrase=paraphrase)
        if not rows:
            continue
        rel = f"eval/tasks/{t.name}~perturbed.jsonl"
        task = read_task(write_task(run / rel, rows), t.name)
        outputs[rel] = None  # written above; listed as an output
        for v, model in models.items():
            res = evaluate_task(model, tokenizer, task, batch_size=t.batch_size, seed=t.seed)
            results[v].append(res)
            for kind, by_metric in changes_by_perturbation(task_results[v][i]["examples"], res["examples"],
                                                           seed=rc.seed).items():
                changes[v].setdefault(kind, {}).update({f"{t.name}/{m}": c for m, c in by_metric.items()})
    if not any(results.values()):
        return
    pert_metrics, pert_examples = gate_inputs(results, seed=rc.seed)
    for name, by_variant in pert_metrics["slices"].items():
        if name == "perturbed" or name.startswith("perturbation:"):  # not the tags the rows kept
            for v in by_variant:
                metrics["slices"].setdefault(name, {}).setdefault(v, {}).update(by_variant[v])
                per_example["slices"].setdefault(name, {}).setdefault(v, {}).update(pert_examples["slices"][name][v])
    for v in models:
        for metric, scores in pert_examples[v].items():
            base = per_example[v][metric]
            diffs = [s - base[k.split("~", 1)[0]] for k, s in scores.items()]
            metrics[v][f"robust_delta_{metric}"] = math.fsum(diffs) / len(diffs)
            log(f"evaluate: [perturbed tasks] {v:13s} {metric} change {metrics[v][f'robust_delta_{metric}']:+.3f}")


def _review(cfg, run: Path, everyone: dict, tokenizer, held: Examples, reviewed: str, metrics: dict,
            outputs: dict, log) -> None:
    """Paired greedy continuations of held-out prompts exported for raters (``eval/review/``); a filled
    ratings file imported as the rated variant's ``human_win_rate`` (``eval/review.json``)."""
    from distillery.evaluate.review import check_ratings, export_review, generate_pairs, import_ratings
    from distillery.evaluate.sequence import heldout_prompts

    rc = cfg.review
    subject = rc.variant or reviewed
    for field, name in (("variant", subject), ("against", rc.against)):
        if name not in everyone:
            raise ValueError(f"evaluate.review.{field}: {name!r} is not evaluated ({', '.join(everyone)})")
    prompts = [{"id": str(i), "prompt": tokenizer.decode(p, skip_special_tokens=True)}
               for i, p in enumerate(heldout_prompts(held, rc.prompts, rc.prompt_tokens))]
    samples = generate_pairs(prompts, {rc.against: (everyone[rc.against], tokenizer),
                                       subject: (everyone[subject], tokenizer)},
                             max_new_tokens=rc.new_tokens, chat=False)
    paths = export_review(samples, run / "eval" / "review", variants=(rc.against, subject), seed=rc.seed)
    outputs.update({str(p.relative_to(run)): None for p in paths.values()})  # written; listed as outputs
    log(f"evaluate: [review] {len(samples)} paired samples of {subject} and {rc.against} for raters in "
        f"{paths['csv'].parent}")
    if rc.ratings is not None:
        check_ratings(rc.ratings, paths["jsonl"])
        res = import_ratings(rc.ratings, paths["key"], subject=subject, seed=rc.seed)
        metrics.setdefault(subject, {})["human_win_rate"] = {"value": res["value"], "interval": res["interval"]}
        outputs["eval/review.json"] = {subject: res}
        log(f"evaluate: [review] {subject} human win rate against {rc.against} {res['value']:.3f} "
            f"({res['items']} items, {res['ratings']} ratings)")


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
    return (*gate_inputs(results, seed=cfg.tasks[0].seed), results)


def task_size(t) -> dict:
    """The builder's size option for a TaskConfig: sentiment takes ``limit`` (of its 200 sentences), the
    others ``n`` (how many to build)."""
    if t.limit is None:
        return {}
    return {"limit": t.limit} if t.name == "sentiment" else {"n": t.limit}
