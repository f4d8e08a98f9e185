"""The distillation loop: ``train`` is the whole step on one screen, nanoGPT-style; set-up, resume,
evaluation, logging and checkpoints are the small functions below it.

Every optimiser step draws ``batch_size * grad_accum * world_size`` examples at a position that is
a pure function of the step and the seed, so a resumed run reads exactly the data the uninterrupted
one would have. Under ``torchrun`` each rank takes its share of every step's examples, the student
is replicated with DDP or sharded with FSDP2 (a live teacher too), and the loss is normalised by
the global token count.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
import warnings
from pathlib import Path

import torch
from tqdm.auto import tqdm

from distillery.data.mixture import MixtureSampler, epoch_slice
from distillery.evaluate.quality import Examples, as_examples, evaluate_models, head
from distillery.io import atomic_write_text
from distillery.recipe import DistillConfig
from distillery.signals.base import TeacherSignal
from distillery.train.checkpoint import load_latest, save_checkpoint, set_rng_state
from distillery.train.distiller import Distiller
from distillery.train.distributed import (all_ranks_sum, average_grads, full_state_dict, full_value, is_sharded,
                                          load_full_state_dict, rank0_decides, shard_live_teacher, world,
                                          wrap_student)
from distillery.train.perturb import hidden_noise, prepare_qat


def lr_lambda(cfg: DistillConfig):
    """Warm-up, then cosine/linear decay to ``min_lr_ratio``. Not transformers' cosine-with-min-lr
    schedule: its warm-up starts at lr 0 (step / warmup) and so wastes the first step, where ours starts at
    1 / (warmup + 1); switching would change every run's learning rates."""
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
    """The example indices of one optimiser step: consecutive slices of a seeded permutation per epoch."""
    return epoch_slice(step * per_step, per_step, n, seed)


