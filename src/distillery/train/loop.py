"""The distillation loop: one screen, nanoGPT-style.

Every optimiser step draws ``batch_size * grad_accum * world_size`` examples at a position that is
a pure function of the step and the seed, so a resumed run reads exactly the data the uninterrupted
one would have. Under ``torchrun`` each rank takes its share of every step's examples, the student
is wrapped in DDP, and the loss is normalised by the global token count.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
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
    n_examples = len(data["input_ids"])
    device = next(student.parameters()).device
    torch.manual_seed(seed)
    if cfg.gradient_checkpointing:
        student.gradient_checkpointing_enable()
    if cfg.qat is not None:
        prepare_qat(student, cfg.qat)
    model = student
    fsdp = world_size > 1 and cfg.fsdp
    if fsdp:
        shard(student)
        if cfg.shard_teacher:
            shard_live_teacher(teacher, log)
    elif world_size > 1:
        model = torch.nn.parallel.DistributedDataParallel(student, device_ids=[device] if device.type == "cuda" else None)
    kd = distiller or Distiller(model, teacher, cfg.losses, noise=cfg.noise)
    kd.student = model
    params = [p for p in student.parameters()] + [p for p in kd.extra_parameters()]
    opt = make_optimizer(params, cfg)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
    ckpt_dir, log_path = out_dir / "checkpoints", out_dir / "train.jsonl"
    start, records = 0, []
    state = load_latest(ckpt_dir)
    if state is not None:
        if fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

            set_state_dict(student, opt, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                           options=StateDictOptions(full_state_dict=True))
        else:
            student.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
        kd.load_state_dict(state.get("distiller", {}))
        sched.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        start, records = state["step"], state["records"]
        log(f"distill: resuming from step {start} ({ckpt_dir})")
    if rank == 0:  # the log holds exactly the steps the model has seen: drop lines past the checkpoint
        atomic_write_text(log_path, "".join(json.dumps(r) + "\n" for r in records))

    board = _tensorboard(out_dir) if cfg.tensorboard and rank == 0 else None
    student.train()
    per_rank = cfg.batch_size * cfg.grad_accum
    best, stale = min((r["eval_kl_to_teacher"] for r in records if "eval_kl_to_teacher" in r), default=math.inf), 0
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc="distill", disable=not progress or rank)
    for step in bar:
        t0 = time.perf_counter()
        idx = step_indices(step, per_rank * world_size, n_examples, seed)
        mine = idx[rank * per_rank:(rank + 1) * per_rank]
        batch = {**{k: v[mine].to(device) for k, v in data.items()}, "example_ids": mine.to(device)}
        if batch_transform is not None:  # e.g. on-policy: the student's own completions replace the batch
            batch = batch_transform(batch, step)
        # Normalise by the global count of predicted tokens (all micro-batches and ranks).
        n_tokens = predicted_tokens(batch)
        if world_size > 1:
            count = torch.tensor([n_tokens], dtype=torch.float64)
            dist.all_reduce(count)
            n_tokens = int(count.item())
        terms: dict[str, float] = {}
        with hidden_noise(student, cfg.noise):
            for i in range(0, len(batch["input_ids"]), cfg.batch_size):
                micro = {k: v[i:i + cfg.batch_size] for k, v in batch.items()}
                with autocast(cfg, device):
                    # DDP averages gradients over ranks: scale each rank's loss so the average is the global mean.
                    loss = kd.loss(micro, num_tokens=n_tokens / world_size, step=step)
                loss.backward()
                for k, v in kd.last_terms.items():
                    terms[k] = terms.get(k, 0.0) + v
        if world_size > 1:
            packed = torch.tensor(list(terms.values()), dtype=torch.float64)
            dist.all_reduce(packed)
            terms = dict(zip(terms, (packed / world_size).tolist()))
        if world_size > 1:  # projection heads live outside DDP/FSDP: average their gradients by hand
            for p in kd.extra_parameters():
                if p.grad is not None:
                    dist.all_reduce(p.grad)
                    p.grad /= world_size
        gnorm = torch.nn.utils.clip_grad_norm_(params, cfg.clip_grad or float("inf"))
        gnorm = gnorm.full_tensor() if hasattr(gnorm, "full_tensor") else gnorm
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        rec = {"step": step + 1, **terms, "lr": sched.get_last_lr()[0], "grad_norm": float(gnorm),
               "tokens": n_tokens, "tokens_per_s": n_tokens / (time.perf_counter() - t0)}
        if device.type == "cuda":
            rec["peak_memory_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
        stop = False
        # A sharded student's forward is a collective: under FSDP every rank evaluates (rank 0 records).
        if eval_blocks is not None and ((step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps) \
                and (rank == 0 or fsdp):
            held = head(eval_blocks, cfg.eval_blocks)
            m = evaluate_models({"student": student}, held, teacher=eval_teacher)["student"]
            rec.update({f"eval_{k}": v for k, v in m.items() if k != "tokens"})
            if "kl_to_teacher" in m:
                best, stale = (m["kl_to_teacher"], 0) if m["kl_to_teacher"] < best else (best, stale + 1)
                stop = cfg.early_stopping_patience is not None and stale >= cfg.early_stopping_patience
        if world_size > 1:  # rank 0 decides early stopping for everyone
            flag = torch.tensor([int(stop)])
            dist.broadcast(flag, 0)
            stop = bool(flag.item())
        records.append(rec)
        bar.set_postfix(loss=f"{terms['loss']:.4f}", **({"eval_kl": f"{rec['eval_kl_to_teacher']:.3f}"}
                                                       if "eval_kl_to_teacher" in rec else {}))
        if rank == 0:
            with open(log_path, "a") as f:
                f.write(json.dumps(rec) + "\n")
            if board is not None:
                for key, value in rec.items():
                    if key != "step" and isinstance(value, (int, float)):
                        board.add_scalar(key, value, rec["step"])
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps or stop:
            model_state, opt_state = full_state_dict(student, opt)
            if rank == 0:
                save_checkpoint(ckpt_dir, step + 1, {"model": model_state, "optimizer": opt_state,
                                                     "scheduler": sched.state_dict(), "records": records,
                                                     "distiller": kd.state_dict()}, cfg.keep_checkpoints)
        if stop:
            log(f"distill: early stop at step {step + 1} (no better held-out KL in "
                f"{cfg.early_stopping_patience} evals)")
            break
    if board is not None:
        board.close()
    return records


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
