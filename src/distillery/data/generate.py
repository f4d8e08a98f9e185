"""Teacher generation: decoding mixes, a resumable cache, the generate stage (the backends that
produce responses and their confidence scores are in data/backends.py).

Determinism is per sample, not per run: every (prompt, strategy, sample) has its own seed and its
own random generator, so a response does not depend on which other prompts share its batch or on
where an interrupted run resumed. Batches are formed the same way on every run and each finished
batch is one atomically written cache shard, so a killed run loses at most the batch in flight.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

from distillery.data.backends import make_backend
from distillery.data.prompts import Prompt
from distillery.io import atomic_write_text, sha256_json


@dataclass
class Work:
    """One response to generate."""

    key: str
    prompt: Prompt
    text: str  # the rendered prompt sent to the teacher
    strategy: object  # DecodingConfig
    sample: int
    seed: int


# ---------------------------------------------------------------- keys and seeds


def decoding_settings(strategy) -> dict:
    """What changes a response; the strategy's name and share do not."""
    d = strategy.model_dump(exclude={"name", "share", "n"})
    if not strategy.do_sample:  # greedy ignores the sampling knobs
        d = {"do_sample": False, "max_new_tokens": strategy.max_new_tokens}
    return d


def sample_seed(run_seed: int, text: str, strategy, sample: int) -> int:
    if not strategy.do_sample:
        return 0
    h = hashlib.sha256(f"{run_seed}|{sample}|{json.dumps(decoding_settings(strategy), sort_keys=True)}|{text}".encode())
    return int(h.hexdigest()[:15], 16)


def cache_key(teacher_fp: str, text: str, strategy, seed: int) -> str:
    return sha256_json({"teacher": teacher_fp, "prompt": text, "decoding": decoding_settings(strategy), "seed": seed})


def assign_strategies(prompts: list[Prompt], strategies: list, seed: int) -> list[tuple[Prompt, object]]:
    """Which strategy each prompt gets: ``share: null`` means all prompts; shares split a seeded
    shuffle of the prompts into disjoint slices, in recipe order."""
    pairs = []
    order = list(range(len(prompts)))
    random.Random(seed).shuffle(order)
    start = 0
    for s in strategies:
        if s.share is None:
            chosen = range(len(prompts))
        else:
            count = round(s.share * len(prompts))
            chosen = sorted(order[start:start + count])
            start += count
        pairs += [(prompts[i], s) for i in chosen]
    return pairs


def make_work(pairs, render, teacher_fp: str, run_seed: int) -> list[Work]:
    work = []
    for prompt, strategy in pairs:
        text = render(prompt)
        for j in range(strategy.n):
            seed = sample_seed(run_seed, text, strategy, j)
            work.append(Work(cache_key(teacher_fp, text, strategy, seed), prompt, text, strategy, j, seed))
    return work


# ---------------------------------------------------------------- cache and the generation loop


