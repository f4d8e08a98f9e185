"""Does a student distilled from the logit store learn as well as one distilled from the live
teacher? Same half-depth student, same Austen blocks, steps and seed; the store keeps the
teacher's top-64 log-probs (8-bit) and the tail mass in one bucket. Three students: the live
teacher with the same top-64 and tail treatment (the store's claim: same settings, same result),
the store, and the live teacher's dense distribution (what top-k itself costs).

    python benchmarks/store_vs_online.py [--quick] [--steps N]
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--k", type=int, default=64)
    args = ap.parse_args()
    steps = args.steps or (8 if args.quick else 60)
    n_eval = 8 if args.quick else 24

    teacher = load_model("builtin:smollm2-135m-instruct")
    train_blocks, held = to_blocks(read_austen(["persuasion"]), teacher.tokenizer, 128, 0.1)
    train_blocks, held = train_blocks[: steps * 4], held[:n_eval]
    keep = choose_layers(CutConfig(num_layers=15, select="importance"), 30, teacher.model, train_blocks[:8])
    online = OnlineTeacher(teacher.model, model_id="smollm2-135m-instruct", tokenizer_fingerprint=teacher.fingerprint)
    cfg = DistillConfig(steps=steps, batch_size=4, lr=2e-4, warmup_steps=5, checkpoint_every=10_000,
                        losses=LossesConfig(kd={"divergence": "forward_kl", "temperature": 1.0, "tail": "bucket"}))
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        store = capture(online, train_blocks, Path(tmp) / "logits", k=args.k, temperature=1.0, progress=True)
        capture_s = time.perf_counter() - t0
        store.verify()
        online_topk = OnlineTeacher(teacher.model, model_id="smollm2-135m-instruct",
                                    tokenizer_fingerprint=teacher.fingerprint, top_k=args.k)
        for name, signal in (("online", online_topk), ("store", StoredTeacher(store)), ("online_dense", online)):
            student = cut_layers(teacher.model, keep)
            t0 = time.perf_counter()
            train(student, signal, train_blocks, cfg, out_dir=Path(tmp) / name, seed=0, progress=True, log=print)
            results[name] = {"seconds": time.perf_counter() - t0,
                             **evaluate_models({name: student}, held, teacher=teacher.model)[name]}
    metrics = {f"{n}_{k}": v for n, r in results.items() for k, v in r.items() if k != "tokens"}
    # Same settings (top-k, tail treatment): what the store itself changes (8-bit log-probs, I/O).
    metrics["kl_store_over_online"] = results["store"]["kl_to_teacher"] / results["online"]["kl_to_teacher"]
    # Against the dense teacher: what keeping only the top k costs on top of that.
    metrics["kl_store_over_online_dense"] = results["store"]["kl_to_teacher"] / results["online_dense"]["kl_to_teacher"]
    metrics["train_time_store_over_online"] = results["store"]["seconds"] / results["online"]["seconds"]
    metrics["capture_seconds"] = capture_s
    print_table([(n, f"{r['kl_to_teacher']:.4f}", f"{r['perplexity']:.1f}", f"{r['seconds']:.0f}")
                 for n, r in results.items()], ("teacher signal", "held-out KL", "perplexity", "train seconds"))
    print(f"KL store / online top-{args.k} = {metrics['kl_store_over_online']:.4f} (target within 5%: 0.95..1.05); "
          f"store / online dense = {metrics['kl_store_over_online_dense']:.4f}")
    write_results("store_vs_online" + ("_quick" if args.quick else ""), metrics,
                  {"steps": steps, "k": args.k, "batch_size": 4, "block_size": 128, "kept_layers": keep,
                   "eval_blocks": n_eval})


if __name__ == "__main__":
    main()
