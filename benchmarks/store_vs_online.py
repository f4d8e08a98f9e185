"""Does a student distilled from the logit store learn as well as one distilled from the live
teacher, and how few bytes per token can the store spend? Same half-depth student, same Austen
blocks, steps and seed for every student. The baseline is the live teacher's dense distribution;
each store encoding (docs/logit-store.md) is captured, then a student is trained from it alone:

- ``topk64``: the original store, top-64 log-probs (8-bit) and the tail mass in one bucket;
- ``sampled N``: N tokens drawn from the teacher per position, kept as distinct ids with counts
  (RS-KD: an unbiased estimate of the forward KL and its gradient);
- ``topk K + N``: the exact top K plus N tokens drawn from the rest.

``--online-topk`` adds the live teacher with top-64 and the same tail treatment (the store's first
claim: same settings, same result; measured before as 1.0001x).

    python benchmarks/store_vs_online.py [--quick] [--steps N] [--online-topk] [--variants a,b,...]

Metrics: per variant ``<name>_bytes_per_token`` and ``<name>_kl_ratio_vs_dense`` (held-out KL to the
teacher over the dense-trained student's); ``budget_*``: the variant with the lowest KL ratio among
those at <= 114 bytes/token (DistillKit's budget setting). Targets: budget_bytes_per_token <= 114,
budget_kl_ratio_vs_dense <= 1.02.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from _common import print_table, write_results

from distillery.data.sources import read_austen, to_blocks
from distillery.evaluate.quality import evaluate_models
from distillery.models.load import load_model
from distillery.models.student import choose_layers, cut_layers
from distillery.recipe import CutConfig, DistillConfig, LossesConfig
from distillery.signals.capture import capture
from distillery.signals.online import OnlineTeacher
from distillery.signals.store import StoredTeacher
from distillery.train.loop import train

BUDGET = 114.0  # bytes/token: DistillKit's "budget" logit-cache setting
# name: (encoding, k, draws)
VARIANTS = {
    "topk64": ("topk", 64, 0),
    "sampled16": ("sampled", 0, 16),
    "sampled32": ("sampled", 0, 32),
    "sampled64": ("sampled", 0, 64),
    "topk8_sampled16": ("topk_sampled", 8, 16),
    "topk8_sampled24": ("topk_sampled", 8, 24),
    "topk16_sampled16": ("topk_sampled", 16, 16),
}
DEFAULT = "topk64,sampled32,topk8_sampled24"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--online-topk", action="store_true", help="also train from the live teacher's top-64")
    ap.add_argument("--variants", default=DEFAULT, help=f"comma-separated, from {', '.join(VARIANTS)}")
    ap.add_argument("--merge", action="store_true",
                    help="add these variants to the results file's table; its dense baseline must be reproduced "
                         "exactly by this run (same steps, seed and data), else the run is refused")
    args = ap.parse_args()
    names = [v for v in args.variants.split(",") if v]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        ap.error(f"--variants: unknown {', '.join(unknown)}; expected some of {', '.join(VARIANTS)}")
    steps = args.steps or (8 if args.quick else 60)
    n_eval = 8 if args.quick else 24
    t_start = time.perf_counter()

    teacher = load_model("builtin:smollm2-135m-instruct")
    train_blocks, held = to_blocks(read_austen(["persuasion"]), teacher.tokenizer, 128, 0.1)
    train_blocks, held = train_blocks[: steps * 4], held[:n_eval]
    keep = choose_layers(CutConfig(num_layers=15, select="importance"), 30, teacher.model, train_blocks[:8])
    online = OnlineTeacher(teacher.model, model_id="smollm2-135m-instruct", tokenizer_fingerprint=teacher.fingerprint)
    cfg = DistillConfig(steps=steps, batch_size=4, lr=2e-4, warmup_steps=5, checkpoint_every=10_000,
                        losses=LossesConfig(kd={"divergence": "forward_kl", "temperature": 1.0, "tail": "bucket"}))
    results: dict[str, dict] = {}

    def save(metrics: dict) -> None:
        write_results("store_vs_online" + ("_quick" if args.quick else ""), metrics,
                      {"steps": steps, "batch_size": 4, "block_size": 128, "kept_layers": keep, "eval_blocks": n_eval,
                       "variants": {n: dict(zip(("encoding", "k", "draws"), VARIANTS[n]))
                                    for n in results if n in VARIANTS},
                       "online_topk": args.online_topk, "seed": 0, "capture_seed": 0})

    def distil(name: str, signal) -> None:
        student = cut_layers(teacher.model, keep)
        t0 = time.perf_counter()
        train(student, signal, train_blocks, cfg, out_dir=Path(tmp) / name, seed=0, progress=True, log=print)
        results[name] = {**results.get(name, {}), "seconds": time.perf_counter() - t0,
                         **evaluate_models({name: student}, held, teacher=teacher.model)[name]}

    with tempfile.TemporaryDirectory() as tmp:
        distil("online_dense", online)
        to_run = list(names)
        if args.merge:
            names = merge_previous(results, names, "store_vs_online" + ("_quick" if args.quick else ""), steps)
        if args.online_topk:
            distil("online", OnlineTeacher(teacher.model, model_id="smollm2-135m-instruct",
                                           tokenizer_fingerprint=teacher.fingerprint, top_k=64))
        for name in to_run:
            encoding, k, draws = VARIANTS[name]
            t0 = time.perf_counter()
            store = capture(online, train_blocks, Path(tmp) / f"logits-{name}", k=k, temperature=1.0,
                            encoding=encoding, draws=draws, seed=0, progress=True)
            store.verify()
            results[name] = {"capture_seconds": time.perf_counter() - t0,
                             "bytes_per_token": store.bytes_on_disk() / store.manifest["tokens"]}
            distil(name, StoredTeacher(store))
            save({**summarize(results, names), "wall_seconds": time.perf_counter() - t_start})

    metrics = summarize(results, names)
    metrics["wall_seconds"] = time.perf_counter() - t_start
    within = "budget_encoding" in metrics
    print_table([(n, f"{r['bytes_per_token']:.1f}" if "bytes_per_token" in r else "live",
                  f"{r['kl_to_teacher']:.4f}", f"{r['kl_ratio_vs_dense']:.4f}", f"{r['perplexity']:.1f}",
                  f"{r['seconds']:.0f}") for n, r in results.items()],
                ("teacher signal", "bytes/token", "held-out KL", "KL / dense", "perplexity", "train seconds"))
    if within:
        ok = metrics["budget_kl_ratio_vs_dense"] <= 1.02
        print(f"budget: {metrics['budget_encoding']} at {metrics['budget_bytes_per_token']:.1f} bytes/token "
              f"(target <= {BUDGET:.0f}), KL / dense {metrics['budget_kl_ratio_vs_dense']:.4f} (target <= 1.02: "
              f"{'ok' if ok else 'MISSED'})")
    else:
        print(f"budget: no variant at <= {BUDGET:.0f} bytes/token (MISSED)")
    save(metrics)


def merge_previous(results: dict[str, dict], names: list[str], name: str, steps: int) -> list[str]:
    """Load the variants of an earlier run into ``results`` (those not run again here), after checking
    that this run's dense student is the earlier one's to 1e-9: same steps, seed, data, machine maths."""
    import json

    from _common import RESULTS

    old = json.loads((RESULTS / f"{name}.json").read_text())
    m, cfg = old["metrics"], old["config"]
    was, now = m["online_dense_kl_to_teacher"], results["online_dense"]["kl_to_teacher"]
    if cfg["steps"] != steps or abs(was / now - 1) > 1e-9:
        raise SystemExit(f"--merge: the earlier run's dense baseline differs (steps {cfg['steps']} vs {steps}, "
                         f"held-out KL {was!r} vs {now!r}); run every variant together instead")
    for prev in cfg["variants"]:
        if prev not in names:
            results[prev] = {key.removeprefix(prev + "_"): v for key, v in m.items() if key.startswith(prev + "_")}
    print(f"--merge: dense baseline reproduced ({now:.9f}); kept {', '.join(p for p in cfg['variants'] if p not in names)}")
    return [p for p in cfg["variants"] if p not in names] + names


def summarize(results: dict[str, dict], names: list[str]) -> dict:
    """The metrics of the students trained so far (written after each one, so a run cut short keeps them)."""
    dense_kl = results["online_dense"]["kl_to_teacher"]
    for r in results.values():
        if "kl_to_teacher" in r:
            r["kl_ratio_vs_dense"] = r["kl_to_teacher"] / dense_kl
    done = [n for n in names if "kl_to_teacher" in results.get(n, {})]
    metrics = {f"{n}_{key}": v for n, r in results.items() for key, v in r.items() if key != "tokens"}
    # The original store's names, kept: top-64 from the store against the dense and the top-64 live teacher.
    if "topk64" in done:
        metrics.update({f"store_{key}": v for key, v in results["topk64"].items() if key != "tokens"})
        metrics["kl_store_over_online_dense"] = results["topk64"]["kl_ratio_vs_dense"]
        metrics["capture_seconds"] = results["topk64"]["capture_seconds"]
        if "online" in results:
            metrics["kl_store_over_online"] = results["topk64"]["kl_to_teacher"] / results["online"]["kl_to_teacher"]
            metrics["train_time_store_over_online"] = results["topk64"]["seconds"] / results["online"]["seconds"]
    within = [n for n in done if results[n]["bytes_per_token"] <= BUDGET]
    if within:
        best = min(within, key=lambda n: results[n]["kl_ratio_vs_dense"])
        metrics["budget_encoding"] = best
        metrics["budget_bytes_per_token"] = results[best]["bytes_per_token"]
        metrics["budget_kl_ratio_vs_dense"] = results[best]["kl_ratio_vs_dense"]
    metrics["variants_done"] = len(done)
    return metrics


if __name__ == "__main__":
    main()
