"""Curation of teacher responses: verifiers, score/length/repetition filters, dedup, staging.

Every record keeps every decision (``decisions[filter] = True/False``) and the first reason it was
dropped (``dropped_by``), so the dataset card can count each filter and nothing is dropped silently.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import math
import re
from collections import Counter
from pathlib import Path

import numpy as np

from distillery.data.prompts import normalise
from distillery.data.sources import jsonl_rows

CONFIDENCE = "mean_logprob"  # the score that ranks records for staging


class CurateError(ValueError):
    """A curation setting that cannot be applied; the message names the verifier/filter/file."""


# ---------------------------------------------------------------- verifiers


def make_verifier(cfg):
    """A ``record -> bool`` from a VerifierConfig."""
    if cfg.kind == "regex":
        try:
            pattern = re.compile(cfg.pattern, re.S)
        except re.error as e:
            raise CurateError(f"verifier {cfg.name}: bad regex ({e})") from None
        return lambda rec: pattern.search(rec["response"]) is not None
    if cfg.kind == "python":
        return _import_function(cfg.name, cfg.function)
    if cfg.kind == "json_schema":
        return _json_schema_verifier(cfg)
    if cfg.kind == "answer":  # the task's own checkable answer
        return lambda rec: bool(rec.get("correct"))
    raise CurateError(f"verifier {cfg.name}: unknown kind {cfg.kind}")


def _import_function(name: str, spec: str):
    module, _, func = spec.partition(":")
    if not func:
        raise CurateError(f"verifier {name}: function must be module:function, got {spec!r}")
    try:
        return getattr(importlib.import_module(module), func)
    except (ImportError, AttributeError) as e:
        raise CurateError(f"verifier {name}: cannot import {spec} ({e})") from None


def _json_schema_verifier(cfg):
    import jsonschema

    schema = cfg.schema_
    if schema is None:
        try:
            schema = json.loads(Path(cfg.schema_path).read_text("utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise CurateError(f"verifier {cfg.name}: schema_path {cfg.schema_path}: {e}") from None
    try:
        validator = jsonschema.Draft202012Validator(schema)
        validator.check_schema(schema)
    except jsonschema.SchemaError as e:
        raise CurateError(f"verifier {cfg.name}: invalid JSON schema ({e.message})") from None

    def check(rec) -> bool:
        try:
            return validator.is_valid(json.loads(_json_part(rec["response"])))
        except json.JSONDecodeError:
            return False
    return check


def _json_part(text: str) -> str:
    """The JSON object in a response that may wrap it in prose or a code fence."""
    start, end = text.find("{"), text.rfind("}")
    return text[start:end + 1] if 0 <= start < end else text


# ---------------------------------------------------------------- filters


def repetition(text: str, n: int = 3) -> float:
    """Share of word n-grams that repeat an earlier one (0 = none, near 1 = a loop)."""
    words = text.split()
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    return 1 - len(set(grams)) / len(grams) if grams else 0.0


def score_bounds(records: list[dict], f) -> tuple[float, float]:
    """The [low, high] a ScoreFilterConfig allows, quantiles taken over all records with the score
    (numpy's default: linear interpolation between the closest ranks)."""
    values = [r["scores"][f.score] for r in records if _finite(r["scores"].get(f.score))]
    low = f.min if f.min is not None else -math.inf
    high = f.max if f.max is not None else math.inf
    if values and f.quantile_min is not None:
        low = max(low, float(np.quantile(values, f.quantile_min)))
    if values and f.quantile_max is not None:
        high = min(high, float(np.quantile(values, f.quantile_max)))
    return low, high


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def filter_name(f) -> str:
    parts = [f"{k}={getattr(f, k)}" for k in ("min", "max", "quantile_min", "quantile_max") if getattr(f, k) is not None]
    return f"score:{f.score}[{','.join(parts)}]"


def text_hash(rec: dict) -> str:
    return hashlib.sha256(f"{normalise(rec['prompt'])}\x00{normalise(rec['response'])}".encode()).hexdigest()


def _shingles(text: str, n: int = 5) -> set[bytes]:
    t = normalise(text)
    return {t[i:i + n].encode() for i in range(max(1, len(t) - n + 1))}


def near_duplicates(records: list[dict], threshold: float, num_perm: int = 128) -> set[int]:
    """Indices of records whose prompt+response is a near duplicate (MinHash LSH on character
    5-grams) of an earlier kept record."""
    from datasketch import MinHash, MinHashLSH

    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
    dups = set()
    for i, rec in enumerate(records):
        mh = MinHash(num_perm=num_perm, seed=1)
        mh.update_batch(list(_shingles(rec["prompt"] + "\n" + rec["response"])))
        if lsh.query(mh):
            dups.add(i)
        else:
            lsh.insert(str(i), mh)
    return dups


# ---------------------------------------------------------------- the curation pass


def curate(records: list[dict], cfg) -> dict:
    """Decide every record in place (``decisions``, ``kept``, ``dropped_by``); returns the counts.

    Order: verifiers, length, repetition, score filters, exact dedup, near dedup. Dedup runs
    last and only over records still kept, so a bad duplicate never shadows a good one."""
    checks = [(f"verifier:{v.name}", v.required, make_verifier(v)) for v in cfg.verifiers]
    checks.append(("length", True, lambda r: len(r["response"]) >= cfg.min_chars
                   and (cfg.max_chars is None or len(r["response"]) <= cfg.max_chars)))
    checks.append(("repetition", True, lambda r: repetition(r["response"]) <= cfg.max_repetition))
    for f in cfg.filters:
        low, high = score_bounds(records, f)
        checks.append((filter_name(f), True, lambda r, f=f, lo=low, hi=high:
                       _finite(r["scores"].get(f.score)) and lo <= r["scores"][f.score] <= hi))
    for rec in records:
        rec["decisions"], rec["dropped_by"] = {}, None
        for name, required, check in checks:
            ok = bool(check(rec))
            rec["decisions"][name] = ok
            if not ok and required and rec["dropped_by"] is None:
                rec["dropped_by"] = name
    _dedup(records, cfg)
    for rec in records:
        rec["kept"] = rec["dropped_by"] is None
    return filter_counts(records)


def _dedup(records: list[dict], cfg) -> None:
    live = [r for r in records if r["dropped_by"] is None]
    if cfg.exact_dedup:
        seen = set()
        for rec in live:
            h = text_hash(rec)
            rec["decisions"]["exact_dedup"] = h not in seen
            if h in seen:
                rec["dropped_by"] = "exact_dedup"
            seen.add(h)
        live = [r for r in live if r["dropped_by"] is None]
    if cfg.near_dup_threshold is not None and live:
        dups = near_duplicates(live, cfg.near_dup_threshold)
        for i, rec in enumerate(live):
            rec["decisions"]["near_dedup"] = i not in dups
            if i in dups:
                rec["dropped_by"] = "near_dedup"


def filter_counts(records: list[dict]) -> dict:
    failed, dropped = Counter(), Counter()
    for rec in records:
        failed.update(k for k, ok in rec["decisions"].items() if not ok)
        if rec["dropped_by"]:
            dropped[rec["dropped_by"]] += 1
    return {"records": len(records), "kept": sum(r["dropped_by"] is None for r in records),
            "failed": dict(failed), "dropped_by": dict(dropped)}


def confidence_accuracy(records: list[dict]) -> dict | None:
    """Accuracy of checkable records kept vs dropped by the score (confidence) filters alone."""
    rows = [r for r in records if r.get("correct") is not None]
    if not rows:
        return None
    def passes(r):
        return all(ok for k, ok in r["decisions"].items() if k.startswith("score:"))
    kept = [r["correct"] for r in rows if passes(r)]
    dropped = [r["correct"] for r in rows if not passes(r)]
    acc = lambda xs: sum(xs) / len(xs) if xs else float("nan")  # noqa: E731
    return {"kept_n": len(kept), "kept_correct": sum(kept), "kept_accuracy": acc(kept),
            "dropped_n": len(dropped), "dropped_correct": sum(dropped), "dropped_accuracy": acc(dropped),
            "all_accuracy": acc(kept + dropped)}


# ---------------------------------------------------------------- human review and staging


def import_review(records: list[dict], path: Path) -> int:
    """Apply a reviewed file (JSONL with ``id`` and ``verdict``: accept/reject); returns how many."""
    by_id = {r["id"]: r for r in records}
    applied = 0
    for n, row in jsonl_rows(Path(path)):
        verdict = row.get("verdict")
        if verdict is None:
            continue  # not reviewed yet
        if verdict not in ("accept", "reject"):
            raise CurateError(f"{path}:{n}: verdict must be accept or reject, got {verdict!r}")
        if row.get("id") not in by_id:
            raise CurateError(f"{path}:{n}: unknown record id {row.get('id')!r}")
        rec = by_id[row["id"]]
        rec["human_verdict"] = verdict
        rec["kept"] = verdict == "accept"
        rec["dropped_by"] = None if rec["kept"] else "human_review"
        applied += 1
    return applied


def stage(records: list[dict], cfg) -> None:
    """Put each kept record in ``seed`` (human-accepted, then highest confidence), ``review``
    (lowest confidence, not yet reviewed) or ``pool``; then a train/valid split by prompt, so all
    samples of one prompt land on the same side."""
    kept = [r for r in records if r["kept"]]
    ranked = sorted(kept, key=lambda r: (r.get("human_verdict") != "accept", -_conf(r), r["id"]))
    n_seed = round(cfg.seed_fraction * len(kept))
    unreviewed = sorted((r for r in kept if "human_verdict" not in r), key=lambda r: (_conf(r), r["id"]))
    n_review = round(cfg.review_fraction * len(kept))
    review_ids = {r["id"] for r in unreviewed[:n_review]}
    seed_ids = {r["id"] for r in ranked[:n_seed]} - review_ids
    for rec in records:
        rec["stage"] = (None if not rec["kept"] else "seed" if rec["id"] in seed_ids
                        else "review" if rec["id"] in review_ids else "pool")
        h = int(hashlib.sha256(rec["prompt_id"].encode()).hexdigest()[:8], 16) / 16 ** 8
        rec["split"] = "valid" if h < cfg.valid_fraction else "train"


def _conf(rec: dict) -> float:
    v = rec["scores"].get(CONFIDENCE)
    return v if _finite(v) else -math.inf