def make_optimizer(params, cfg: DistillConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adafactor":
        return torch.optim.Adafactor(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def autocast(cfg: DistillConfig, device: torch.device):
    precision = cfg.precision
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def predicted_tokens(batch: dict) -> int:
    """Tokens that are predicted (position t predicts t+1 and the target is not ignored)."""
    if "labels" in batch:
        return int((batch["labels"][:, 1:] != -100).sum())
    if "attention_mask" in batch:
        return int(batch["attention_mask"][:, 1:].sum())
    return batch["input_ids"][:, 1:].numel()


def train(student: torch.nn.Module, teacher: TeacherSignal, train_data: torch.Tensor | Examples, cfg: DistillConfig, *,
          out_dir: Path, seed: int = 0, eval_blocks: torch.Tensor | Examples | None = None,
          eval_teacher: torch.nn.Module | None = None, progress: bool = True, log=print,
          distiller: Distiller | None = None, batch_transform=None, mixture: dict | None = None) -> list[dict]:
    """Distil ``student`` in place; checkpoints and ``train.jsonl`` go to ``out_dir``. Resumes from the
    newest checkpoint there. ``train_data``: ``[N, T]`` token blocks, or a dict of ``[N, T]`` tensors
    (``input_ids`` and optionally ``attention_mask``, ``labels`` with -100 for ignored targets).
    ``mixture`` (``data/mixture.json``: which rows are which component, and the weights) draws each
    step's examples from the components by weight instead of from all rows alike.
    Returns the log records (a resumed run's include the earlier ones)."""
    rank, world_size = world()
    data = as_examples(train_data)
    device = next(student.parameters()).device
    torch.manual_seed(seed)
    kd, params = _prepare(student, teacher, cfg, distiller, log)
    opt = make_optimizer(params, cfg)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
    start, records = _resume(student, opt, sched, kd, out_dir, log)
    logger, stopper = _Logger(out_dir, records, cfg.tensorboard and rank == 0), _EarlyStop(cfg, records)
    per_rank = cfg.batch_size * cfg.grad_accum
    sampler = MixtureSampler.from_info(mixture, seed) if mixture is not None else None
    student.train()
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc="distill", disable=not progress or rank)
    for step in bar:
        t0 = time.perf_counter()
        every = (sampler.indices(step, per_rank * world_size) if sampler is not None
                 else step_indices(step, per_rank * world_size, len(data["input_ids"]), seed))
        mine = every[rank * per_rank:][:per_rank]
        batch = {**{k: v[mine].to(device) for k, v in data.items()}, "example_ids": mine.to(device)}
        if batch_transform is not None:  # e.g. on-policy: the student's own completions replace the batch
            batch = batch_transform(batch, step)
        n_tokens = int(all_ranks_sum([predicted_tokens(batch)])[0])  # the global count of predicted tokens
        terms: dict[str, float] = {}
        with hidden_noise(student, cfg.noise):
            for i in range(0, len(batch["input_ids"]), cfg.batch_size):
                micro = {k: v[i:i + cfg.batch_size] for k, v in batch.items()}
                with autocast(cfg, device):
                    # DDP averages gradients over ranks: scale each rank's loss so the average is the global mean.
                    loss = kd.loss(micro, num_tokens=n_tokens / world_size, step=step)
                loss.backward()
                terms = {k: terms.get(k, 0.0) + v for k, v in kd.last_terms.items()}
        terms = dict(zip(terms, (v / world_size for v in all_ranks_sum(list(terms.values())))))
        average_grads(kd.extra_parameters())  # projection heads live outside DDP/FSDP
        gnorm = full_value(torch.nn.utils.clip_grad_norm_(params, cfg.clip_grad or float("inf")))
        update = _finite(terms, gnorm, step, cfg, log)
        if update:
            opt.step()
        _schedule_step(sched, update)
        opt.zero_grad(set_to_none=True)
        rec = {"step": step + 1, **terms, "lr": sched.get_last_lr()[0], "grad_norm": gnorm, "tokens": n_tokens,
               "tokens_per_s": n_tokens / (time.perf_counter() - t0), **_memory(device), **({} if update else {"skipped": 1})}
        if eval_blocks is not None and ((step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps):
            rec.update(_evaluate(student, eval_blocks, eval_teacher, cfg))
        stop = stopper.update(rec)
        records.append(rec)
        logger.write(rec, bar)
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps or stop:
            _checkpoint(out_dir, step + 1, student, opt, sched, kd, records, cfg.keep_checkpoints)
        if stop:
            log(f"distill: early stop at step {step + 1} (no better held-out KL in "
                f"{cfg.early_stopping_patience} evals)")
            break
    logger.close()
    return records


def _schedule_step(sched, updated: bool) -> None:
    """The schedule is a function of the step, so it advances on a skipped update too; torch warns when
    that happens before any optimizer step, which here is intended."""
    if updated:
        sched.step()
        return
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler")
        sched.step()


class NonFiniteLossError(RuntimeError):
    """A step whose loss or gradient is NaN or infinite; raised before the update, so no checkpoint or
    export ever holds the weights it would have made."""


def _finite(terms: dict[str, float], grad_norm: float, step: int, cfg: DistillConfig, log) -> bool:
    """Whether the step's loss terms and gradient are finite. If not: stop with a one-line error naming the
    step and the terms (the default), or log it and skip the update (``distill.on_nonfinite: skip``)."""
    if all(math.isfinite(v) for v in terms.values()) and math.isfinite(grad_norm):
        return True
    what = ", ".join(f"{k}={v:.4g}" for k, v in terms.items()) + f", grad_norm={grad_norm:.4g}"
    if cfg.on_nonfinite == "skip":
        log(f"distill: step {step + 1}: non-finite loss or gradient ({what}); update skipped")
        return False
    raise NonFiniteLossError(
        f"distill: step {step + 1}: the loss or its gradient is not finite ({what}); stopped before the update, "
        "nothing from this step was saved. Check the teacher's signal (a logit store: `distillery logits verify`), "
        "or lower distill.lr; `distill.on_nonfinite: skip` skips such steps instead")


def _prepare(student: torch.nn.Module, teacher: TeacherSignal, cfg: DistillConfig, distiller: Distiller | None,
             log) -> tuple[Distiller, list[torch.nn.Parameter]]:
    """Checkpointing and fake quantisation on the student, then DDP or FSDP2 under torchrun; returns
    the distiller bound to the (wrapped) student and every parameter the optimiser updates."""
    if cfg.gradient_checkpointing:
        student.gradient_checkpointing_enable()
    if cfg.qat is not None:
        prepare_qat(student, cfg.qat)
    model = wrap_student(student, fsdp=cfg.fsdp)
    if world()[1] > 1 and cfg.fsdp and cfg.shard_teacher:
        shard_live_teacher(teacher, log)
    kd = distiller or Distiller(model, teacher, cfg.losses, noise=cfg.noise)
    kd.student = model
    return kd, [*student.parameters(), *kd.extra_parameters()]


def _resume(student, opt, sched, kd: Distiller, out_dir: Path, log) -> tuple[int, list[dict]]:
    """Load the newest checkpoint under ``out_dir`` (model, optimiser, scheduler, distiller, RNG);
    returns the step to start from and the records so far."""
    ckpt_dir = out_dir / "checkpoints"
    state = load_latest(ckpt_dir, log)
    if state is None:
        return 0, []
    load_full_state_dict(student, opt, state["model"], state["optimizer"])
    kd.load_state_dict(state.get("distiller", {}))
    sched.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    log(f"distill: resuming from step {state['step']} ({ckpt_dir})")
    return state["step"], state["records"]


def _checkpoint(out_dir: Path, step: int, student, opt, sched, kd: Distiller, records: list[dict], keep: int) -> None:
    model_state, opt_state = full_state_dict(student, opt)  # a collective under FSDP: every rank calls it
    if world()[0] == 0:
        save_checkpoint(out_dir / "checkpoints", step, {"model": model_state, "optimizer": opt_state,
                                                        "scheduler": sched.state_dict(), "records": records,
                                                        "distiller": kd.state_dict()}, keep)


def _evaluate(student, eval_blocks, eval_teacher, cfg: DistillConfig) -> dict:
    """Held-out metrics as ``eval_*``. A sharded student's forward is a collective, so under FSDP
    every rank evaluates; otherwise rank 0 alone does."""
    if world()[0] != 0 and not is_sharded(student):
        return {}
    m = evaluate_models({"student": student}, head(eval_blocks, cfg.eval_blocks), teacher=eval_teacher)["student"]
    return {f"eval_{k}": v for k, v in m.items() if k != "tokens"}


class _EarlyStop:
    """Stop after ``early_stopping_patience`` evals without a lower held-out KL; rank 0 decides for all."""

    def __init__(self, cfg: DistillConfig, records: list[dict]):
        self.patience = cfg.early_stopping_patience
        self.best = min((r["eval_kl_to_teacher"] for r in records if "eval_kl_to_teacher" in r), default=math.inf)
        self.stale = 0

    def update(self, rec: dict) -> bool:
        stop = False
        if "eval_kl_to_teacher" in rec:
            kl = rec["eval_kl_to_teacher"]
            self.best, self.stale = (kl, 0) if kl < self.best else (self.best, self.stale + 1)
            stop = self.patience is not None and self.stale >= self.patience
        return rank0_decides(stop)


class _Logger:
    """``train.jsonl`` (one record per step, rank 0), optional TensorBoard, and the progress bar."""

    def __init__(self, out_dir: Path, records: list[dict], tensorboard: bool):
        self.rank = world()[0]
        self.path = out_dir / "train.jsonl"
        if self.rank == 0:  # the log holds exactly the steps the model has seen: drop lines past the checkpoint
            atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in records))
        self.board = _tensorboard(out_dir) if tensorboard else None

    def write(self, rec: dict, bar) -> None:
        bar.set_postfix(loss=f"{rec['loss']:.4f}", **({"eval_kl": f"{rec['eval_kl_to_teacher']:.3f}"}
                                                     if "eval_kl_to_teacher" in rec else {}))
        if self.rank != 0:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        for key, value in rec.items():
            if self.board is not None and key != "step" and isinstance(value, (int, float)):
                self.board.add_scalar(key, value, rec["step"])

    def close(self) -> None:
        if self.board is not None:
            self.board.close()


def _memory(device: torch.device) -> dict:
    """Peak memory so far: the process's resident set (all devices' host side), and the GPU's."""
    out = {}
    try:
        import resource

        kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
        out["peak_rss_gb"] = kib / (2**30 if sys.platform == "darwin" else 2**20)
    except ImportError:  # Windows
        pass
    if device.type == "cuda":
        out["peak_memory_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
    return out


def _tensorboard(out_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise RuntimeError("distill.tensorboard: needs the tensorboard package (pip install tensorboard)") from None
    return SummaryWriter(str(out_dir / "tensorboard"))
