"""Teacher generation: decoding mixes, confidence scores, a resumable cache, three backends.

Determinism is per sample, not per run: every (prompt, strategy, sample) has its own seed and its
own random generator, so a response does not depend on which other prompts share its batch or on
where an interrupted run resumed. Batches are formed the same way on every run and each finished
batch is one atomically written cache shard, so a killed run loses at most the batch in flight.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from distillery.data.prompts import Prompt
from distillery.io import atomic_write_text, sha256_json

SCORE_NAMES = ("mean_entropy", "mean_gap", "min_gap", "mean_logprob")


class BackendUnavailable(RuntimeError):
    """A backend whose package or server is not there; the message says what to install or start."""


@dataclass
class Work:
    """One response to generate."""

    key: str
    prompt: Prompt
    text: str  # the rendered prompt sent to the teacher
    strategy: object  # DecodingConfig
    sample: int
    seed: int


@dataclass
class Generation:
    response: str
    token_ids: list[int]
    finish_reason: str  # "stop" (end of sequence) or "length"
    scores: dict = field(default_factory=dict)
    scores_from: str = "full"  # "full" distribution, or "top5" where a server returns only top log-probs


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


# ---------------------------------------------------------------- confidence


def step_scores(logits: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
    """Per-row confidence terms of one decoding step, from raw logits ``[B, V]``:
    columns = entropy, top-1/top-2 logit gap, log-prob of the chosen token (all at T=1)."""
    logits = logits.float()
    logp = torch.log_softmax(logits, dim=-1)
    entropy = -(logp.exp() * logp).sum(-1)
    top2 = logits.topk(2, dim=-1).values
    return torch.stack([entropy, top2[:, 0] - top2[:, 1], logp.gather(-1, chosen[:, None])[:, 0]], dim=-1)


def summarise(per_step: list[list[float]]) -> dict:
    """Per-response scores from per-step ``[entropy, gap, logprob]`` rows."""
    if not per_step:
        return {n: float("nan") for n in SCORE_NAMES}
    ent, gap, lp = zip(*per_step)
    return {"mean_entropy": sum(ent) / len(ent), "mean_gap": sum(gap) / len(gap), "min_gap": min(gap),
            "mean_logprob": sum(lp) / len(lp)}


def scores_from_top_logprobs(chosen: list[float], tops: list[dict]) -> dict:
    """Scores from a server's top-k log-probs: the gap is exact (a log-prob gap is a logit gap);
    entropy is taken over the renormalised top k, a lower bound on the full one."""
    steps = []
    for lp, top in zip(chosen, tops):
        vals = sorted((top or {lp: lp}).values(), reverse=True) if isinstance(top, dict) else sorted(top, reverse=True)
        z = math.log(sum(math.exp(v) for v in vals))
        ent = -sum(math.exp(v - z) * (v - z) for v in vals)
        gap = vals[0] - vals[1] if len(vals) > 1 else float("inf")
        steps.append([ent, gap, lp])
    return summarise(steps)


# ---------------------------------------------------------------- transformers backend


class _RowSampler:
    """Samples each row with its own generator, then hands greedy search a one-hot choice.

    Batched ``generate`` draws one random stream for the whole batch; a row's draw would then
    depend on its neighbours. Here each row's draws come from its own seed only."""

    def __init__(self, strategy, seeds: list[int]):
        self.s = strategy
        self.gens = [torch.Generator().manual_seed(seed) for seed in seeds]

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        logits = scores.float().cpu() / self.s.temperature
        if self.s.top_k:
            kth = logits.topk(min(self.s.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        if self.s.top_p < 1.0:
            sorted_p, idx = probs.sort(dim=-1, descending=True)
            drop = sorted_p.cumsum(-1) - sorted_p >= self.s.top_p  # keep the smallest set reaching top_p
            probs = probs.scatter(-1, idx, sorted_p.masked_fill(drop, 0.0))
        chosen = torch.stack([torch.multinomial(p, 1, generator=g)[0] for p, g in zip(probs, self.gens)])
        out = torch.full_like(scores, float("-inf"))
        return out.scatter(-1, chosen[:, None].to(scores.device), 0.0)


class TransformersBackend:
    """Batched, left-padded generation with the KV cache, through ``model.generate``."""

    name = "transformers"
    scores_from = "full"

    def __init__(self, model, tokenizer, model_id: str, batch_size: int = 16):
        self.model, self.tok, self.model_id, self.batch_size = model.eval(), tokenizer, model_id, batch_size
        if self.tok.pad_token is None:
            self.tok.pad_token = self.tok.eos_token
        self.fingerprint = teacher_fingerprint(model, tokenizer)

    @torch.no_grad()
    def generate(self, texts: list[str], strategy, seeds: list[int]) -> list[Generation]:
        self.tok.padding_side = "left"
        enc = self.tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        dev = next(self.model.parameters()).device
        enc = {k: v.to(dev) for k, v in enc.items()}
        kwargs = dict(max_new_tokens=strategy.max_new_tokens, do_sample=False, num_beams=1,
                      output_logits=True, return_dict_in_generate=True,
                      pad_token_id=self.tok.pad_token_id, eos_token_id=self.tok.eos_token_id)
        if strategy.do_sample:
            kwargs["logits_processor"] = [_RowSampler(strategy, seeds)]
        out = self.model.generate(**enc, **kwargs)
        new = out.sequences[:, enc["input_ids"].shape[1]:]
        per_step = torch.stack([step_scores(lg, new[:, t]) for t, lg in enumerate(out.logits)], dim=1).cpu()
        return [self._one(new[r].tolist(), per_step[r]) for r in range(len(texts))]

    def _one(self, ids: list[int], steps: torch.Tensor) -> Generation:
        eos = self.tok.eos_token_id
        n = ids.index(eos) + 1 if eos in ids else len(ids)  # the end-of-sequence choice is scored too
        text_ids = ids[: n - 1] if eos in ids else ids
        return Generation(self.tok.decode(text_ids, skip_special_tokens=True), text_ids,
                          "stop" if eos in ids else "length", summarise(steps[:n].tolist()))


def teacher_fingerprint(model, tokenizer) -> str:
    """Tokenizer fingerprint + architecture + a strided sample of every weight: cheap, and any
    change of weights, dtype or vocabulary changes it."""
    from distillery.models.load import tokenizer_fingerprint

    h = hashlib.sha256(tokenizer_fingerprint(tokenizer).encode())
    cfg = {k: v for k, v in model.config.to_dict().items() if not k.startswith("_") and k != "transformers_version"}
    h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
    for name, p in model.state_dict().items():
        flat = p.detach().flatten()
        h.update(f"{name}|{tuple(p.shape)}|{p.dtype}".encode())
        h.update(flat[:: max(1, flat.numel() // 256)].float().cpu().numpy().tobytes())
    return h.hexdigest()


# ---------------------------------------------------------------- OpenAI-compatible HTTP backend


class OpenAIBackend:
    """Any OpenAI-compatible ``/v1/completions`` server (vLLM, distillery's own). One request per
    sample, each with its own seed, ``batch_size`` in flight at once (the server batches them)."""

    name = "openai"
    scores_from = "top5"

    def __init__(self, base_url: str, model: str, *, api_key: str | None = None, batch_size: int = 16,
                 timeout_s: float = 120.0, fingerprint: str | None = None):
        self.url = base_url.rstrip("/") + "/completions"
        self.model_id, self.api_key, self.batch_size, self.timeout_s = model, api_key, batch_size, timeout_s
        # A server does not expose its weights; its model name and URL stand for them.
        self.fingerprint = fingerprint or sha256_json({"server": base_url, "model": model})

    def generate(self, texts: list[str], strategy, seeds: list[int]) -> list[Generation]:
        with ThreadPoolExecutor(max_workers=self.batch_size) as pool:
            return list(pool.map(lambda ts: self._one(ts[0], strategy, ts[1]), zip(texts, seeds)))

    def _one(self, text: str, strategy, seed: int) -> Generation:
        body = {"model": self.model_id, "prompt": text, "max_tokens": strategy.max_new_tokens, "n": 1,
                "temperature": strategy.temperature if strategy.do_sample else 0.0,
                "top_p": strategy.top_p if strategy.do_sample else 1.0, "seed": seed, "logprobs": 5}
        if strategy.do_sample and strategy.top_k:
            body["top_k"] = strategy.top_k
        choice = self._post(body)["choices"][0]
        lp = choice.get("logprobs") or {}
        chosen, tops = lp.get("token_logprobs") or [], lp.get("top_logprobs") or []
        scores = scores_from_top_logprobs(chosen, tops) if chosen else summarise([])
        return Generation(choice["text"], [], "stop" if choice.get("finish_reason") == "stop" else "length",
                          scores, self.scores_from)

    def _post(self, body: dict) -> dict:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        req = urllib.request.Request(self.url, json.dumps(body).encode(), headers)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:
            raise BackendUnavailable(f"{self.url}: HTTP {e.code}: {e.read()[:300]!r}") from None
        except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
            raise BackendUnavailable(f"{self.url}: cannot reach the server ({e})") from None


# ---------------------------------------------------------------- vLLM offline engine


class VLLMBackend:
    """vLLM's offline engine (optional extra, GPU only). Scores come from its top-5 log-probs."""

    name = "vllm"
    scores_from = "top5"

    def __init__(self, model_path: str, batch_size: int = 256):
        try:
            import vllm  # noqa: F401
        except ImportError:
            raise BackendUnavailable("backend vllm: the vllm package is not installed "
                                     "(pip install vllm, on a machine with a GPU)") from None
        self.llm = vllm.LLM(model=model_path, seed=0)
        self.model_id, self.batch_size = model_path, batch_size
        self.fingerprint = sha256_json({"vllm": model_path})

    def generate(self, texts: list[str], strategy, seeds: list[int]) -> list[Generation]:
        from vllm import SamplingParams

        params = [SamplingParams(n=1, max_tokens=strategy.max_new_tokens, seed=seed, logprobs=5,
                                 temperature=strategy.temperature if strategy.do_sample else 0.0,
                                 top_p=strategy.top_p if strategy.do_sample else 1.0,
                                 top_k=(strategy.top_k or -1) if strategy.do_sample else -1) for seed in seeds]
        gens = []
        for out in self.llm.generate(texts, params, use_tqdm=False):
            o = out.outputs[0]
            chosen = [step[t].logprob for t, step in zip(o.token_ids, o.logprobs or [])]
            tops = [{k: v.logprob for k, v in step.items()} for step in (o.logprobs or [])]
            gens.append(Generation(o.text, list(o.token_ids), "stop" if o.finish_reason == "stop" else "length",
                                   scores_from_top_logprobs(chosen, tops), self.scores_from))
        return gens


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


def make_backend(recipe, teacher=None):
    """The backend a recipe asks for; ``teacher`` (a TeacherConfig) overrides ``recipe.teacher``."""
    cfg = recipe.generate
    teacher = teacher or recipe.teacher
    b = cfg.backend
    if b.kind == "openai":
        key = os.environ.get(b.api_key_env) if b.api_key_env else None
        if b.api_key_env and not key:
            raise BackendUnavailable(f"generate.backend.api_key_env: ${b.api_key_env} is not set")
        return OpenAIBackend(b.base_url, b.model or teacher.model, api_key=key, batch_size=b.batch_size,
                             timeout_s=b.timeout_s)
    if b.kind == "vllm":
        from distillery.models.load import resolve_source

        return VLLMBackend(resolve_source(teacher.model, recipe.cache_dir, teacher.gguf_file)[0], b.batch_size)
    from distillery.models.load import load_model

    loaded = load_model(teacher.model, device=teacher.device, dtype=teacher.dtype, cache=recipe.cache_dir,
                        gguf_file=teacher.gguf_file, offload=teacher.offload)
    return TransformersBackend(loaded.model, loaded.tokenizer, teacher.model, b.batch_size)


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
