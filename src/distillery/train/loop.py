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
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from distillery.evaluate.quality import evaluate_models, head
from distillery.io import atomic_write_text
from distillery.recipe import DistillConfig
from distillery.signals.base import TeacherSignal
from distillery.train.checkpoint import load_latest, save_checkpoint, set_rng_state
from distillery.train.distiller import Distiller
from distillery.train.perturb import hidden_noise, prepare_qat


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
    """The example indices of one optimiser step: consecutive slices of a seeded permutation per epoch."""
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


def train(student: torch.nn.Module, teacher: TeacherSignal, train_data: torch.Tensor | dict, cfg: DistillConfig, *,
          out_dir: Path, seed: int = 0, eval_blocks: torch.Tensor | dict | None = None,
          eval_teacher: torch.nn.Module | None = None, progress: bool = True, log=print,
          distiller: Distiller | None = None, batch_transform=None) -> list[dict]:
    """Distil ``student`` in place; checkpoints and ``train.jsonl`` go to ``out_dir``. Resumes from the
    newest checkpoint there. ``train_data``: ``[N, T]`` token blocks, or a dict of ``[N, T]`` tensors
    (``input_ids`` and optionally ``attention_mask``, ``labels`` with -100 for ignored targets).
    Returns the log records (a resumed run's include the earlier ones)."""
    rank, world_size = world()
    data = train_data if isinstance(train_data, dict) else {"input_ids": train_data}
    device = next(student.parameters()).device
    torch.manual_seed(seed)
    kd, params = _prepare(student, teacher, cfg, distiller, log)
    opt = make_optimizer(params, cfg)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
    start, records = _resume(student, opt, sched, kd, out_dir, log)
    logger, stopper = _Logger(out_dir, records, cfg.tensorboard and rank == 0), _EarlyStop(cfg, records)
    per_rank = cfg.batch_size * cfg.grad_accum
    student.train()
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc="distill", disable=not progress or rank)
    for step in bar:
        t0 = time.perf_counter()
        mine = step_indices(step, per_rank * world_size, len(data["input_ids"]), seed)[rank * per_rank:][:per_rank]
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
        _average_extra_grads(kd, world_size)
        gnorm = torch.nn.utils.clip_grad_norm_(params, cfg.clip_grad or float("inf"))
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        rec = {"step": step + 1, **terms, "lr": sched.get_last_lr()[0], "grad_norm": _item(gnorm),
               "tokens": n_tokens, "tokens_per_s": n_tokens / (time.perf_counter() - t0), **_memory(device)}
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


def _prepare(student: torch.nn.Module, teacher: TeacherSignal, cfg: DistillConfig, distiller: Distiller | None,
             log) -> tuple[Distiller, list[torch.nn.Parameter]]:
    """Checkpointing and fake quantisation on the student, then DDP or FSDP2 under torchrun; returns
    the distiller bound to the (wrapped) student and every parameter the optimiser updates."""
    _, world_size = world()
    if cfg.gradient_checkpointing:
        student.gradient_checkpointing_enable()
    if cfg.qat is not None:
        prepare_qat(student, cfg.qat)
    model = student
    if world_size > 1 and cfg.fsdp:
        shard(student)
        if cfg.shard_teacher:
            shard_live_teacher(teacher, log)
    elif world_size > 1:
        dev = next(student.parameters()).device
        model = torch.nn.parallel.DistributedDataParallel(student, device_ids=[dev] if dev.type == "cuda" else None)
    kd = distiller or Distiller(model, teacher, cfg.losses, noise=cfg.noise)
    kd.student = model
    return kd, [*student.parameters(), *kd.extra_parameters()]


def _resume(student, opt, sched, kd: Distiller, out_dir: Path, log) -> tuple[int, list[dict]]:
    """Load the newest checkpoint under ``out_dir`` (model, optimiser, scheduler, distiller, RNG);
    returns the step to start from and the records so far."""
    ckpt_dir = out_dir / "checkpoints"
    state = load_latest(ckpt_dir)
    if state is None:
        return 0, []
    if is_sharded(student):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        set_state_dict(student, opt, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                       options=StateDictOptions(full_state_dict=True))
    else:
        student.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
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
        if world()[1] > 1:
            flag = torch.tensor([int(stop)])
            dist.broadcast(flag, 0)
            stop = bool(flag.item())
        return stop


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


def all_ranks_sum(values: list[float]) -> list[float]:
    """Elementwise sum over every rank (float64); the values themselves in one process."""
    if world()[1] == 1:
        return [float(v) for v in values]
    packed = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(packed)
    return packed.tolist()


def _average_extra_grads(kd: Distiller, world_size: int) -> None:
    """Projection heads live outside DDP/FSDP: average their gradients by hand."""
    if world_size == 1:
        return
    for p in kd.extra_parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad /= world_size


def _item(x: torch.Tensor) -> float:
    return float(x.full_tensor() if hasattr(x, "full_tensor") else x)


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


def shard(model: torch.nn.Module, *, forward_only: bool = False) -> None:
    """FSDP2: every decoder layer its own shard group, then the root (embeddings, head). Each rank
    keeps 1/world of the weights and gathers one layer at a time for its forward (and backward).
    FSDP2 keeps the root gathered after forward, for the backward; a forward-only model (the
    teacher) has no backward, so its root is resharded too."""
    from torch.distributed.fsdp import fully_shard

    from distillery.models.student import decoder_layers

    for layer in decoder_layers(model):
        fully_shard(layer)
    fully_shard(model, reshard_after_forward=True if forward_only else None)


def shard_live_teacher(teacher: TeacherSignal, log=print) -> None:
    """Shard a live teacher like the student, so neither has to fit one device whole. Its forward is
    then a collective: every rank scores the same number of batches, which the loop guarantees."""
    from distillery.signals.online import OnlineTeacher

    if not isinstance(teacher, OnlineTeacher):
        if hasattr(teacher, "teachers"):
            log("distill: fsdp: ensemble members are not sharded (each routes its own examples)")
        return  # a stored or served teacher holds no weights here
    if is_sharded(teacher.model):
        return
    if not any(True for _ in teacher.model.parameters()) or any(
            "quantized" in type(m).__module__ for m in teacher.model.modules()):
        raise ValueError("distill.shard_teacher: an int8 (dynamically quantised) teacher cannot be sharded; "
                         "set distill.shard_teacher: false or teacher.dtype to a float type")
    shard(teacher.model, forward_only=True)


def _tensorboard(out_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise RuntimeError("distill.tensorboard: needs the tensorboard package (pip install tensorboard)") from None
    return SummaryWriter(str(out_dir / "tensorboard"))


def is_sharded(model: torch.nn.Module) -> bool:
    return any(hasattr(p, "full_tensor") for p in model.parameters())


def full_state_dict(model: torch.nn.Module, opt: torch.optim.Optimizer | None = None):
    """The whole model's (and optimizer's) state. For an FSDP2-sharded model this is a collective
    that every rank must call; rank 0 receives the tensors, on CPU."""
    if not is_sharded(model):
        state = model.state_dict()
        return state if opt is None else (state, opt.state_dict())
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    if opt is None:
        return get_model_state_dict(model, options=options)
    return get_state_dict(model, opt, options=options)


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def init_distributed() -> bool:
    """Join the process group when launched by torchrun (gloo on CPU, NCCL on GPU)."""
    if "RANK" not in os.environ or (dist.is_available() and dist.is_initialized()):
        return False
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend)
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    return True
