"""Distillery's distillation step against TRL's, the same work in the same run.

    python benchmarks/vs_trl.py [--quick] [--device cpu|cuda] [--dtype float32|bfloat16] [--rounds N]

The peer is TRL's ``GKDTrainer`` (``trl.experimental.gkd``) in its off-policy forward-KL setting,
``lmbda=0`` (never the student's own samples), ``seq_kd=False`` (never the teacher's), ``beta=0``:
token-level KD on the data, which is what the recipes' distill stage runs. What each side
computes, checked below on random float64 logits before anything is timed:

- TRL: ``generalized_jsd_loss(student, teacher, labels, beta=0)`` is
  ``F.kl_div(log q, log p, log_target=True)`` = sum_i p_i (log p_i - log q_i) = KL(p || q), the
  *forward* KL from the teacher ``p``; ``compute_loss`` never passes ``GKDConfig.temperature`` to it,
  so it runs at T = 1 with no T^2 factor; summed over the tokens whose label is not -100 and divided
  by the Trainer's ``num_items_in_batch`` (the same count of shifted labels).
- Distillery: the recipes' ``kd: {divergence: forward_kl, temperature: 1.0}`` (T^2 = 1), ``ce_weight
  0``, summed over the predicted tokens whose label is not -100, over their count.

Both get the same teacher (SmolLM2-135M-Instruct), the same student (the 15-layer
importance cut of recipes/single_corpus.yaml, chosen once here), the same examples in the same order
(Jane Austen passages wrapped as chat completions and collated by TRL's own ``DataCollatorForChatML``; the
prompt positions it sets to -100 are masked for both), the same AdamW (lr 2e-4, no weight decay, clip 1.0), the same
warm-up + cosine schedule (Distillery's ``lr_lambda``, handed to TRL's Trainer as its scheduler), the
same seed and the same number of steps, and no activation checkpointing on either side (TRL's
SFT-family configs turn it on by default, trading step time for activation memory: not the same
work). Two shapes: the recipes' (4 x 128 tokens) and a long one
(2 x 2048), where ``[tokens, vocab]`` logits dominate memory.

Every run is its own process, so peak resident memory (``ru_maxrss``, taken when the last step ends,
before the held-out evaluation) is that run's alone; runs alternate ours/TRL and which goes first,
over several rounds. Step time is the median interval between step starts (the first, warm-up, left
out, and the last step, which ends in each trainer's own end-of-training work); the ratios are medians of the per-round ratios. Held-out KL to the teacher and perplexity are
scored on held-out chat examples of the same shape, after the steps. Writes
``benchmarks/results/vs_trl.json`` (``--quick``: ``vs_trl_quick.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # the peer lives in trl.experimental; we know

from _common import RESULTS, print_table, write_results

TEACHER = "builtin:smollm2-135m-instruct"
SHAPES = {"quick": (4, 128), "long": (2, 2048)}  # (sequences, tokens) per optimiser step
PROMPT = "Continue this passage from a novel by Jane Austen."
SEED = 0


def rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


# ---------------------------------------------------------------- the shared set-up (parent)


def chat_examples(ids: list[int], tokenizer, n: int, length: int, start: int = 0) -> list[dict]:
    """``n`` chat examples whose collated length is exactly ``length``: the prompt, then a stretch of the
    text as the assistant's reply. The reply is ``length - 16`` text tokens, so the whole message is a
    little over ``length`` and TRL's collator keeps its last ``length`` tokens (it drops the oldest
    prompt tokens first); no padding, some prompt left, every reply token kept."""
    reply = length - 16
    if start + n * reply > len(ids):
        raise SystemExit(f"vs_trl: the corpus has {len(ids)} tokens, not enough for {n} examples of {length}")
    return [{"messages": [{"role": "user", "content": PROMPT},
                          {"role": "assistant", "content": tokenizer.decode(ids[start + i * reply: start + (i + 1) * reply])}]}
            for i in range(n)]


def collate(examples: list[dict], tokenizer, length: int) -> dict[str, torch.Tensor]:
    from trl.experimental.utils import DataCollatorForChatML

    out = DataCollatorForChatML(tokenizer=tokenizer, max_length=length)(examples)
    batch = {k: out[k] for k in ("input_ids", "attention_mask", "labels")}
    if batch["input_ids"].shape[1] != length or not bool(batch["attention_mask"].all()):
        raise SystemExit(f"vs_trl: collated examples are not all {length} tokens long; adjust chat_examples")
    if bool((batch["labels"][:, 0] != -100).any()):
        raise SystemExit("vs_trl: an example kept no prompt token")
    return batch


def check_same_loss() -> float:
    """TRL's GKD loss at beta=0 and the recipes' KD loss on the same float64 logits and labels:
    returns the largest relative difference of the losses and gradients (they must agree)."""
    from trl.experimental.gkd import GKDTrainer

    from distillery.losses.divergences import token_kd_loss
    from distillery.signals.base import Signal, TeacherIdentity

    g = torch.Generator().manual_seed(0)
    s = torch.randn(2, 9, 50, dtype=torch.float64, generator=g) * 3
    t = torch.randn(2, 9, 50, dtype=torch.float64, generator=g) * 3
    labels = torch.randint(0, 50, (2, 10), generator=g)
    labels[:, :4] = -100  # a prompt
    labels[1, 7] = -100
    shifted = labels[:, 1:]
    s1 = s.clone().requires_grad_()
    theirs = GKDTrainer.generalized_jsd_loss(s1, t, labels=shifted, beta=0.0, num_items_in_batch=(shifted != -100).sum())
    theirs.backward()
    s2 = s.clone().requires_grad_()
    ours = token_kd_loss(s2, Signal(TeacherIdentity(TEACHER, "-", 1.0, None), logits=t), shifted != -100,
                         divergence="forward_kl", temperature=1.0)
    ours.backward()
    diff = max(abs(float(ours.detach() - theirs.detach())) / abs(float(theirs.detach())),
               float((s1.grad - s2.grad).abs().max() / s1.grad.abs().max()))
    if diff > 1e-10:
        raise SystemExit(f"vs_trl: TRL's beta=0 loss and ours differ by {diff:.3g}: not the same KD")
    return diff


def prepare(work: Path, steps: dict[str, int], args) -> dict:
    """Choose the student's layers (single_corpus.yaml's importance cut) and write each shape's data."""
    from distillery.data.sources import read_austen, to_blocks
    from distillery.models.layers import decoder_layers
    from distillery.models.load import load_model
    from distillery.models.student import choose_layers
    from distillery.recipe import load_recipe
    from distillery.train.loop import step_indices

    recipe = load_recipe(Path(__file__).resolve().parents[1] / "recipes" / "single_corpus.yaml")
    loaded = load_model(TEACHER, device="cpu", dtype="float32")
    tok = loaded.tokenizer
    docs = read_austen(recipe.data.source.parts)
    train_blocks, _ = to_blocks(docs, tok, recipe.data.block_size, recipe.data.heldout_fraction)
    cut = recipe.student.from_teacher
    keep = choose_layers(cut, len(decoder_layers(loaded.model)), loaded.model, train_blocks[: cut.calibration_blocks])
    # The text as one stream per split: the first 95% of every book trains, the rest is held out.
    train_ids, held_ids = [], []
    for doc in docs:
        ids = tok(doc.text, add_special_tokens=False)["input_ids"]
        c = int(len(ids) * (1 - recipe.data.heldout_fraction))
        train_ids += ids[:c]
        held_ids += ids[c:]
    shapes = {}
    for name, n_steps in steps.items():
        batch, length = SHAPES[name]
        n = n_steps * batch
        train = chat_examples(train_ids, tok, n, length)
        held = chat_examples(held_ids, tok, args.eval_examples.get(name, 2), length)
        # Distillery's loop draws step s's examples at step_indices(s, ...); TRL reads its dataset in
        # order (train_sampling_strategy=sequential): give it the examples in the order ours draws them.
        order = torch.cat([step_indices(s, batch, n, SEED) for s in range(n_steps)]).tolist()
        data = {"train": collate(train, tok, length), "heldout": collate(held, tok, length),
                "trl_messages": [train[i] for i in order]}
        torch.save(data, work / f"data_{name}.pt")
        shapes[name] = {"batch": batch, "length": length, "steps": n_steps, "examples": n,
                        "masked_prompt_tokens": int((data["train"]["labels"] == -100).sum()),
                        "predicted_tokens_per_step": int((data["train"]["labels"][:, 1:] != -100).sum()) // n_steps}
    distill = recipe.distill
    return {"keep": keep, "lr": distill.lr, "shapes": shapes, "clip_grad": distill.clip_grad,
            "min_lr_ratio": distill.min_lr_ratio, "weight_decay": distill.weight_decay,
            "losses": distill.losses.model_dump(mode="json")}


# ---------------------------------------------------------------- one run (child process)


def _models(spec: dict):
    from distillery.models.load import load_model
    from distillery.models.student import cut_layers

    loaded = load_model(TEACHER, device=spec["device"], dtype=spec["dtype"])
    student = cut_layers(loaded.model, spec["keep"]).float()  # the pipeline trains an fp32 student
    return loaded, student


def _distill_config(spec: dict):
    from distillery.recipe import DistillConfig

    steps = spec["steps"]
    return DistillConfig(steps=steps, batch_size=spec["batch"], lr=spec["lr"], warmup_steps=spec["warmup"],
                         schedule="cosine", min_lr_ratio=spec["min_lr_ratio"], weight_decay=spec["weight_decay"],
                         clip_grad=spec["clip_grad"], eval_every=steps, checkpoint_every=steps,
                         precision="bf16" if spec["dtype"] == "bfloat16" else "fp32", losses=spec["losses"])


def run_ours(spec: dict, data: dict, loaded, student) -> list[float]:
    from distillery.signals.online import OnlineTeacher
    from distillery.train.loop import train

    teacher = OnlineTeacher(loaded.model, model_id=TEACHER, tokenizer_fingerprint=loaded.fingerprint)
    stamps: list[float] = []

    def stamp(batch, step):  # called once at the start of every step: the loop's own timing hook
        stamps.append(time.perf_counter())
        return batch

    with tempfile.TemporaryDirectory(prefix="vs-trl-ours-") as out:
        train(student, teacher, data["train"], _distill_config(spec), out_dir=Path(out), seed=SEED,
              progress=False, log=lambda *a: None, batch_transform=stamp)
    return stamps


def run_trl(spec: dict, data: dict, loaded, student) -> list[float]:
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    from distillery.train.loop import lr_lambda

    stamps: list[float] = []

    class Stamp(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            stamps.append(time.perf_counter())

    cfg = _distill_config(spec)
    device = torch.device(spec["device"])
    student = student.to(device)
    opt = torch.optim.AdamW(student.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)  # = make_optimizer's
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
    with tempfile.TemporaryDirectory(prefix="vs-trl-trl-") as out:
        args = GKDConfig(output_dir=out, lmbda=0.0, beta=0.0, seq_kd=False, temperature=1.0,
                         max_length=spec["length"], per_device_train_batch_size=spec["batch"],
                         gradient_accumulation_steps=1, max_steps=cfg.steps, learning_rate=cfg.lr,
                         weight_decay=cfg.weight_decay, max_grad_norm=cfg.clip_grad, seed=SEED, data_seed=SEED,
                         train_sampling_strategy="sequential", bf16=spec["dtype"] == "bfloat16", fp16=False,
                         use_cpu=device.type == "cpu", save_strategy="no", logging_steps=cfg.steps,
                         report_to="none", disable_tqdm=True, dataloader_num_workers=0,
                         # TRL's SFT-family default is True; off, it does the same work as ours (which keeps
                         # activations too), and neither side recomputes the forward in backward.
                         activation_checkpointing=False)
        trainer = GKDTrainer(model=student, teacher_model=loaded.model, args=args, processing_class=loaded.tokenizer,
                             train_dataset=Dataset.from_list(data["trl_messages"]), optimizers=(opt, sched),
                             callbacks=[Stamp()])
        trainer.train()
    return stamps


def child(spec_path: str, impl: str, out_path: str) -> None:
    from distillery.evaluate.quality import evaluate_models

    spec = json.loads(Path(spec_path).read_text())
    torch.manual_seed(SEED)
    data = torch.load(spec["data"], weights_only=False)
    loaded, student = _models(spec)
    device = torch.device(spec["device"])
    student = student.to(device)
    rss_setup = rss_gib()
    stamps = (run_ours if impl == "ours" else run_trl)(spec, data, loaded, student)
    peak = rss_gib()
    gpu_peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    intervals = [b - a for a, b in zip(stamps, stamps[1:])]
    student.eval()
    m = evaluate_models({"student": student}, data["heldout"], teacher=loaded.model, batch_size=spec["eval_batch"])
    result = {"impl": impl, "step_times_s": intervals, "step_s": statistics.median(intervals[1:] or intervals),
              "rss_setup_gib": rss_setup, "peak_rss_gib": peak, "peak_gpu_gib": gpu_peak,
              "heldout_kl": m["student"]["kl_to_teacher"], "heldout_ppl": m["student"]["perplexity"],
              "teacher_ppl": m["teacher"]["perplexity"]}
    Path(out_path).write_text(json.dumps(result))


# ---------------------------------------------------------------- the comparison (parent)


def run_child(work: Path, shape: str, impl: str, tag: str) -> dict:
    out = work / f"{shape}_{impl}_{tag}.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1] / "src"),
                                                        os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, __file__, "--child", impl, "--spec", str(work / f"spec_{shape}.json"), "--out", str(out)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"vs_trl: the {impl} run at the {shape} shape failed:\n{proc.stderr[-4000:]}")
    res = json.loads(out.read_text())
    print(f"  {shape:5s} {impl:4s} step {res['step_s']:7.3f} s  peak RSS {res['peak_rss_gib']:5.2f} GiB  "
          f"held-out KL {res['heldout_kl']:.4f}  ({time.perf_counter() - t0:.0f} s)", flush=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="a few steps, one round (make bench)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                    help="the teacher's weights and the student's autocast (the student's weights stay fp32)")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--child", choices=["ours", "trl"], help=argparse.SUPPRESS)
    ap.add_argument("--spec", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.spec, args.child, args.out)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("vs_trl: --device cuda but no CUDA device here")
    steps = {"quick": 4, "long": 3} if args.quick else {"quick": 8, "long": 4}
    rounds = args.rounds or (1 if args.quick else 2)
    args.eval_examples = {"quick": 16, "long": 2}
    diff = check_same_loss()
    print(f"TRL's GKD loss (beta=0) = Distillery's forward KL at T=1: max relative difference {diff:.1e} (float64)")
    with tempfile.TemporaryDirectory(prefix="vs-trl-") as tmp:
        work = Path(tmp)
        t0 = time.perf_counter()
        setup = prepare(work, steps, args)
        print(f"student: teacher layers {setup['keep']} (importance cut, {time.perf_counter() - t0:.0f} s set-up)")
        for name, s in setup["shapes"].items():
            spec = {"data": str(work / f"data_{name}.pt"), "device": args.device, "dtype": args.dtype,
                    "keep": setup["keep"], "lr": setup["lr"], "warmup": max(1, s["steps"] // 4),
                    "min_lr_ratio": setup["min_lr_ratio"], "weight_decay": setup["weight_decay"],
                    "clip_grad": setup["clip_grad"], "losses": setup["losses"], "eval_batch": 4 if name == "quick" else 1,
                    **s}
            (work / f"spec_{name}.json").write_text(json.dumps(spec))
        runs = {name: {"ours": [], "trl": []} for name in SHAPES}
        for r in range(rounds):
            for name in SHAPES:
                for impl in (("ours", "trl") if r % 2 == 0 else ("trl", "ours")):
                    runs[name][impl].append(run_child(work, name, impl, str(r)))

    metrics, rows = {}, []
    for name, by in runs.items():
        suffix = "" if name == "long" else f"_{name}"
        pairs = list(zip(by["ours"], by["trl"]))
        ratio = {key: statistics.median(o[key] / t[key] for o, t in pairs)
                 for key in ("step_s", "peak_rss_gib", "heldout_kl", "heldout_ppl")}
        metrics |= {f"step_time_ratio{suffix}": ratio["step_s"], f"peak_rss_ratio{suffix}": ratio["peak_rss_gib"],
                    f"kl_ratio{suffix}": ratio["heldout_kl"], f"ppl_ratio{suffix}": ratio["heldout_ppl"]}
        if args.device.startswith("cuda"):
            metrics[f"peak_gpu_ratio{suffix}"] = statistics.median(o["peak_gpu_gib"] / t["peak_gpu_gib"] for o, t in pairs)
        for impl, res in by.items():
            med = {key: statistics.median(x[key] for x in res) for key in
                   ("step_s", "rss_setup_gib", "peak_rss_gib", "heldout_kl", "heldout_ppl")}
            metrics |= {f"{impl}_{key}{suffix}": v for key, v in med.items()}
            metrics[f"{impl}_step_s_all{suffix}"] = [x["step_s"] for x in res]
            if args.device.startswith("cuda"):
                metrics[f"{impl}_peak_gpu_gib{suffix}"] = statistics.median(x["peak_gpu_gib"] for x in res)
            b, t = SHAPES[name]
            rows.append((f"{b} x {t}", "Distillery" if impl == "ours" else "TRL GKD", f"{med['step_s']:.3f}",
                         f"{med['rss_setup_gib']:.2f}", f"{med['peak_rss_gib']:.2f}", f"{med['heldout_kl']:.4f}",
                         f"{med['heldout_ppl']:.2f}"))
        rows.append(("", "ours / TRL", f"{ratio['step_s']:.3f}", "", f"{ratio['peak_rss_gib']:.3f}",
                     f"{ratio['heldout_kl']:.4f}", f"{ratio['heldout_ppl']:.4f}"))
        metrics[f"teacher_ppl{suffix}"] = by["ours"][0]["teacher_ppl"]
    print_table(rows, ("shape", "trainer", "step s (median)", "RSS after set-up GiB", "peak RSS GiB",
                       "held-out KL", "perplexity"))
    targets = [("peak_rss_ratio", 0.7), ("step_time_ratio", 1.0), ("kl_ratio", 1.05), ("kl_ratio_quick", 1.05)]
    for key, limit in targets:
        print(f"target: {key} <= {limit} ({'ok' if metrics[key] <= limit else 'MISSED'}: {metrics[key]:.3f})")
    import trl
    import transformers

    write_results("vs_trl_quick" if args.quick else "vs_trl", metrics, {
        "teacher": TEACHER,
        "student": f"teacher layers {setup['keep']} (single_corpus.yaml's importance cut, 15 of 30)",
        "peer": f"trl {trl.__version__} experimental.gkd.GKDTrainer (lmbda=0, beta=0, seq_kd=False)",
        "transformers": transformers.__version__, "loss": "forward KL(teacher || student), T=1, prompt masked",
        "loss_check_max_rel_diff": diff, "shapes": setup["shapes"], "rounds": rounds, "lr": setup["lr"],
        "schedule": "warm-up (steps // 4) then cosine to 0.1 x lr (distillery lr_lambda, both)",
        "optimizer": "torch AdamW, weight_decay 0, clip 1.0 (both)", "device": args.device, "dtype": args.dtype,
        "fused_lm_head": setup["losses"]["kd"]["fused_lm_head"], "chunk_size": setup["losses"]["kd"]["chunk_size"],
        "threads": torch.get_num_threads()})
    print(f"wrote {RESULTS / ('vs_trl_quick.json' if args.quick else 'vs_trl.json')}")


if __name__ == "__main__":
    main()
