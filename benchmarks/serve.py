"""The server under load on the real SmolLM2-135M-Instruct: dynamic batching against one request at a
time, and the calibrated router on held-out prompts.

Throughput: two servers over the same model on loopback ports, one batching up to 8 sequences, one
with batches of 1; the same chat requests (greedy, 8 in flight at once) go to each in alternating
rounds, so machine load hits both alike. Reports generated tokens/s, requests/s and p50/p95/p99
latency per mode, ``batching_speedup`` (tokens/s ratio, and its per-round spread) and the count of
5xx answers (must be 0).

Router: the student (``--student``, a distilled model folder; by default a 28-of-30-layer cut of the
teacher, undistilled) is calibrated on one set of held-out prompts for 95% of the teacher's quality
(ROUGE-L agreement with the teacher's answer); then a server with that calibration answers a
*different* set through its router, and its answers are scored against the teacher's own.
``router_teacher_share`` is the share the router sent to the teacher there, ``router_quality_gap``
the achieved quality minus the target, in points (negative: short of it).

    python benchmarks/serve.py [--quick] [--student runs/NAME/student]
"""

from __future__ import annotations

import argparse
import asyncio
import math
import statistics
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
from _common import print_table, spread, write_results

from distillery.data.prompts import make_tasks
from distillery.evaluate.text import rouge_l
from distillery.models.load import load_model
from distillery.serve.app import ServerThread, create_app
from distillery.serve.config import ServeConfig
from distillery.serve.router import calibrate_config

TEACHER = "builtin:smollm2-135m-instruct"
TASKS = ["arithmetic", "copy", "format"]


async def load(url: str, bodies: list[dict], concurrency: int) -> tuple[list[tuple[int, float, dict | None]], float]:
    """Send ``bodies`` to /v1/chat/completions with ``concurrency`` in flight; (status, latency, body) each."""
    sem = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=1200,
                                 limits=httpx.Limits(max_connections=concurrency)) as client:
        async def one(body: dict):
            async with sem:
                t0 = time.perf_counter()
                r = await client.post("/v1/chat/completions", json=body)
                return r.status_code, time.perf_counter() - t0, (r.json() if r.status_code == 200 else None)

        t0 = time.perf_counter()
        results = await asyncio.gather(*[one(b) for b in bodies])
        return results, time.perf_counter() - t0


def chat(model: str, text: str, max_tokens: int) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": max_tokens, "temperature": 0}


def percentiles(values: list[float]) -> dict:
    p = np.percentile(values, [50, 95, 99])
    return {"p50": float(p[0]), "p95": float(p[1]), "p99": float(p[2])}


