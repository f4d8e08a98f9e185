"""The distillation loop: one screen, nanoGPT-style.

Every optimiser step draws ``batch_size * grad_accum * world_size`` blocks at a position that is a
pure function of the step and the seed, so a resumed run reads exactly the data the uninterrupted
one would have. Under ``torchrun`` each rank takes its share of every step's blocks, the student is
wrapped in DDP, and the loss is normalised by the global token count.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from distillery.evaluate.quality import evaluate_models
from distillery.io import atomic_write_text
from distillery.recipe import DistillConfig
from distillery.signals.base import TeacherSignal
from distillery.train.checkpoint import load_latest, save_checkpoint, set_rng_state
from distillery.train.distiller import Distiller


def lr_lambda(cfg: DistillConfig):
    def f(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / (cfg.warmup_steps + 1)
        if cfg.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
        shape = 0.5 * (1 + math.cos(math.pi * progress)) if cfg.schedule == "cosine" else 1 - progress
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * shape
    return f


def step_indices(step: int, per_step: int, n: int, seed: int) -> torch.Tensor:
    """The block indices of one optimiser step: consecutive slices of a seeded permutation per epoch."""
    start = step * per_step
    out = []
    while len(out) < per_step:
        epoch, offset = divmod(start + len(out), n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        out.extend(perm[offset: offset + per_step - len(out)].tolist())
    return torch.tensor(out)


def world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def train(student: torch.nn.Module, teacher: TeacherSignal, train_blocks: torch.Tensor, cfg: DistillConfig, *,
          out_dir: Path, seed: int = 0, eval_blocks: torch.Tensor | None = None,
          eval_teacher: torch.nn.Module | None = None, progress: bool = True, log=print) -> list[dict]:
    """Distil ``student`` in place; checkpoints and ``train.jsonl`` go to ``out_dir``. Resumes from the
    newest checkpoint there. Returns the log records (resumed runs include the earlier ones)."""
    rank, world_size = world()
    device = next(student.parameters()).device
    torch.manual_seed(seed)
    model = student
    if world_size > 1:
        model = torch.nn.parallel.DistributedDataParallel(student, device_ids=[device] if device.type == "cuda" else None)
    kd = Distiller(model, teacher, cfg.losses)
    opt = torch.optim.AdamW(student.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
    ckpt_dir, log_path = out_dir / "checkpoints", out_dir / "train.jsonl"
    start, records = 0, []
    state = load_latest(ckpt_dir)
    if state is not None:
        student.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        start, records = state["step"], state["records"]
        log(f"distill: resuming from step {start} ({ckpt_dir})")
    if rank == 0:  # the log holds exactly the steps the model has seen: drop lines past the checkpoint
        atomic_write_text(log_path, "".join(json.dumps(r) + "\n" for r in records))

    student.train()
    per_rank = cfg.batch_size * cfg.grad_accum
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc="distill", disable=not progress or rank)
    for step in bar:
        t0 = time.perf_counter()
        idx = step_indices(step, per_rank * world_size, len(train_blocks), seed)[rank * per_rank:(rank + 1) * per_rank]
        blocks = train_blocks[idx].to(device)
        # Every block predicts block_size - 1 tokens; normalise by the global count (all micro-batches, ranks).
        n_tokens = blocks[:, 1:].numel() * world_size
        terms: dict[str, float] = {}
        for micro in blocks.split(cfg.batch_size):
            loss = kd.loss({"input_ids": micro}, num_tokens=n_tokens / world_size if world_size > 1 else n_tokens)
            # DDP averages gradients over ranks; the per-rank loss is scaled so the average is the global mean.
            loss.backward()
            for k, v in kd.last_terms.items():
                terms[k] = terms.get(k, 0.0) + v
        if world_size > 1:
            packed = torch.tensor(list(terms.values()), dtype=torch.float64)
            dist.all_reduce(packed)
            terms = dict(zip(terms, (packed / world_size).tolist()))
        gnorm = torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.clip_grad or float("inf"))
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        rec = {"step": step + 1, **terms, "lr": sched.get_last_lr()[0], "grad_norm": float(gnorm),
               "tokens_per_s": n_tokens / (time.perf_counter() - t0)}
        if eval_blocks is not None and ((step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps) and rank == 0:
            m = evaluate_models({"student": student}, eval_blocks[: cfg.eval_blocks], teacher=eval_teacher)["student"]
            rec.update({f"eval_{k}": v for k, v in m.items() if k != "tokens"})
        records.append(rec)
        bar.set_postfix(loss=f"{terms['loss']:.4f}", **({"eval_kl": f"{rec['eval_kl_to_teacher']:.3f}"}
                                                       if "eval_kl_to_teacher" in rec else {}))
        if rank == 0:
            with open(log_path, "a") as f:
                f.write(json.dumps(rec) + "\n")
        if ((step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps) and rank == 0:
            save_checkpoint(ckpt_dir, step + 1, {"model": student.state_dict(), "optimizer": opt.state_dict(),
                                                 "scheduler": sched.state_dict(), "records": records},
                            cfg.keep_checkpoints)
    return records


def init_distributed() -> bool:
    """Join the process group when launched by torchrun (gloo on CPU, NCCL on GPU)."""
    if "RANK" not in os.environ or (dist.is_available() and dist.is_initialized()):
        return False
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend)
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    return True
