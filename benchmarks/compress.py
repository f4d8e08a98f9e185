"""Compression with the teacher in the loop (issue 12), on the real SmolLM2-135M-Instruct teacher, CPU.

One process, one distilled student, every comparison side by side:

1. The student: the teacher's 15 most influential layers (block influence), distilled for a few steps
   (forward KL + 0.5 CE on Austen). Pruned to half the *teacher's* parameters (82.6% of its own) by
   width (MLP channels + hidden size) and by depth (whole layers: 15 -> 11, layers ranked by block
   influence and, separately, by the calibration loss rise when skipped), and by width to half of its
   own; each saved and reloaded with plain ``AutoModelForCausalLM.from_pretrained``:
   ``width_param_error``, ``depth_param_error`` = |params - target| / target. (Depth alone cannot reach
   half the *student* within 2%: one layer is 4.3% of it.)
2. Iterative vs one-shot, same final size (depth, 15 -> 11 layers, ranked by skip loss) and the same
   re-distillation examples: one-shot ranks the layers once, prunes to the target and re-distils N
   steps; iterative removes one layer per round (k = 4 rounds), each round ranked on the model the
   previous round left, re-distilling ``--heal-steps`` between rounds and the rest of the N steps after
   the last (``iterative_over_oneshot_ppl``). Schedules measured with these settings and functions
   (same student, calibration, examples and seed): no healing between rounds 0.999x one-shot (82.81 vs
   82.90, results/compress.json); 2 steps between rounds 1.020x; two rounds of N/2 steps each 1.062x:
   each round's short re-distillation restarts its warm-up and decays to zero, and spends steps on
   layers the next round removes.
3. int4 weight-only: QAT re-distillation (``DistillConfig.qat`` -> ``prepare_qat``) then ``convert_qat``,
   vs the same re-distillation steps without QAT then post-training ``quantize(.., "int4_weight_only")``
   (``qat_over_ptq_ppl``), and vs PTQ of the distilled student as it is (``qat_over_ptq_direct_ppl``).
4. Low-rank MLP linears at ``param_ratio=0.5``: activation-aware (SVD-LLM whitening) vs plain SVD, no
   re-distillation (``asvd_over_svd_ppl``); then the ASVD model re-distilled vs not
   (``lowrank_redistill_over_plain_ppl``).
5. Speed and memory: the final student (the better of the two, half the teacher's parameters, int8
   dynamic with ``backend="auto"``) against the fp32 teacher in this process, batch 1, greedy, 128 new
   tokens (EOS suppressed), interleaved repeats, ``--speed-threads`` torch threads (1 by default: on a
   loaded 2-core machine two threads make every small matmul wait on a neighbour):
   ``tokens_per_s_ratio`` (median of per-round ratios) and ``memory_ratio`` (``weight_bytes``); each
   model's peak RSS from a fresh process that loads its folder and makes one token, beside it. torchao
   int8 weight-only is measured beside it (``auto`` picks torch's ``quantize_dynamic``, whose per-tensor
   activation scale SmolLM's MLP outliers hurt).

Perplexity and KL to the teacher are on held-out Austen (the tail of every novel).

    python benchmarks/compress.py [--quick]
"""

from __future__ import annotations

import argparse
import copy
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from _common import print_table, spread, write_results

from distillery.compress.lowrank import factorize
from distillery.compress.prune import count_params, prune_to_target
from distillery.compress.quantize import choose_backend, convert_qat, quantize, weight_bytes
from distillery.compress.variants import save_variant
from distillery.data.sources import read_austen, to_blocks
from distillery.evaluate.quality import evaluate_models
from distillery.evaluate.speed import default_prompts, measure_setting
from distillery.io import save_model_folder
from distillery.models.load import load_model
from distillery.models.student import choose_layers, cut_layers
from distillery.recipe import CutConfig, DistillConfig, LossesConfig, QATConfig
from distillery.signals.online import OnlineTeacher
from distillery.train.loop import step_indices, train

BATCH = 4