class GenerationCache:
    """A folder of JSONL shards, one per finished batch, each written atomically: a shard is either
    complete or absent, so a SIGKILL loses at most the batch being generated."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.entries: dict[str, dict] = {}
        for shard in sorted(self.folder.glob("shard-*.jsonl")) if self.folder.is_dir() else []:
            for line in shard.read_text("utf-8").splitlines():
                rec = json.loads(line)
                self.entries[rec["key"]] = rec

    def __contains__(self, key: str) -> bool:
        return key in self.entries

    def add_batch(self, recs: list[dict]) -> None:
        name = hashlib.sha256("".join(r["key"] for r in recs).encode()).hexdigest()[:20]
        atomic_write_text(self.folder / f"shard-{name}.jsonl",
                          "".join(json.dumps(r, sort_keys=True) + "\n" for r in recs))
        for r in recs:
            self.entries[r["key"]] = r


def plan_batches(work: list[Work], batch_size: int) -> list[list[Work]]:
    """Unique keys, grouped by strategy, sorted by prompt length (less padding), cut into batches:
    the same plan on every run, whatever the cache holds."""
    unique = list({w.key: w for w in work}.values())
    by_strategy: dict[str, list[Work]] = {}
    for w in unique:
        by_strategy.setdefault(w.strategy.name, []).append(w)
    batches = []
    for ws in by_strategy.values():
        ws = sorted(ws, key=lambda w: (len(w.text), w.key))
        batches += [ws[i:i + batch_size] for i in range(0, len(ws), batch_size)]
    return batches


def run_generation(work: list[Work], backend, cache: GenerationCache, *, scrub=None,
                   progress: bool = False) -> dict:
    """Generate every uncached item; returns ``{key: cache entry}`` for all of ``work``.

    ``scrub`` (a PII scrubber) runs on each response before it is written anywhere."""
    batches = plan_batches(work, backend.batch_size)
    todo = [b for b in batches if any(w.key not in cache for w in b)]
    bar = _progress(len(todo), progress)
    stats = {"batches": len(batches), "generated_batches": len(todo), "new_tokens": 0, "seconds": 0.0}
    for batch in todo:
        missing = [w for w in batch if w.key not in cache]
        t0 = time.perf_counter()
        gens = backend.generate([w.text for w in missing], missing[0].strategy, [w.seed for w in missing])
        dt = time.perf_counter() - t0
        stats["seconds"] += dt
        recs = []
        for w, g in zip(missing, gens):
            stats["new_tokens"] += len(g.token_ids)
            recs.append({"key": w.key, "response": scrub(g.response) if scrub else g.response,
                         "n_tokens": len(g.token_ids), "finish_reason": g.finish_reason, "scores": g.scores,
                         "scores_from": g.scores_from, "generated_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                         "seconds": dt / len(missing)})
        cache.add_batch(recs)
        bar.update(1)
    bar.close()
    return {"entries": {w.key: cache.entries[w.key] for w in work}, "stats": stats}


def _progress(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="generate", unit="batch", disable=not enabled or os.environ.get("CI") == "true")


# ---------------------------------------------------------------- agreement


def rouge_l(a: str, b: str) -> float:
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"]).score(a, b)["rougeL"].fmeasure


def agreement(responses: list[str], prompt: Prompt) -> float:
    """How much n samples agree: the share matching the most common final answer when the task has
    one, else the mean pairwise ROUGE-L F1."""
    from collections import Counter

    from distillery.data.prompts import extract_answer

    if len(responses) < 2:
        return float("nan")
    if prompt.answer_type is not None:
        answers = [extract_answer(r, prompt.answer_type) for r in responses]
        return Counter(answers).most_common(1)[0][1] / len(answers)
    pairs = [(a, b) for i, a in enumerate(responses) for b in responses[i + 1:]]
    return sum(rouge_l(a, b) for a, b in pairs) / len(pairs)


# ---------------------------------------------------------------- the generate stage


def _renderer(recipe, backend):
    from distillery.data.prompts import render

    cfg = recipe.generate
    tok = getattr(backend, "tok", None)
    if tok is None and cfg.chat_template:
        from distillery.models.load import load_tokenizer

        tok = load_tokenizer(recipe.teacher.model, recipe.cache_dir, recipe.teacher.gguf_file)
    return lambda p: render(p, tok, cfg.template, cfg.chat_template, cfg.system)


def build_records(work: list[Work], entries: dict, backend) -> list[dict]:
    """One record per sample, in work order, with its provenance; agreement added for n > 1."""
    from distillery.data.prompts import check_answer

    records, groups = [], {}
    for w in work:
        e = entries[w.key]
        rec = {"id": f"{w.prompt.id}#{w.strategy.name}#{w.sample}", "prompt_id": w.prompt.id, "prompt": w.text,
               "raw_prompt": w.prompt.text, "response": e["response"], "task": w.prompt.task,
               "answer": w.prompt.answer, "correct": check_answer(w.prompt, e["response"]),
               "teacher": {"id": backend.model_id, "fingerprint": backend.fingerprint, "backend": backend.name},
               "decoding": {"name": w.strategy.name, **decoding_settings(w.strategy)}, "seed": w.seed,
               "sample": w.sample, "key": w.key, "scores": dict(e["scores"]), "scores_from": e["scores_from"],
               "n_tokens": e["n_tokens"], "finish_reason": e["finish_reason"], "generated_at": e["generated_at"]}
        records.append(rec)
        groups.setdefault((w.prompt.id, w.strategy.name), []).append((rec, w.prompt))
    for members in groups.values():
        if len(members) > 1:
            agree = agreement([r["response"] for r, _ in members], members[0][1])
            for r, _ in members:
                r["scores"]["agreement"] = agree
    return records


def run_generate(recipe, run_dir: Path, progress: bool = True, backend=None) -> dict:
    """The ``generate`` stage: prompts -> teacher responses (cached) -> curation -> ``run_dir/data``.

    Returns a summary (counts, timings, files). ``backend`` may be passed in (tests, an already
    loaded teacher); otherwise it is built from the recipe."""
    from distillery.data import curate as cur
    from distillery.data.pii import Scrubber
    from distillery.data.prompts import read_prompts
    from distillery.data.provenance import write_dataset
    from distillery.recipe import GenerateConfig

    if recipe.generate is None:
        recipe = recipe.model_copy(update={"generate": GenerateConfig()})
    cfg = recipe.generate
    data_dir = Path(run_dir) / "data"
    prompts = read_prompts(cfg.prompts, recipe.seed)
    prompt_pii, response_pii = Scrubber(cfg.curate.pii.kinds), Scrubber(cfg.curate.pii.kinds)
    if cfg.curate.pii.enabled:  # before anything is stored or sent to a (remote) teacher
        prompts = [Prompt(p.id, prompt_pii(p.text), p.answer, p.answer_type, p.task) for p in prompts]
    backend = backend or make_backend(recipe)
    pairs = assign_strategies(prompts, cfg.decoding, recipe.seed)
    work = make_work(pairs, _renderer(recipe, backend), backend.fingerprint, recipe.seed)
    cache = GenerationCache(cfg.cache_dir or data_dir / "cache")
    out = run_generation(work, backend, cache, scrub=response_pii if cfg.curate.pii.enabled else None,
                         progress=progress)
    records = build_records(work, out["entries"], backend)
    counts = cur.curate(records, cfg.curate)
    reviewed = cur.import_review(records, cfg.curate.review_file) if cfg.curate.review_file else 0
    counts = cur.filter_counts(records) if reviewed else counts
    cur.stage(records, cfg.curate)
    meta = {
        "name": recipe.name, "seed": recipe.seed, "prompts": len(prompts),
        "prompt_source": str(cfg.prompts.path or f"tasks:{','.join(cfg.prompts.tasks)}"),
        "teacher": {"id": backend.model_id, "fingerprint": backend.fingerprint, "backend": backend.name},
        "decoding": [{"name": s.name, "n": s.n, "prompts": sum(1 for _, t in pairs if t is s),
                      **decoding_settings(s)} for s in cfg.decoding],
        "curation": counts, "reviewed": reviewed, "confidence_accuracy": cur.confidence_accuracy(records),
        "pii": {"enabled": cfg.curate.pii.enabled, "prompts": dict(prompt_pii.counts),
                "responses": dict(response_pii.counts)},
        "generation": out["stats"], "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    files = write_dataset(data_dir, records, meta)
    return {**{k: v for k, v in meta.items() if k != "decoding"}, "records": len(records),
            "kept": counts["kept"], "files": {k: str(v) for k, v in files.items()}}


# ---------------------------------------------------------------- choosing a teacher


def compare_teachers(recipe, teachers: list | None = None, n_prompts: int | None = None,
                     cost_per_hour: float = 1.0, backends: list | None = None) -> list[dict]:
    """Run candidate teachers on the same prompts with the recipe's first decoding strategy.

    The first teacher is the reference (the strongest); each row reports agreement with it (final
    answer where the task has one, else ROUGE-L), accuracy on checkable prompts, mean confidence,
    tokens/s and the cost of 1k generated tokens at ``cost_per_hour`` (device time)."""
    from distillery.data.prompts import check_answer, extract_answer, read_prompts
    from distillery.recipe import GenerateConfig

    cfg = recipe.generate or GenerateConfig()
    prompts = read_prompts(cfg.prompts, recipe.seed)[: n_prompts or cfg.compare_prompts]
    strategy = cfg.decoding[0]
    if backends is None:
        candidates = teachers or cfg.teachers or [recipe.teacher]
        backends = [make_backend(recipe.model_copy(update={"generate": cfg}), t) for t in candidates]
    rows, reference = [], None
    for backend in backends:
        texts = [_renderer(recipe.model_copy(update={"generate": cfg}), backend)(p) for p in prompts]
        seeds = [sample_seed(recipe.seed, t, strategy, 0) for t in texts]
        gens, t0 = [], time.perf_counter()
        for i in range(0, len(texts), backend.batch_size):
            gens += backend.generate(texts[i:i + backend.batch_size], strategy, seeds[i:i + backend.batch_size])
        seconds = time.perf_counter() - t0
        responses = [g.response for g in gens]
        reference = reference or responses
        tokens = sum(max(len(g.token_ids), 1) for g in gens)
        agree = [extract_answer(a, p.answer_type) == extract_answer(b, p.answer_type) if p.answer_type
                 else rouge_l(a, b) for a, b, p in zip(responses, reference, prompts)]
        checked = [c for c in (check_answer(p, r) for p, r in zip(prompts, responses)) if c is not None]
        rows.append({"teacher": backend.model_id, "prompts": len(prompts),
                     "agreement_with_reference": sum(agree) / len(agree),
                     "accuracy": sum(checked) / len(checked) if checked else None,
                     "mean_logprob": sum(g.scores["mean_logprob"] for g in gens) / len(gens),
                     "tokens_per_s": tokens / seconds, "cost_per_1k_tokens": cost_per_hour * seconds / 3600 / tokens * 1000})
    return rows
