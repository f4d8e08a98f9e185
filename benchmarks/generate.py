"""Batched vs one-prompt-at-a-time greedy generation on the real SmolLM2-135M-Instruct teacher.

Chunks of prompts alternate between the two modes (batched chunk, then the same prompts one by
one), so machine load hits both alike; the per-chunk speedups give the spread. Also reports how
many prompts get the same greedy tokens both ways (padding may change float rounding), and
whether the confidence score (mean log-prob) separates correct from wrong answers.

    python benchmarks/generate.py [--quick]
"""

from __future__ import annotations

import argparse
import time

from _common import print_table, spread, write_results

from distillery.data.backends import TransformersBackend
from distillery.data.prompts import check_answer, make_tasks, render
from distillery.models.load import load_model
from distillery.recipe import DecodingConfig


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--prompts", type=int)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int)
    args = ap.parse_args()
    n = args.prompts or (48 if args.quick else 200)
    new_tokens = args.max_new_tokens or (16 if args.quick else 32)
    loaded = load_model("builtin:smollm2-135m-instruct", device="auto")
    backend = TransformersBackend(loaded.model, loaded.tokenizer, loaded.source, args.batch_size)
    prompts = make_tasks(n, ["arithmetic", "copy"], seed=0)
    texts = [render(p, loaded.tokenizer) for p in prompts]
    greedy = DecodingConfig(name="greedy", max_new_tokens=new_tokens)
    backend.generate(texts[:2], greedy, [0, 0])  # warm-up

    batched, single, speedups = [], [], []
    t_batched = t_single = 0.0
    for i in range(0, n, args.batch_size):
        chunk = texts[i:i + args.batch_size]
        t0 = time.perf_counter()
        b = backend.generate(chunk, greedy, [0] * len(chunk))
        tb = time.perf_counter() - t0
        t0 = time.perf_counter()
        s = [backend.generate([t], greedy, [0])[0] for t in chunk]
        ts = time.perf_counter() - t0
        batched += b
        single += s
        t_batched += tb
        t_single += ts
        tok_b, tok_s = sum(len(g.token_ids) for g in b), sum(len(g.token_ids) for g in s)
        speedups.append((tok_b / tb) / (tok_s / ts))
        print(f"chunk {i // args.batch_size + 1}: batched {tok_b / tb:7.1f} tok/s, single {tok_s / ts:6.1f} tok/s")

    tokens_b, tokens_s = sum(len(g.token_ids) for g in batched), sum(len(g.token_ids) for g in single)
    same = sum(a.token_ids == b.token_ids for a, b in zip(batched, single))
    correct = [check_answer(p, g.response) for p, g in zip(prompts, single)]
    conf = [g.scores["mean_logprob"] for g in single]
    median = sorted(conf)[len(conf) // 2]
    kept = [c for c, x in zip(correct, conf) if x >= median]
    dropped = [c for c, x in zip(correct, conf) if x < median]
    sp = spread(speedups)
    metrics = {
        "batched_tokens_per_s": tokens_b / t_batched, "single_tokens_per_s": tokens_s / t_single,
        "batched_speedup": (tokens_b / t_batched) / (tokens_s / t_single),
        "batched_speedup_chunk_median": sp["median"], "batched_speedup_chunk_min": sp["min"],
        "batched_speedup_chunk_max": sp["max"], "prompts": n, "same_greedy_outputs": same,
        "same_greedy_fraction": same / n, "accuracy": sum(correct) / n,
        "confidence_kept_accuracy": sum(kept) / len(kept), "confidence_kept_n": len(kept),
        "confidence_dropped_accuracy": sum(dropped) / max(len(dropped), 1), "confidence_dropped_n": len(dropped),
    }
    print()
    print_table([("batched", f"{tokens_b / t_batched:.1f}", tokens_b, f"{t_batched:.1f}"),
                 ("one at a time", f"{tokens_s / t_single:.1f}", tokens_s, f"{t_single:.1f}")],
                ("mode", "tokens/s", "tokens", "seconds"))
    print(f"\nbatched_speedup {metrics['batched_speedup']:.2f}x (per chunk: median {sp['median']:.2f}, "
          f"min {sp['min']:.2f}, max {sp['max']:.2f}); same greedy output {same}/{n}")
    print(f"confidence (mean log-prob >= median): kept accuracy {metrics['confidence_kept_accuracy']:.3f} "
          f"(n={len(kept)}), dropped {metrics['confidence_dropped_accuracy']:.3f} (n={len(dropped)})")
    write_results("generate", metrics, {"prompts": n, "batch_size": args.batch_size, "max_new_tokens": new_tokens,
                                        "teacher": loaded.source, "device": str(loaded.model.device),
                                        "tasks": ["arithmetic", "copy"], "quick": args.quick})


if __name__ == "__main__":
    main()