def throughput(loaded, args) -> dict:
    n, rounds = args.requests, args.rounds
    texts = [p.text for p in make_tasks(n, TASKS, seed=0)]
    servers = {}
    for mode, size in (("batched", args.batch_size), ("single", 1)):
        cfg = ServeConfig(models=[{"name": "smollm2", "path": TEACHER, "batching": {
            "max_batch_size": size, "max_wait_ms": args.max_wait_ms, "max_queue": max(256, n)}}],
            limits={"max_tokens": args.max_tokens})
        servers[mode] = ServerThread(create_app(cfg, preloaded={"smollm2": (loaded.model, loaded.tokenizer)}))
    stats = {m: {"latency": [], "tokens": 0, "requests": 0, "seconds": 0.0, "5xx": 0, "4xx": 0} for m in servers}
    per_round = []
    with servers["batched"] as batched, servers["single"] as single:
        urls = {"batched": batched.url, "single": single.url}
        for url in urls.values():  # warm-up
            asyncio.run(load(url, [chat("smollm2", "Hi", 4)] * 2, 2))
        chunk = -(-n // rounds)
        for r in range(rounds):
            bodies = [chat("smollm2", t, args.max_tokens) for t in texts[r * chunk:(r + 1) * chunk]]
            if not bodies:
                break
            rates = {}
            for mode in (("batched", "single") if r % 2 == 0 else ("single", "batched")):
                results, wall = asyncio.run(load(urls[mode], bodies, args.concurrency))
                s = stats[mode]
                toks = sum(b["usage"]["completion_tokens"] for code, _, b in results if code == 200)
                s["tokens"] += toks
                s["requests"] += len(results)
                s["seconds"] += wall
                s["latency"] += [dt for code, dt, _ in results if code == 200]
                s["5xx"] += sum(code >= 500 for code, _, _ in results)
                s["4xx"] += sum(400 <= code < 500 for code, _, _ in results)
                rates[mode] = toks / wall
                print(f"round {r + 1}/{rounds} {mode:7s}: {len(results)} requests, {toks / wall:6.1f} tokens/s, "
                      f"{len(results) / wall:5.2f} requests/s")
            per_round.append(rates["batched"] / rates["single"])
        mean_batch = {m: (s.app.state.backends["smollm2"].batcher.jobs_run
                          / max(s.app.state.backends["smollm2"].batcher.batches_run, 1))
                      for m, s in (("batched", batched), ("single", single))}
    metrics = {}
    for mode, s in stats.items():
        metrics[f"{mode}_tokens_per_s"] = s["tokens"] / s["seconds"]
        metrics[f"{mode}_requests_per_s"] = s["requests"] / s["seconds"]
        metrics[f"{mode}_mean_batch_size"] = mean_batch[mode]
        metrics[f"{mode}_5xx"] = s["5xx"]
        metrics[f"{mode}_4xx"] = s["4xx"]
        metrics.update({f"{mode}_latency_{k}_s": v for k, v in percentiles(s["latency"]).items()})
    metrics["batching_speedup"] = metrics["batched_tokens_per_s"] / metrics["single_tokens_per_s"]
    sp = spread(per_round)
    metrics.update({"batching_speedup_round_median": sp["median"], "batching_speedup_round_min": sp["min"],
                    "batching_speedup_round_max": sp["max"], "requests_per_mode": stats["batched"]["requests"]})
    print()
    print_table([(m, f"{metrics[m + '_tokens_per_s']:.1f}", f"{metrics[m + '_requests_per_s']:.2f}",
                  f"{metrics[m + '_latency_p50_s']:.2f}", f"{metrics[m + '_latency_p95_s']:.2f}",
                  f"{metrics[m + '_latency_p99_s']:.2f}", f"{metrics[m + '_mean_batch_size']:.2f}",
                  metrics[m + "_5xx"]) for m in ("batched", "single")],
                ("mode", "tokens/s", "req/s", "p50 s", "p95 s", "p99 s", "batch", "5xx"))
    print(f"\nbatching_speedup {metrics['batching_speedup']:.2f}x (per round: median {sp['median']:.2f}, "
          f"min {sp['min']:.2f}, max {sp['max']:.2f})")
    return metrics


def router(loaded, args) -> dict:
    from distillery.models.student import cut_layers, evenly_spaced

    if args.student:
        s = load_model(args.student)
        student = (s.model, s.tokenizer)
    else:
        total = loaded.model.config.num_hidden_layers
        student = (cut_layers(loaded.model, evenly_spaced(total, args.keep_layers)).eval(), loaded.tokenizer)
    pre = {"student": student, "teacher": (loaded.model, loaded.tokenizer)}
    calib = [p.text for p in make_tasks(args.router_prompts, TASKS, seed=1)]
    held = [p.text for p in make_tasks(args.router_prompts, TASKS, seed=2)]
    held = [t for t in held if t not in set(calib)]  # different prompts, not just a different order
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "router.json"
        models = [{"name": "student", "path": args.student or TEACHER}, {"name": "teacher", "path": TEACHER}]
        base = {"models": models, "limits": {"max_tokens": args.max_tokens}}
        cal = calibrate_config(ServeConfig(**base, router={"student": "student", "teacher": "teacher"}),
                               calib, out=path, preloaded=pre, target=args.target, metric="rouge_l",
                               max_tokens=args.max_tokens)
        cfg = ServeConfig(**base, router={"student": "student", "teacher": "teacher", "calibration": str(path)})
        with ServerThread(create_app(cfg, preloaded=pre)) as srv:
            routed, _ = asyncio.run(load(srv.url, [chat("router", t, args.max_tokens) for t in held], args.concurrency))
            direct, _ = asyncio.run(load(srv.url, [chat("teacher", t, args.max_tokens) for t in held],
                                         args.concurrency))
    bad = [code for code, _, _ in routed + direct if code != 200]
    if bad:
        raise SystemExit(f"router benchmark: {len(bad)} requests failed (status {sorted(set(bad))})")
    answers = [b["choices"][0]["message"]["content"] for _, _, b in routed]
    teacher = [b["choices"][0]["message"]["content"] for _, _, b in direct]
    quality = statistics.fmean(rouge_l(answers, teacher))
    share = statistics.fmean(b["distillery"]["routed_to"] == "teacher" for _, _, b in routed)
    m = {"router_calibration_teacher_share": cal.teacher_share, "router_calibration_expected_quality":
         cal.expected_quality, "router_threshold": None if math.isinf(cal.threshold) else cal.threshold,
         "router_teacher_share": share,
         "router_quality": quality, "router_target": args.target,
         "router_quality_gap": 100 * (quality - args.target * cal.teacher_quality),
         "router_student_only_quality": cal.student_quality, "router_prompts_calibration": len(calib),
         "router_prompts_heldout": len(held)}
    print()
    print_table([("calibration", len(calib), f"{cal.teacher_share:.2f}", f"{cal.expected_quality:.3f}"),
                 ("held-out (router)", len(held), f"{share:.2f}", f"{quality:.3f}")],
                ("prompts", "n", "teacher share", "quality vs teacher"))
    print(f"\nthreshold {cal.threshold:.4f}; target {args.target:.2f}; router_quality_gap "
          f"{m['router_quality_gap']:+.1f} points; student alone {cal.student_quality:.3f}")
    return m


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--requests", type=int)
    ap.add_argument("--rounds", type=int)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-wait-ms", type=float, default=10.0)
    ap.add_argument("--max-tokens", type=int)
    ap.add_argument("--student", help="a distilled student folder (default: a cut of the teacher, --keep-layers)")
    ap.add_argument("--keep-layers", type=int, default=28, help="layers of the default cut student (of 30)")
    ap.add_argument("--router-prompts", type=int)
    ap.add_argument("--target", type=float, default=0.95)
    ap.add_argument("--skip-router", action="store_true")
    ap.add_argument("--skip-throughput", action="store_true")
    args = ap.parse_args()
    args.requests = args.requests or (24 if args.quick else 200)
    args.rounds = args.rounds or (2 if args.quick else 4)
    args.max_tokens = args.max_tokens or (12 if args.quick else 32)
    args.router_prompts = args.router_prompts or (16 if args.quick else 120)
    loaded = load_model(TEACHER, device="auto")
    metrics = {} if args.skip_throughput else throughput(loaded, args)
    if not args.skip_router:
        metrics.update(router(loaded, args))
    config = {k: v for k, v in vars(args).items()}
    config.update({"model": TEACHER, "tasks": TASKS})
    write_results("serve", metrics, config)


if __name__ == "__main__":
    main()
