"""Does the student keep the teacher's general ability? Leave-one-domain-out at the quickstart's budget.

Domains the package can fetch: Jane Austen (the quickstart's three novels), gensim's Lee news corpus,
gensim's Wikipedia excerpt, and the teacher's own samples (the data_free path: from BOS, T=1, top-p 0.95).
For each domain, a student is distilled on a mixture of the other three (equal weights, drawn per step
by data/mixture.py) with the quickstart's settings read from recipes/quickstart.yaml (steps, batch, block
size, losses, learning rate, the cut by block influence: 22 of 30 layers; only the data differ), then scored on
the left-out domain's held-out text against the teacher: perplexity ratio student / teacher and KL to the
teacher. Beside them, the single-corpus recipe the quickstart was before issue 17 (recipes/single_corpus.yaml:
Austen only, 15 layers, the same budget) is scored on every domain. Every student is also scored on gensim's
Crime and Punishment excerpt (Russian), which no recipe trains on.

Metrics: ``heldout_domain_ppl_ratio`` (mixture: the mean over left-out domains of student / teacher
perplexity; target <= 2.5), ``in_domain_ppl_ratio`` (mixture: the mean over runs of the ratio on the held-out
text of the domains trained on; target <= 1.5), and ``single_corpus_*`` the same for the single-corpus recipe
(its held-out domains: every domain but Austen). Results files written before the switch name that run
``quickstart`` (it was the quickstart then) and hold 15-layer mixtures (retention_layers15.json).

    python benchmarks/retention.py [--quick] [--runs single_corpus,without_wiki,...] [--steps N]
                                   [--set distill.lr=1e-3] [--cut width] [--freeze-embeddings] [--tag T]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from _common import RESULTS, print_table, write_results

from distillery.compress.prune import count_params, prune_to_target
from distillery.data import sources as src
from distillery.data.mixture import build, first_drawn
from distillery.evaluate.quality import evaluate_models
from distillery.models.load import load_model
from distillery.models.student import cut_from_teacher
from distillery.recipe import TeacherSamplesSource, load_recipe
from distillery.signals.online import OnlineTeacher
from distillery.train.loop import train

ROOT = Path(__file__).resolve().parents[1]
DOMAINS = ("austen", "lee", "wiki", "samples")
EXTRA = "crime"  # never trained on by any run


def domain_blocks(teacher, recipe, quick: bool) -> tuple[dict, dict, dict]:
    """(training blocks, evaluation blocks, documents) per domain. Text domains: the recipe's cut into
    blocks with its held-out text (tails, or whole documents where they are short: Lee's news stories);
    teacher samples: an independent second set (another seed) to score on, since 5% of 64 samples is
    three of them, too few blocks to score."""
    tok, bs, frac = teacher.tokenizer, recipe.data.block_size, recipe.data.heldout_fraction
    parts = getattr(recipe.data.source, "parts", None) or ["prideprejudice", "persuasion", "emma"]
    docs = {"austen": src.read_austen(parts), "lee": src.read_gensim_lee(),
            "wiki": src.read_gensim_wiki()}
    n_samples = 32 if quick else 64  # 5% of them are held out (whole): fewer would not fill one block
    t0 = time.perf_counter()
    docs["samples"] = src.teacher_samples(teacher.model, tok, TeacherSamplesSource(
        kind="teacher_samples", num_samples=n_samples), recipe.seed, progress=True)
    held_samples = src.teacher_samples(teacher.model, tok, TeacherSamplesSource(
        kind="teacher_samples", num_samples=16 if quick else 40), recipe.seed + 1, progress=True)
    print(f"teacher samples: {len(docs['samples'])} + {len(held_samples)} in {time.perf_counter() - t0:.0f} s")
    train_, held = {}, {}
    for name, d in docs.items():
        train_[name], held[name] = src.to_blocks(d, tok, bs, frac)
    held["samples"] = torch.cat(src.to_blocks(held_samples, tok, bs, 0.5))  # all of it: no run trains on it
    held[EXTRA] = torch.cat(src.to_blocks(src.read_gensim_crime(), tok, bs, 0.5))
    return train_, held, {k: len(v) for k, v in docs.items()}


def distil(teacher, signal, recipe, parts: dict[str, torch.Tensor], mixed: bool, steps: int, cut: str = "depth",
           freeze_embeddings: bool = False):
    """A student cut and distilled as ``recipe`` does, on ``parts`` (one domain: the plain path; several:
    a mixture, equal weights). ``cut="width"``: every layer kept, the MLPs' channels pruned (by activation)
    to the depth cut's parameter count instead. Returns (student, kept layers, seconds, the bridges' fit or None)."""
    if mixed:
        data, _, info = build([(n, 1.0, {"input_ids": b}, {"input_ids": b[:1]}, 0) for n, b in parts.items()])
        data = data["input_ids"]
    else:
        (data,), info = parts.values(), None

    def rows(n):  # calibration text: the first n blocks the run draws, as in the pipeline
        return first_drawn(data, info, recipe.seed, n)
    student, meta = cut_from_teacher(recipe.student.from_teacher, teacher.model, rows)
    student, keep = student.float(), meta["kept_layers"]
    if cut == "width":
        pruned = prune_to_target(teacher.model, rows(recipe.student.from_teacher.calibration_blocks),
                                 count_params(student), axes=("mlp_channels",))
        student, keep = pruned.model.float(), pruned.report["config"]
    if freeze_embeddings:  # tied: the output head too
        student.get_input_embeddings().weight.requires_grad_(False)
    cfg = recipe.distill.model_copy(update={"steps": steps, "checkpoint_every": 10_000, "eval_every": 10_000})
    t0 = time.perf_counter()
    import tempfile

    with tempfile.TemporaryDirectory() as out:
        if steps:  # 0: the cut as it is, untrained
            train(student, signal, data, cfg, out_dir=Path(out), seed=recipe.seed, progress=True, log=print,
                  mixture=info)
    return student, keep, time.perf_counter() - t0, meta.get("bridges")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="10 steps, 4 eval blocks, two runs: checks the script")
    ap.add_argument("--runs", default=None, help="comma-separated: single_corpus, without_<domain>, "
                    "on_<domain>+<domain> (default: single_corpus and every without_<domain>)")
    ap.add_argument("--steps", type=int, default=None, help="default: the quickstart's distill.steps; 0: score the "
                    "untrained cut")
    ap.add_argument("--eval-blocks", type=int, default=None)
    ap.add_argument("--recipe", default=str(ROOT / "recipes" / "quickstart.yaml"),
                    help="the mixture runs' settings (cut, steps, batch, losses; its data are replaced)")
    ap.add_argument("--baseline", default=str(ROOT / "recipes" / "single_corpus.yaml"),
                    help="the single_corpus run's recipe (trained on Austen only)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override the recipe (e.g. distill.lr=1e-3) to compare defaults; repeatable")
    ap.add_argument("--cut", choices=("depth", "width"), default="depth",
                    help="width: prune every layer's MLP channels to the depth cut's parameter count instead")
    ap.add_argument("--freeze-embeddings", action="store_true", help="train all but the (tied) embeddings")
    ap.add_argument("--tag", default="", help="suffix of the results file (retention_<tag>.json)")
    ap.add_argument("--append", action="store_true", help="keep the runs already in the results file (same settings)")
    ap.add_argument("--domains-cache", default=None, help="a .pt file: reuse the domains' blocks (teacher samples "
                    "included) between invocations that split the runs")
    args = ap.parse_args()
    recipe, baseline = load_recipe(args.recipe, args.set), load_recipe(args.baseline, args.set)
    steps = args.steps if args.steps is not None else 10 if args.quick else recipe.distill.steps
    n_eval = args.eval_blocks or (4 if args.quick else 32)
    runs = (args.runs.split(",") if args.runs else
            ["single_corpus", "without_wiki"] if args.quick else ["single_corpus", *(f"without_{d}" for d in DOMAINS)])

    teacher = load_model(recipe.teacher.model, cache=recipe.cache_dir)
    signal = OnlineTeacher(teacher.model, model_id=recipe.teacher.model, tokenizer_fingerprint=teacher.fingerprint)
    cache = Path(args.domains_cache) if args.domains_cache else None
    if cache is not None and cache.is_file():
        train_blocks, held, ndocs = torch.load(cache)
    else:
        train_blocks, held, ndocs = domain_blocks(teacher, recipe, args.quick)
        if cache is not None:
            torch.save((train_blocks, held, ndocs), cache)
    held = {k: v[:n_eval] for k, v in held.items()}
    teacher_ppl = {d: evaluate_models({}, b, teacher=teacher.model)["teacher"]["perplexity"] for d, b in held.items()}
    print("teacher perplexity: " + ", ".join(f"{d} {p:.1f}" for d, p in teacher_ppl.items()))

    results: dict[str, dict] = {}
    name = "retention" + ("_quick" if args.quick else "") + (f"_{args.tag}" if args.tag else "")
    previous = RESULTS / f"{name}.json"
    if args.append and previous.is_file():
        old = json.loads(previous.read_text())
        mine = _config(args, recipe, baseline, steps, n_eval, ndocs, held, runs, partial=True)
        same = all(old["config"].get(k) == mine[k] for k in ("steps", "batch_size", "block_size", "lr", "losses",
                                                              "student", "baseline_student",
                                                              "eval_blocks_per_domain", "seed", "overrides"))
        if not same:
            raise SystemExit(f"{previous}: written with other settings; run without --append")
        results = {k: v for k, v in old["metrics"]["runs"].items() if k not in runs}
    for run in runs:
        trained = (["austen"] if run == "single_corpus" else run.removeprefix("on_").split("+") if run.startswith("on_")
                   else [d for d in DOMAINS if d != run.removeprefix("without_")])
        if not set(trained) <= set(DOMAINS) or not trained:
            raise SystemExit(f"--runs {run}: expected single_corpus, without_<domain> or on_<domain>+<domain> "
                             f"(domains: {', '.join(DOMAINS)})")
        single = run == "single_corpus"
        student, keep, seconds, bridges = distil(teacher, signal, baseline if single else recipe,
                                                 {d: train_blocks[d] for d in trained}, mixed=not single,
                                                 steps=steps, cut=args.cut, freeze_embeddings=args.freeze_embeddings)
        scores = {}
        for d, b in held.items():
            m = evaluate_models({"s": student}, b, teacher=teacher.model)["s"]
            scores[d] = {"perplexity": m["perplexity"], "teacher_perplexity": teacher_ppl[d],
                         "ppl_ratio": m["perplexity"] / teacher_ppl[d], "kl_to_teacher": m["kl_to_teacher"]}
        results[run] = {"trained_on": trained, "kept_layers": keep, **({"bridges": bridges} if bridges else {}),
                        "train_seconds": seconds, "domains": scores,
                        "in_domain_ppl_ratio": statistics.fmean(scores[d]["ppl_ratio"] for d in trained),
                        "heldout_ppl_ratio": _mean([scores[d]["ppl_ratio"] for d in DOMAINS if d not in trained])}
        del student
        write_results(name, _metrics(results),
                      _config(args, recipe, baseline, steps, n_eval, ndocs, held, runs, partial=True))
        print(f"{run}: in-domain ratio {results[run]['in_domain_ppl_ratio']:.2f}, held-out "
              f"{_fmt(results[run]['heldout_ppl_ratio'])} ({seconds:.0f} s)")

    runs = list(results)
    rows = [(run, ",".join(r["trained_on"]), *(f"{r['domains'][d]['ppl_ratio']:.2f} ({r['domains'][d]['kl_to_teacher']:.2f})"
                                               for d in [*DOMAINS, EXTRA]),
             f"{r['in_domain_ppl_ratio']:.2f}", _fmt(r["heldout_ppl_ratio"])) for run, r in results.items()]
    print_table(rows, ("run", "trained on", *(f"{d} ppl x (KL)" for d in [*DOMAINS, EXTRA]), "in-domain", "held-out"))
    print("teacher perplexity: " + ", ".join(f"{d} {p:.1f}" for d, p in teacher_ppl.items()))
    metrics = _metrics(results)
    for key in ("heldout_domain_ppl_ratio", "in_domain_ppl_ratio", "single_corpus_heldout_domain_ppl_ratio",
                "single_corpus_in_domain_ppl_ratio"):
        if key in metrics:
            print(f"{key}: {metrics[key]:.3f}")
    complete = {"single_corpus", *(f"without_{d}" for d in DOMAINS)} <= set(runs)
    path = write_results(name, metrics, _config(args, recipe, baseline, steps, n_eval, ndocs, held, runs,
                                                partial=not complete))
    print(f"wrote {path}")


def _overrides(args) -> list[str]:
    """What this invocation changed from the recipes, as recorded in the results."""
    return [*args.set, *(["--cut width"] if args.cut == "width" else []),
            *(["--freeze-embeddings"] if args.freeze_embeddings else [])]


def _mean(values: list[float]) -> float | None:
    return statistics.fmean(values) if values else None


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def _metrics(results: dict) -> dict:
    metrics: dict = {"runs": results}
    lodo = [r for run, r in results.items() if run.startswith("without_")]
    if lodo:
        metrics["heldout_domain_ppl_ratio"] = statistics.fmean(r["heldout_ppl_ratio"] for r in lodo)
        metrics["in_domain_ppl_ratio"] = statistics.fmean(r["in_domain_ppl_ratio"] for r in lodo)
        metrics["heldout_domain_kl"] = statistics.fmean(
            r["domains"][d]["kl_to_teacher"] for r in lodo for d in DOMAINS if d not in r["trained_on"])
        metrics[f"{EXTRA}_ppl_ratio"] = statistics.fmean(r["domains"][EXTRA]["ppl_ratio"] for r in lodo)
    if "single_corpus" in results:
        q = results["single_corpus"]
        metrics["single_corpus_heldout_domain_ppl_ratio"] = q["heldout_ppl_ratio"]
        metrics["single_corpus_in_domain_ppl_ratio"] = q["in_domain_ppl_ratio"]
        metrics["single_corpus_heldout_domain_kl"] = statistics.fmean(
            q["domains"][d]["kl_to_teacher"] for d in DOMAINS if d != "austen")
        metrics[f"single_corpus_{EXTRA}_ppl_ratio"] = q["domains"][EXTRA]["ppl_ratio"]
    return metrics


def _rel(path: str) -> str:
    p = Path(path).resolve()
    return str(p.relative_to(ROOT)) if p.is_relative_to(ROOT) else str(p)


def _config(args, recipe, baseline, steps, n_eval, ndocs, held, runs, partial: bool) -> dict:
    d = recipe.distill
    return {"recipe": f"{_rel(args.recipe)} (data replaced per run)", "baseline": _rel(args.baseline),
            "baseline_student": baseline.student.from_teacher.model_dump(mode="json"),
            "steps": steps, "batch_size": d.batch_size,
            "block_size": recipe.data.block_size, "lr": d.lr, "schedule": d.schedule, "seed": recipe.seed,
            "losses": d.losses.model_dump(mode="json", include={"ce_weight", "kd"}),
            "student": recipe.student.from_teacher.model_dump(mode="json"), "eval_blocks": n_eval,
            "eval_blocks_per_domain": {k: len(v) for k, v in held.items()}, "documents": ndocs,
            "mixture_weights": "equal", "overrides": _overrides(args), "runs": runs, "partial": partial}


if __name__ == "__main__":
    main()
