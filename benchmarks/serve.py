"""The server under load on the real SmolLM2-135M-Instruct: dynamic batching against one request at a
time, and the calibrated router on held-out prompts.

Throughput: two servers over the same model on loopback ports, one batching up to 8 sequences, one
with batches of 1; the same chat requests (greedy, 8 in flight at once) go to each in alternating
rounds, so machine load hits both alike. Reports generated tokens/s, requests/s and p50/p95/p99
latency per mode, ``batching_speedup`` (tokens/s ratio, and its per-round spread) and the count of
5xx answers (must be 0).

Served teacher: two short KD runs of the same recipe (single_corpus.yaml's student, data and loss, fewer
steps), one from the teacher loaded locally (dense logits), one from a distillery server over the same
teacher on loopback (``teacher_source: served``, top-``--served-top-k`` prompt log-probs over HTTP,
the server's default cap); both students' held-out KL to the local teacher, and their ratio
(``served_kd_kl_ratio``, within 1.05 is the acceptance). The run folders are kept under ``--work``
(runs/ is git-ignored), so a rerun reuses finished runs.

Router: the student (``--student``, a model folder; by default the locally distilled student above)
is calibrated on one set of held-out prompts for 95% of the teacher's quality (ROUGE-L agreement
with the teacher's answer, the teacher scoring 1 on itself); then a server with that calibration
answers a *different* set through its router, and its answers are scored against the teacher's own
answers to that set. ``router_teacher_share`` is the share the router sent to the teacher there,
``router_quality_gap`` the achieved quality minus the target (0.95 x the teacher's), in points
(negative: short of it), ``router_share_gap`` the held-out teacher share minus the calibrated one.

A part left out (``--skip-*``) keeps its figures from the previous results file (named in the
config as ``kept_from_previous``).

    python benchmarks/serve.py [--quick] [--student MODEL_FOLDER] [--skip-throughput] [--skip-router] [--skip-kd]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import statistics
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
from _common import RESULTS, print_table, spread, write_results

from distillery.data.prompts import make_tasks
from distillery.evaluate.text import rouge_l
from distillery.models.load import load_model
from distillery.serve.app import ServerThread, create_app
from distillery.serve.config import ServeConfig
from distillery.serve.router import calibrate_config

TEACHER = "builtin:smollm2-135m-instruct"
ROOT = Path(__file__).resolve().parents[1]
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


def kd_recipe(work: Path, name: str, steps: int, eval_blocks: int, **distill) -> dict:
    """single_corpus.yaml's distillation (15-layer importance-selected student, Austen, forward KL) cut short."""
    return {
        "name": name, "seed": 0, "run_dir": str(work), "teacher": {"model": TEACHER},
        "student": {"from_teacher": {"num_layers": 15, "select": "importance", "calibration_blocks": 8}},
        "data": {"source": {"kind": "corpus", "name": "austen", "parts": ["prideprejudice", "persuasion", "emma"]},
                 "block_size": 128, "heldout_fraction": 0.05},
        "distill": {"steps": steps, "batch_size": 4, "lr": 2e-4, "warmup_steps": min(10, steps // 4),
                    "schedule": "cosine", "eval_every": steps, "eval_blocks": 4, "checkpoint_every": steps,
                    "losses": {"ce_weight": 0.0, "kd": {"divergence": "forward_kl", "weight": 1.0, "temperature": 1.0}},
                    **distill},
        "evaluate": {"eval_blocks": eval_blocks, "calibration": False},
        "report": {"enabled": False},
    }


def served_kd(loaded, args) -> tuple[dict, Path]:
    """The same short KD run from the local teacher and from our server over it; (metrics, local student)."""
    from distillery.pipeline import run_stages
    from distillery.recipe import parse_recipe

    def run(name: str, **distill) -> tuple[dict, float]:
        r = parse_recipe(kd_recipe(args.work, name, args.kd_steps, args.kd_eval_blocks, **distill))
        t0 = time.perf_counter()
        run_stages(r, progress=False, log=lambda m: None)
        seconds = time.perf_counter() - t0
        print(f"{name}: {seconds:.0f} s", flush=True)
        return json.loads((r.run_path / "eval" / "summary.json").read_text()), r.run_path

    tag = f"{args.kd_steps}s{args.kd_eval_blocks}e"
    local, local_path = run(f"serve-kd-local-{tag}")
    kl_l = local["student"]["kl_to_teacher"]
    m = {"served_kd_steps": args.kd_steps, "served_kd_top_k": max(args.served_top_k),
         "served_kd_kl_init": local["student_init"]["kl_to_teacher"], "served_kd_kl_local": kl_l,
         "served_kd_ppl_local": local["student"]["perplexity"]}
    rows = [("local (dense)", f"{m['served_kd_kl_init']:.4f}", f"{kl_l:.4f}", f"{m['served_kd_ppl_local']:.1f}", "1")]
    for k in sorted(args.served_top_k):
        cfg = ServeConfig(models=[{"name": "teacher", "path": TEACHER}], limits={"max_logprobs": k})
        # A fixed port: the base URL is in the recipe, so a rerun on the same port reuses the finished run.
        with ServerThread(create_app(cfg, preloaded={"teacher": (loaded.model, loaded.tokenizer)}),
                          port=args.kd_port) as srv:
            served, _ = run(f"serve-kd-served-k{k}-{tag}", teacher_source="served",
                            served={"base_url": srv.url, "model": "teacher", "top_k": k})
        kl_s = served["student"]["kl_to_teacher"]
        m.update({f"served_kd_kl_served_k{k}": kl_s, f"served_kd_kl_ratio_k{k}": kl_s / kl_l,
                  f"served_kd_ppl_served_k{k}": served["student"]["perplexity"]})
        rows.append((f"served (top-{k})", f"{m['served_kd_kl_init']:.4f}", f"{kl_s:.4f}",
                     f"{served['student']['perplexity']:.1f}", f"{kl_s / kl_l:.4f}"))
    # The headline: the largest k tried (each k's own figures are beside it).
    m["served_kd_kl_served"] = m[f"served_kd_kl_served_k{m['served_kd_top_k']}"]
    m["served_kd_kl_ratio"] = m[f"served_kd_kl_ratio_k{m['served_kd_top_k']}"]
    print()
    print_table(rows, ("teacher", "held-out KL before", "KL after", "ppl after", "KL / local"))
    print(f"\nserved_kd_kl_ratio {m['served_kd_kl_ratio']:.4f} at top-{m['served_kd_top_k']} (acceptance: within 1.05)")
    return m, local_path / "student"


def router(loaded, args, student_path) -> dict:
    args.router_student = str(student_path)  # into the results' config
    s = load_model(str(student_path))
    student = (s.model, s.tokenizer)
    pre = {"student": student, "teacher": (loaded.model, loaded.tokenizer)}
    calib = [p.text for p in make_tasks(args.router_prompts, TASKS, seed=1)]
    held = [p.text for p in make_tasks(args.router_prompts, TASKS, seed=2)]
    held = [t for t in held if t not in set(calib)]  # different prompts, not just a different order
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "router.json"
        models = [{"name": "student", "path": str(student_path)}, {"name": "teacher", "path": TEACHER}]
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
    scores = rouge_l(answers, teacher)
    quality = statistics.fmean(scores)
    by_teacher = [b["distillery"]["routed_to"] == "teacher" for _, _, b in routed]
    share = statistics.fmean(by_teacher)
    # The teacher's routed answers against its direct ones (batched with other prompts): 1 unless
    # batch composition changes a greedy answer, which would count against the router.
    deferred = [q for q, t in zip(scores, by_teacher) if t]
    kept = [q for q, t in zip(scores, by_teacher) if not t]
    m = {"router_calibration_teacher_share": cal.teacher_share, "router_calibration_expected_quality":
         cal.expected_quality, "router_threshold": None if math.isinf(cal.threshold) else cal.threshold,
         "router_teacher_share": share,
         "router_quality": quality, "router_target": args.target,
         "router_quality_gap": 100 * (quality - args.target * cal.teacher_quality),
         "router_share_gap": 100 * (share - cal.teacher_share),
         "router_student_only_quality": cal.student_quality, "router_prompts_calibration": len(calib),
         "router_teacher_self_agreement": statistics.fmean(deferred) if deferred else None,
         "router_kept_student_quality": statistics.fmean(kept) if kept else None,
         "router_prompts_heldout": len(held)}
    print()
    print_table([("calibration", len(calib), f"{cal.teacher_share:.2f}", f"{cal.expected_quality:.3f}"),
                 ("held-out (router)", len(held), f"{share:.2f}", f"{quality:.3f}")],
                ("prompts", "n", "teacher share", "quality vs teacher"))
    print(f"\nthreshold {cal.threshold:.4f}; target {args.target:.2f}; router_quality_gap "
          f"{m['router_quality_gap']:+.1f} points; router_share_gap {m['router_share_gap']:+.1f} points; "
          f"student alone {cal.student_quality:.3f}")
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
    ap.add_argument("--student", help="a model folder for the router (default: the locally distilled KD student)")
    ap.add_argument("--router-prompts", type=int)
    ap.add_argument("--target", type=float, default=0.95)
    ap.add_argument("--kd-steps", type=int)
    ap.add_argument("--kd-eval-blocks", type=int)
    ap.add_argument("--served-top-k", type=int, nargs="+", default=[100, 1000],
                    help="the served teacher's top-k, one KD run each (100: the server's default cap)")
    ap.add_argument("--kd-port", type=int, default=35823, help="loopback port of the KD runs' teacher server")
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "benchmark-serve", help="KD run folders (reused)")
    ap.add_argument("--skip-throughput", action="store_true")
    ap.add_argument("--skip-kd", action="store_true", help="needs --student or --skip-router")
    ap.add_argument("--skip-router", action="store_true")
    args = ap.parse_args()
    args.requests = args.requests or (24 if args.quick else 200)
    args.rounds = args.rounds or (2 if args.quick else 4)
    args.max_tokens = args.max_tokens or (12 if args.quick else 32)
    args.router_prompts = args.router_prompts or (16 if args.quick else 120)
    args.kd_steps = args.kd_steps or (4 if args.quick else 40)
    args.kd_eval_blocks = args.kd_eval_blocks or (4 if args.quick else 16)
    if args.skip_kd and not (args.student or args.skip_router):
        ap.error("--skip-kd leaves the router without a student: give --student or --skip-router")
    loaded = load_model(TEACHER, device="auto")
    metrics = {} if args.skip_throughput else throughput(loaded, args)
    student = args.student
    if not args.skip_kd:
        m, distilled = served_kd(loaded, args)
        metrics.update(m)
        student = student or distilled
    if not args.skip_router:
        metrics.update(router(loaded, args, student))
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    config.update({"model": TEACHER, "tasks": TASKS})
    name = "serve_quick" if args.quick else "serve"
    kept = keep_previous(name, metrics, args)
    if kept:
        config["kept_from_previous"] = kept
    write_results(name, metrics, config)


PARTS = {"throughput": ("batched_", "single_", "batching_", "requests_per_mode"), "kd": ("served_kd_",),
         "router": ("router_",)}


def keep_previous(name: str, metrics: dict, args) -> dict:
    """The figures of the parts skipped this time, from the previous results file (merged into
    ``metrics``); returns each kept part's config (the run that measured it)."""
    path = RESULTS / f"{name}.json"
    skipped = [p for p in PARTS if getattr(args, f"skip_{p}")]
    if not skipped or not path.is_file():
        return {}
    old = json.loads(path.read_text())
    old_metrics, old_config = old.get("metrics", {}), dict(old.get("config", {}))
    old_kept = old_config.pop("kept_from_previous", {})
    configs = {}
    for part in skipped:
        kept = {k: v for k, v in old_metrics.items() if k.startswith(PARTS[part]) and k not in metrics}
        if kept:
            metrics.update(kept)
            configs[part] = old_kept.get(part, old_config) if isinstance(old_kept, dict) else old_config
    return configs


if __name__ == "__main__":
    main()
