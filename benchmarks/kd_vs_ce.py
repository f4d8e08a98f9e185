"""Does distillation beat plain fine-tuning? Cross-entropy alone vs token-level KD, same student,
same text, same token budget and seed, on the real SmolLM2-135M-Instruct teacher.

The student keeps 15 of the teacher's 30 layers (chosen by block influence). The KD run mixes the
task cross-entropy into forward KL (--kd-ce-weight, default 0.5; 0 gives pure KL). Both runs train on
Jane Austen; both are scored on held-out Austen (in-domain) and on Wikipedia text (another domain),
by perplexity and by KL to the teacher.

    python benchmarks/kd_vs_ce.py [--quick] [--steps N]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from _common import print_table, write_results

from distillery.data.sources import read_austen, read_gensim_wiki, to_blocks
from distillery.evaluate.quality import evaluate_models
from distillery.models.load import load_model
from distillery.models.student import choose_layers, cut_layers
from distillery.recipe import CutConfig, DistillConfig, LossesConfig
from distillery.signals.online import OnlineTeacher
from distillery.train.loop import train


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="20 steps, 8 eval blocks: checks the script, not the claim")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--eval-blocks", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--kd-ce-weight", type=float, default=0.5,
                    help="task CE mixed into the KD run (0 = pure forward KL); the CE run is CE alone")
    args = ap.parse_args()
    steps = args.steps or (20 if args.quick else 150)
    n_eval = args.eval_blocks or (8 if args.quick else 32)

    teacher = load_model("builtin:smollm2-135m-instruct")
    tok = teacher.tokenizer
    train_in, held_in = to_blocks(read_austen(["prideprejudice", "persuasion", "emma"]), tok, 128, 0.05)
    _, held_out = to_blocks(read_gensim_wiki(), tok, 128, 0.1)
    held_in, held_out = held_in[:n_eval], held_out[:n_eval]
    keep = choose_layers(CutConfig(num_layers=15, select="importance"), 30, teacher.model, train_in[:8])
    signal = OnlineTeacher(teacher.model, model_id="smollm2-135m-instruct", tokenizer_fingerprint=teacher.fingerprint)

    setups = {
        "ce": LossesConfig(ce_weight=1.0, kd={"weight": 0.0}),
        "kd": LossesConfig(ce_weight=args.kd_ce_weight,
                           kd={"divergence": "forward_kl", "weight": 1.0, "temperature": 1.0}),
    }
    students, seconds = {}, {}
    for name, losses in setups.items():
        student = cut_layers(teacher.model, keep)
        cfg = DistillConfig(steps=steps, batch_size=4, lr=2e-4, warmup_steps=10, schedule="cosine",
                            checkpoint_every=10_000, losses=losses)
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory() as out:
            train(student, signal, train_in, cfg, out_dir=Path(out), seed=args.seed, progress=True, log=print)
        seconds[name] = time.perf_counter() - t0
        students[name] = student

    scores = {dom: evaluate_models(students, blocks, teacher=teacher.model, progress=True)
              for dom, blocks in (("in", held_in), ("out", held_out))}
    metrics = {}
    for dom in ("in", "out"):
        metrics[f"ppl_teacher_{dom}"] = scores[dom]["teacher"]["perplexity"]
        for name in ("ce", "kd"):
            metrics[f"ppl_{name}_{dom}"] = scores[dom][name]["perplexity"]
            metrics[f"kl_{name}_{dom}"] = scores[dom][name]["kl_to_teacher"]
    metrics["ppl_kd_over_ce_in"] = metrics["ppl_kd_in"] / metrics["ppl_ce_in"]
    metrics["ppl_kd_over_ce_out"] = metrics["ppl_kd_out"] / metrics["ppl_ce_out"]
    metrics["kl_kd_over_ce_in"] = metrics["kl_kd_in"] / metrics["kl_ce_in"]
    metrics["kl_kd_over_ce_out"] = metrics["kl_kd_out"] / metrics["kl_ce_out"]
    metrics.update({f"train_seconds_{k}": v for k, v in seconds.items()})

    rows = [(dom, f"{metrics[f'ppl_teacher_{dom}']:.1f}", f"{metrics[f'ppl_ce_{dom}']:.1f}",
             f"{metrics[f'ppl_kd_{dom}']:.1f}", f"{metrics[f'kl_ce_{dom}']:.3f}", f"{metrics[f'kl_kd_{dom}']:.3f}")
            for dom in ("in", "out")]
    print_table(rows, ("domain", "ppl teacher", "ppl CE", "ppl KD", "KL CE", "KL KD"))
    print(f"KD/CE perplexity: in {metrics['ppl_kd_over_ce_in']:.3f} (target <= 1.02), "
          f"out {metrics['ppl_kd_over_ce_out']:.3f} (target <= 0.80); "
          f"KL: in {metrics['kl_kd_over_ce_in']:.3f}, out {metrics['kl_kd_over_ce_out']:.3f} (targets <= 0.80)")
    path = write_results("kd_vs_ce" + ("_quick" if args.quick else ""), metrics,
                         {"steps": steps, "batch_size": 4, "block_size": 128, "lr": 2e-4, "seed": args.seed,
                          "kept_layers": keep, "eval_blocks": n_eval, "train": "austen (P&P, Persuasion, Emma)",
                          "kd_losses": "forward KL (T=1) + %g x CE" % args.kd_ce_weight,
                          "out_domain": "gensim enwiki excerpt"})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