# A fresh process loads a folder and makes one token; its peak RSS is read from /proc/self/status (VmHWM).
# Not getrusage's ru_maxrss: on Linux a child keeps its parent's high-water mark across fork + exec.
RSS_CHILD = """
import sys, torch
torch.set_num_threads(int(sys.argv[3]))
from transformers import AutoModelForCausalLM, AutoTokenizer
from distillery.compress.variants import load_variant
folder = sys.argv[1]
model = (load_variant(folder) if sys.argv[2] == "variant" else AutoModelForCausalLM.from_pretrained(folder)).eval()
tok = AutoTokenizer.from_pretrained(folder)
with torch.no_grad():
    model.generate(**tok(sys.argv[4], return_tensors="pt"), max_new_tokens=1, do_sample=False)
print([int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM")][0])
"""


def peak_rss_loading(folder: Path, prompt: str, threads: int) -> int:
    loader = "plain" if folder.name == "teacher" else "variant"
    out = subprocess.run([sys.executable, "-c", RSS_CHILD, str(folder), loader, str(threads), prompt],
                         capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="a few steps and blocks: checks the script, not the claims")
    ap.add_argument("--distill-steps", type=int, default=None)
    ap.add_argument("--redistill-steps", type=int, default=None, help="N: one-shot and iterative budget")
    ap.add_argument("--stages", type=int, default=4, help="k: iterative prune rounds")
    ap.add_argument("--heal-steps", type=int, default=0, help="re-distillation steps after each round but the last")
    ap.add_argument("--qat-steps", type=int, default=None)
    ap.add_argument("--lowrank-steps", type=int, default=None)
    ap.add_argument("--eval-blocks", type=int, default=None)
    ap.add_argument("--calibration-blocks", type=int, default=None)
    ap.add_argument("--new-tokens", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--speed-threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    # training checkpoints (written at every run's last step, ~1 GB with the optimizer) and folders go to
    # memory where there is a tmpfs: fsyncing them to a shared disk cost 20-40 s per run here
    shm = Path("/dev/shm")
    work = Path(tempfile.mkdtemp(prefix="compress-bench-", dir=shm if shm.is_dir() else None))
    try:
        run(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run(args, work: Path) -> None:
    q = args.quick
    distill_steps = args.distill_steps or (2 if q else 40)
    n_redistill = args.redistill_steps or (2 if q else 32)
    qat_steps = args.qat_steps or (1 if q else 20)
    lowrank_steps = args.lowrank_steps or (1 if q else 20)
    n_eval = args.eval_blocks or (4 if q else 24)
    n_calib = args.calibration_blocks or (4 if q else 16)
    new_tokens = args.new_tokens or (32 if q else 128)
    repeats = args.repeats or (2 if q else 5)
    if args.heal_steps * (args.stages - 1) > n_redistill:
        raise SystemExit(f"--heal-steps {args.heal_steps} x {args.stages - 1} rounds exceeds the {n_redistill} steps")
    t_start = time.perf_counter()
    seconds: dict[str, float] = {}

    teacher = load_model("builtin:smollm2-135m-instruct")
    T, tok = teacher.model, teacher.tokenizer
    train_blocks, held = to_blocks(read_austen(["prideprejudice", "persuasion", "emma"]), tok, 128, 0.05)
    held = held[:n_eval]
    calib = train_blocks[:n_calib]
    signal = OnlineTeacher(T, model_id="smollm2-135m-instruct", tokenizer_fingerprint=teacher.fingerprint)
    losses = LossesConfig(ce_weight=0.5, kd={"divergence": "forward_kl", "weight": 1.0, "temperature": 1.0})
    runs = iter(range(1000))

    def cfg(steps: int, qat: QATConfig | None = None) -> DistillConfig:
        return DistillConfig(steps=steps, batch_size=BATCH, lr=2e-4, warmup_steps=min(5, steps // 4), schedule="cosine",
                             checkpoint_every=10_000, losses=losses, qat=qat)

    def distil(model, steps: int, data=None, qat=None, name="") -> torch.nn.Module:
        t0 = time.perf_counter()
        out = work / f"run{next(runs)}"
        train(model, signal, train_blocks if data is None else data, cfg(steps, qat), out_dir=out, seed=args.seed,
              progress=True, log=print)
        shutil.rmtree(out)  # its checkpoint (model + optimizer) is not needed again
        seconds[f"train_{name}"] = time.perf_counter() - t0
        return model.eval()

    def ppl(models: dict) -> dict:
        scores = evaluate_models(models, held, teacher=T)
        for name, s in scores.items():
            print(f"  {name}: perplexity {s['perplexity']:.2f}, KL to teacher {s.get('kl_to_teacher', 0):.4f}")
        return scores

    metrics: dict[str, float] = {}
    teacher_params = count_params(T)
    half_teacher = teacher_params // 2

    models: dict[str, torch.nn.Module] = {}  # every variant, scored together at the end (one teacher pass)

    # ---- the distilled student
    keep = choose_layers(CutConfig(num_layers=15, select="importance"), 30, T, train_blocks[:8])
    models["cut"] = cut_layers(T, keep)
    student = models["student"] = distil(copy.deepcopy(models["cut"]), distill_steps, name="distill")
    metrics.update(params_teacher=teacher_params, params_student=count_params(student))

    # ---- 1. pruning to a size, reloaded with plain transformers
    from transformers import AutoModelForCausalLM

    t0 = time.perf_counter()
    sizes = {}
    for name, target, axes, method in (("width", half_teacher, ("mlp_channels", "hidden"), "influence"),
                                       ("depth", half_teacher, ("layers",), "influence"),
                                       ("depth_skip_loss", half_teacher, ("layers",), "skip_loss"),
                                       ("width_half_student", 0.5, ("mlp_channels", "hidden"), "influence")):
        result = prune_to_target(student, calib, target, axes=axes, depth_method=method)
        folder = work / f"pruned-{name}"
        save_model_folder(result.model, folder, tok)
        reloaded = AutoModelForCausalLM.from_pretrained(folder)
        n = count_params(reloaded)
        goal = result.report["target_params"]
        with torch.no_grad():
            diff = (reloaded(input_ids=held[:1]).logits - result.model.eval()(input_ids=held[:1]).logits).abs().max()
        sizes[name] = {"params": n, "target": goal, "config": result.report["config"],
                       "kept_layers": result.report["kept_layers"], "reload_max_logit_diff": float(diff)}
        metrics[f"{name}_param_error"] = abs(n - goal) / goal
        metrics[f"{name}_params"] = n
        if name != "width_half_student":
            models[f"{name}_pruned"] = reloaded
        print(f"{name}: {n:,} parameters (target {goal:,}), error {metrics[f'{name}_param_error']:.5f}, "
              f"config {result.report['config']}, reloaded logits differ by {float(diff):.2g}")
    seconds["prune_to_size"] = time.perf_counter() - t0

    # ---- 2. iterative vs one-shot, same final size and the same re-distillation examples
    # One-shot's N steps see these examples; iterative stage j trains on exactly the j-th N/k steps' share
    # of them (each once, in another order), so both spend the same tokens on the same text.
    order = torch.cat([step_indices(i, BATCH, len(train_blocks), args.seed) for i in range(n_redistill)])
    print(f"one-shot: the depth-pruned model (skip-loss ranking, {half_teacher:,} parameters), re-distilled "
          f"{n_redistill} steps")
    models["oneshot"] = distil(copy.deepcopy(models["depth_skip_loss_pruned"]), n_redistill,
                               data=train_blocks[order], name="oneshot")
    k = args.stages
    budgets = [args.heal_steps] * (k - 1) + [n_redistill - args.heal_steps * (k - 1)]
    iterative, start, used = student, count_params(student), 0
    for j, per in enumerate(budgets, 1):
        goal = half_teacher if j == k else round(start * (half_teacher / start) ** (j / k))
        pruned = prune_to_target(iterative, calib, goal, axes=("layers",), depth_method="skip_loss",
                                 tolerance=0.02 if j == k else 0.1)
        iterative = pruned.model
        print(f"iterative {j}/{k}: {count_params(iterative):,} parameters (kept layers "
              f"{pruned.report['kept_layers']}), re-distil {per} steps")
        if per:
            share = order[used * BATCH:(used + per) * BATCH]
            iterative = distil(iterative, per, data=train_blocks[share], name=f"iterative_{j}")
            used += per
    models["iterative"] = iterative
    metrics.update(params_oneshot=count_params(models["oneshot"]), params_iterative=count_params(iterative))

    # ---- 3. int4 weight-only: QAT re-distillation + convert vs the same steps without QAT + PTQ
    qat = QATConfig(scheme="int4_weight_only", group_size=32)
    models["ptq_direct_int4"] = quantize(copy.deepcopy(student), "int4_weight_only", group_size=32)
    models["redistilled"] = distil(copy.deepcopy(student), qat_steps, name="redistill_for_ptq")
    models["ptq_int4"] = quantize(copy.deepcopy(models["redistilled"]), "int4_weight_only", group_size=32)
    models["qat_int4"] = convert_qat(distil(copy.deepcopy(student), qat_steps, qat=qat, name="qat"),
                                     "int4_weight_only")

    # ---- 4. low-rank MLP linears at half their parameters: ASVD vs SVD, then re-distilled vs not
    for method in ("svd", "asvd"):
        model = copy.deepcopy(student)
        report = factorize(model, "model.layers.*.mlp.*", param_ratio=0.5, method=method,
                           blocks=calib if method == "asvd" else None)
        models[f"lowrank_{method}"] = model
        metrics[f"lowrank_{method}_params"] = report.params_after
    metrics["lowrank_params_fraction"] = metrics["lowrank_asvd_params"] / count_params(student)
    models["lowrank_asvd_redistilled"] = distil(copy.deepcopy(models["lowrank_asvd"]), lowrank_steps, name="lowrank")

    t0 = time.perf_counter()
    s = ppl(models)
    for name, score in s.items():
        metrics[f"ppl_{name}"] = score["perplexity"]
        metrics[f"kl_{name}"] = score.get("kl_to_teacher", 0.0)
    ratio = {m: metrics[f"ppl_{a}"] / metrics[f"ppl_{b}"] for m, a, b in (
        ("iterative_over_oneshot_ppl", "iterative", "oneshot"), ("qat_over_ptq_ppl", "qat_int4", "ptq_int4"),
        ("qat_over_ptq_direct_ppl", "qat_int4", "ptq_direct_int4"),
        ("asvd_over_svd_ppl", "lowrank_asvd", "lowrank_svd"),
        ("lowrank_redistill_over_plain_ppl", "lowrank_asvd_redistilled", "lowrank_asvd"),
        ("depth_skip_loss_over_influence_ppl", "depth_skip_loss_pruned", "depth_pruned"))}
    metrics.update(ratio, iterative_over_oneshot_kl=metrics["kl_iterative"] / metrics["kl_oneshot"])

    # ---- 5. the final student (the better of one-shot and iterative: half the teacher's parameters) in int8,
    # against the fp32 teacher
    final_name = min(("oneshot", "iterative"), key=lambda n: metrics[f"ppl_{n}"])
    final_float = models[final_name]
    threads = torch.get_num_threads()
    torch.set_num_threads(args.speed_threads)
    # every linear in int8 (keep_float=[]), as in the recorded results: the smallest model; the recipes'
    # default keeps down_proj float for perplexity (docs/compression.md)
    choice = choose_backend(final_float, "int8_dynamic", train_blocks[:1, :32], keep_float=[])
    final = quantize(copy.deepcopy(final_float), "int8_dynamic", backend=choice.backend, keep_float=[])
    print(f"final student: {final_name}; int8 backend: {choice.backend} (median forward seconds {choice.seconds}, "
          f"float {choice.float_seconds})")
    # torchao int8 weight-only beside it: no activation quantization (SmolLM's MLP inputs have outliers
    # thousands of times their mean, which a per-tensor activation scale cannot hold)
    final_wo = quantize(copy.deepcopy(final_float), "int8_weight_only", backend="torchao")
    torch.set_num_threads(threads)
    s = ppl({"final_int8": final, "final_int8_weight_only": final_wo})
    for name, score in s.items():
        metrics[f"ppl_{name}"] = score["perplexity"]
        metrics[f"kl_{name}"] = score.get("kl_to_teacher", 0.0)
    seconds["evaluate"] = time.perf_counter() - t0
    torch.set_num_threads(args.speed_threads)
    prompts = default_prompts(tok, max(repeats, 4))
    speed_models = {"teacher": T, "final_int8": final, "final_int8_weight_only": final_wo, "final_fp32": final_float}
    tps = {name: [] for name in speed_models}
    for name, m in speed_models.items():  # warm-up: first calls pick kernels and pack weights
        measure_setting(m.eval(), tok, prompts[:1], concurrency=1, requests=1, warmup=0, max_new_tokens=8)
    for i in range(repeats):  # interleaved, so a noisy neighbour slows every model alike
        for name, m in speed_models.items():
            res = measure_setting(m, tok, [prompts[i % len(prompts)]], concurrency=1, requests=1, warmup=0,
                                  max_new_tokens=new_tokens)
            tps[name].append(res["tokens_per_s"])
        print(f"  round {i + 1}: " + ", ".join(f"{n} {v[-1]:.2f} tok/s" for n, v in tps.items()))
    rounds = {n: [a / b for a, b in zip(tps[n], tps["teacher"])] for n in speed_models if n != "teacher"}
    torch.set_num_threads(threads)
    folders = {"teacher": work / "teacher", "final_int8": work / "final-int8"}
    save_model_folder(T, folders["teacher"], tok)
    save_variant(final, folders["final_int8"], tok)
    rss = {n: peak_rss_loading(f, prompts[0], args.speed_threads) for n, f in folders.items()}
    metrics.update(
        tokens_per_s_ratio=statistics.median(rounds["final_int8"]),
        tokens_per_s_ratio_min=min(rounds["final_int8"]), tokens_per_s_ratio_max=max(rounds["final_int8"]),
        tokens_per_s_ratio_int8_weight_only=statistics.median(rounds["final_int8_weight_only"]),
        tokens_per_s_ratio_fp32=statistics.median(rounds["final_fp32"]),
        **{f"tokens_per_s_{n}": statistics.median(v) for n, v in tps.items()},
        weight_bytes_teacher=weight_bytes(T), weight_bytes_final_int8=weight_bytes(final),
        weight_bytes_final_int8_weight_only=weight_bytes(final_wo), weight_bytes_final_fp32=weight_bytes(final_float),
        peak_rss_teacher=rss["teacher"], peak_rss_final_int8=rss["final_int8"],
        params_final=count_params(final_float), params_final_over_teacher=count_params(final_float) / teacher_params,
        ppl_final_fp32=metrics[f"ppl_{final_name}"], kl_final_fp32=metrics[f"kl_{final_name}"])
    metrics["memory_ratio_int8_weight_only"] = metrics["weight_bytes_final_int8_weight_only"] / metrics[
        "weight_bytes_teacher"]
    metrics["memory_ratio"] = metrics["weight_bytes_final_int8"] / metrics["weight_bytes_teacher"]
    metrics["peak_rss_ratio"] = metrics["peak_rss_final_int8"] / metrics["peak_rss_teacher"]
    metrics.update({f"seconds_{k}": v for k, v in seconds.items()})
    metrics["seconds_total"] = time.perf_counter() - t_start

    print_table([("teacher (fp32)", f"{metrics['ppl_teacher']:.2f}", "0")] + [
        (n, f"{metrics[p]:.2f}", f"{metrics[k]:.4f}") for n, p, k in (
        ("cut (15 layers)", "ppl_cut", "kl_cut"),
        ("distilled student", "ppl_student", "kl_student"),
        ("width-pruned to half the teacher", "ppl_width_pruned", "kl_width_pruned"),
        ("depth-pruned to half (influence)", "ppl_depth_pruned", "kl_depth_pruned"),
        ("depth-pruned to half (skip loss)", "ppl_depth_skip_loss_pruned", "kl_depth_skip_loss_pruned"),
        ("one-shot depth -> 11 layers", "ppl_oneshot", "kl_oneshot"),
        ("iterative depth -> 11 layers", "ppl_iterative", "kl_iterative"),
        ("int4 PTQ (distilled)", "ppl_ptq_direct_int4", "kl_ptq_direct_int4"),
        ("int4 PTQ (re-distilled)", "ppl_ptq_int4", "kl_ptq_int4"),
        ("int4 QAT + convert", "ppl_qat_int4", "kl_qat_int4"),
        ("low-rank MLP SVD", "ppl_lowrank_svd", "kl_lowrank_svd"),
        ("low-rank MLP ASVD", "ppl_lowrank_asvd", "kl_lowrank_asvd"),
        ("low-rank ASVD re-distilled", "ppl_lowrank_asvd_redistilled", "kl_lowrank_asvd_redistilled"),
        (f"final ({final_name}, int8, {choice.backend})", "ppl_final_int8", "kl_final_int8"),
        (f"final ({final_name}, int8 weight-only)", "ppl_final_int8_weight_only", "kl_final_int8_weight_only"))],
        ("model", "held-out ppl", "KL to teacher"))
    checks = [("width_param_error", "<=", 0.02), ("depth_param_error", "<=", 0.02),
              ("iterative_over_oneshot_ppl", "<=", 1.0), ("qat_over_ptq_ppl", "<", 1.0),
              ("asvd_over_svd_ppl", "<", 1.0), ("lowrank_redistill_over_plain_ppl", "<", 1.0),
              ("tokens_per_s_ratio", ">=", 2.5), ("memory_ratio", "<=", 0.35)]
    ok = {"<=": float.__le__, "<": float.__lt__, ">=": float.__ge__}
    print_table([(m, f"{metrics[m]:.4f}", f"{op} {t}", "met" if ok[op](float(metrics[m]), t) else "MISSED")
                 for m, op, t in checks], ("metric", "value", "target", ""))
    print_table([(n, f"{metrics[f'tokens_per_s_{n}']:.2f}", "1" if n == "teacher" else
                  f"{statistics.median(rounds[n]):.3f} ({min(rounds[n]):.2f}-{max(rounds[n]):.2f})",
                  f"{weight_bytes(m) / 2**20:.1f}", f"{rss[n] / 2**20:.0f}" if n in rss else "")
                 for n, m in speed_models.items()],
                ("model", "tokens/s (median)", "x teacher (rounds)", "weight MiB", "peak RSS MiB"))
    path = write_results("compress" + ("_quick" if q else ""), metrics, {
        "distill_steps": distill_steps, "redistill_steps": n_redistill, "stages": k, "iterative_budgets": budgets,
        "qat_steps": qat_steps,
        "lowrank_steps": lowrank_steps, "batch_size": BATCH, "block_size": 128, "lr": 2e-4, "seed": args.seed,
        "eval_blocks": n_eval, "calibration_blocks": n_calib, "kept_layers": keep,
        "train": "austen (P&P, Persuasion, Emma)", "losses": "forward KL (T=1) + 0.5 x CE",
        "prune_targets": sizes, "iterative": "depth (layers), one per round, ranked by skip loss on the current model", "final_student": final_name,
        "int4": "int4_weight_only, group 32 (torchao Intx)",
        "lowrank": "model.layers.*.mlp.*, param_ratio 0.5", "int8_backend": choice.to_dict(),
        "speed": {"new_tokens": new_tokens, "repeats": repeats, "batch": 1, "decoding": "greedy, EOS suppressed",
                  "threads": args.speed_threads, "tokens_per_s": tps, "ratio_per_round": rounds,
                  "int8_weight_only": "torchao Int8WeightOnlyConfig, head and embeddings float",
                  "spread": {n: spread(v) for n, v in tps.items()}},
        "memory": "weight_bytes (quantized tensors as held); peak RSS: VmHWM of a fresh process that loads the "
                  "folder and makes one token (includes the interpreter, torch and transformers)"})
    print(f"wrote {path} in {metrics['seconds_total']:.0f} s")


if __name__ == "__main__":
    main()
