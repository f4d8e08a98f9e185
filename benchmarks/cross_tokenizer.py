"""Cross-tokenizer distillation: does a teacher with another vocabulary help? CE alone vs ULD vs the
GOLD-style hybrid, same student, text, token budget and seed.

The student keeps 15 of SmolLM2-135M-Instruct's 30 layers (chosen by block influence, as recipes/single_corpus.yaml's)
and its tokenizer; the teacher is Gemma 3 270M (vocabulary 262,144 against 49,152; `make gemma`), aligned
on byte offsets per block (signals/align.py). All runs train on Jane Austen with the task CE (weight 1 for
CE alone, 0.5 beside the cross-vocabulary terms) and are scored on held-out Austen (in-domain) and on
Wikipedia text (another domain) by perplexity, and by KL to SmolLM2 (the only teacher whose KL to the
student is defined token by token: Gemma predicts other tokens).

    python benchmarks/cross_tokenizer.py [--quick] [--steps N]
"""

from __future__ import annotations

import argparse
import importlib.util
import tempfile
import time
from pathlib import Path

from _common import cannot_run_here, print_table, write_results

from distillery.data.sources import read_austen, read_gensim_wiki, to_blocks
from distillery.evaluate.quality import evaluate_models
from distillery.models.load import BUILTINS, load_model
from distillery.models.layers import decoder_layers
from distillery.models.student import choose_layers, cut_layers
from distillery.recipe import CutConfig, DistillConfig, LossesConfig
from distillery.signals.cross import CrossTokenizerTeacher
from distillery.train.loop import train


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="6 steps, 4 eval blocks: checks the script, not the claim")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--eval-blocks", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--top-k", type=int, default=64)
    args = ap.parse_args()
    steps = args.steps or (6 if args.quick else 120)  # 120: recipes/cross_tokenizer.yaml's budget
    n_eval = args.eval_blocks or (4 if args.quick else 32)

    if importlib.util.find_spec(BUILTINS["gemma-3-270m"]["package"]) is None:
        cannot_run_here("cross_tokenizer: Gemma 3 270M is not installed (make gemma; Gemma Terms of Use)")
    smol = load_model("builtin:smollm2-135m-instruct", device="cpu")
    gemma = load_model("builtin:gemma-3-270m", device="cpu")
    tok = smol.tokenizer
    train_in, held_in = to_blocks(read_austen(["prideprejudice", "persuasion", "emma"]), tok, 128, 0.05)
    _, held_out = to_blocks(read_gensim_wiki(), tok, 128, 0.1)
    held_in, held_out = held_in[:n_eval], held_out[:n_eval]
    cut = CutConfig(num_layers=15, select="importance", calibration_blocks=8)
    keep = choose_layers(cut, len(decoder_layers(smol.model)), smol.model, train_in[: cut.calibration_blocks])
    t0 = time.perf_counter()
    signal = CrossTokenizerTeacher(gemma.model, gemma.tokenizer, tok, model_id="gemma-3-270m",
                                   student_fingerprint=smol.fingerprint, teacher_fingerprint=gemma.fingerprint,
                                   top_k=args.top_k, unmatched_k=args.top_k)
    bridge_s = time.perf_counter() - t0
    kd = {"divergence": "forward_kl", "weight": 1.0, "temperature": 1.0, "fused_lm_head": False}
    setups = {
        "ce": LossesConfig(ce_weight=1.0, kd={"weight": 0.0}, cross={"uld_weight": 0.0}),
        "uld": LossesConfig(ce_weight=0.5, kd=kd, cross={"mode": "uld", "uld_weight": 1.0}),
        "hybrid": LossesConfig(ce_weight=0.5, kd=kd, cross={"mode": "hybrid", "uld_weight": 1.0}),
    }
    students, seconds = {}, {}
    for name, losses in setups.items():
        student = cut_layers(smol.model, keep)
        cfg = DistillConfig(steps=steps, batch_size=4, lr=2e-4, warmup_steps=min(10, steps), schedule="cosine",
                            checkpoint_every=10_000, losses=losses)
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory() as out:
            train(student, signal, train_in, cfg, out_dir=Path(out), seed=args.seed, progress=True, log=print)
        seconds[name] = time.perf_counter() - t0
        students[name] = student

    scores = {dom: evaluate_models(students, blocks, teacher=smol.model, progress=True)
              for dom, blocks in (("in", held_in), ("out", held_out))}
    metrics = {"id_map_size": len(signal.bridge.id_map), "bridge_build_seconds": bridge_s}
    for dom in ("in", "out"):
        metrics[f"ppl_smollm2_{dom}"] = scores[dom]["teacher"]["perplexity"]
        for name in setups:
            metrics[f"ppl_{name}_{dom}"] = scores[dom][name]["perplexity"]
            metrics[f"kl_smollm2_{name}_{dom}"] = scores[dom][name]["kl_to_teacher"]
        for name in ("uld", "hybrid"):
            metrics[f"ppl_{name}_{dom}_over_ce"] = metrics[f"ppl_{name}_{dom}"] / metrics[f"ppl_ce_{dom}"]
    metrics["ppl_hybrid_in_over_ce"] = metrics.pop("ppl_hybrid_in_over_ce")
    metrics["ppl_hybrid_out_over_ce"] = metrics.pop("ppl_hybrid_out_over_ce")
    metrics.update({f"train_seconds_{k}": v for k, v in seconds.items()})

    rows = [(dom, *(f"{metrics[f'ppl_{n}_{dom}']:.1f}" for n in setups),
             *(f"{metrics[f'kl_smollm2_{n}_{dom}']:.3f}" for n in setups)) for dom in ("in", "out")]
    print_table(rows, ("domain", "ppl CE", "ppl ULD", "ppl hybrid", "KL(SmolLM2) CE", "KL ULD", "KL hybrid"))
    print("KL to Gemma is not defined token by token (another vocabulary); the table gives KL to SmolLM2.")
    print(f"hybrid/CE perplexity: in {metrics['ppl_hybrid_in_over_ce']:.3f} (target <= 1.05), "
          f"out {metrics['ppl_hybrid_out_over_ce']:.3f} (target <= 0.90)")
    path = write_results("cross_tokenizer" + ("_quick" if args.quick else ""), metrics,
                         {"steps": steps, "batch_size": 4, "block_size": 128, "lr": 2e-4, "seed": args.seed,
                          "kept_layers": keep, "eval_blocks": n_eval, "top_k": args.top_k,
                          "teacher": "builtin:gemma-3-270m (Q4_K_M GGUF, dequantised)",
                          "train": "austen (P&P, Persuasion, Emma)", "out_domain": "gensim enwiki excerpt",
                          "losses": {k: v.model_dump() for k, v in setups.items()}})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
