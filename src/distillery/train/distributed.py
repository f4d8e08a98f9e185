"""Process groups under ``torchrun``: joining, ranks, collectives, and wrapping the student (DDP) or
sharding it and a live teacher (FSDP2). Every function is a no-op, or the plain value, in one process,
so the loop, the pipeline and the on-policy samplers call them unconditionally.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from distillery.models.layers import decoder_layers


def init_distributed() -> bool:
    """Join the process group when launched by torchrun (gloo on CPU, NCCL on GPU)."""
    if "RANK" not in os.environ or (dist.is_available() and dist.is_initialized()):
        return False
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend)
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    return True


def world() -> tuple[int, int]:
    """(rank, world size) of the joined process group; (0, 1) in one process."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_ranks_sum(values: list[float]) -> list[float]:
    """Elementwise sum over every rank (float64); the values themselves in one process."""
    if world()[1] == 1:
        return [float(v) for v in values]
    packed = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(packed)
    return packed.tolist()


def rank0_decides(flag: bool) -> bool:
    """Rank 0's value of ``flag`` on every rank (e.g. early stopping), so all ranks leave the loop together."""
    if world()[1] == 1:
        return flag
    t = torch.tensor([int(flag)])
    dist.broadcast(t, 0)
    return bool(t.item())


def average_grads(params: list[torch.nn.Parameter]) -> None:
    """Average gradients over ranks by hand, for parameters outside DDP/FSDP (projection heads)."""
    world_size = world()[1]
    if world_size == 1:
        return
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad /= world_size


def is_sharded(model: torch.nn.Module) -> bool:
    """FSDP2 parameters are DTensors, which have ``full_tensor``."""
    return any(hasattr(p, "full_tensor") for p in model.parameters())


def full_value(x: torch.Tensor) -> float:
    """A scalar that may be a DTensor (e.g. a sharded model's grad norm)."""
    return float(x.full_tensor() if hasattr(x, "full_tensor") else x)


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


def load_full_state_dict(model: torch.nn.Module, opt: torch.optim.Optimizer, model_state: dict,
                         opt_state: dict) -> None:
    """The inverse of :func:`full_state_dict`: a full (unsharded) state into a plain or sharded model, so a
    run can resume on any number of ranks."""
    if is_sharded(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        set_state_dict(model, opt, model_state_dict=model_state, optim_state_dict=opt_state,
                       options=StateDictOptions(full_state_dict=True))
    else:
        model.load_state_dict(model_state)
        opt.load_state_dict(opt_state)


def wrap_student(student: torch.nn.Module, *, fsdp: bool) -> torch.nn.Module:
    """Under torchrun: shard the student in place with FSDP2 (returned as is) or wrap it in DDP. One
    process: the student itself."""
    if world()[1] == 1:
        return student
    if fsdp:
        shard(student)
        return student
    dev = next(student.parameters()).device
    return torch.nn.parallel.DistributedDataParallel(student, device_ids=[dev] if dev.type == "cuda" else None)


def shard(model: torch.nn.Module, *, forward_only: bool = False) -> None:
    """FSDP2: every decoder layer its own shard group, then the root (embeddings, head). Each rank
    keeps 1/world of the weights and gathers one layer at a time for its forward (and backward).
    FSDP2 keeps the root gathered after forward, for the backward; a forward-only model (the
    teacher) has no backward, so its root is resharded too."""
    from torch.distributed.fsdp import fully_shard

    for layer in decoder_layers(model):
        fully_shard(layer)
    fully_shard(model, reshard_after_forward=True if forward_only else None)


def shard_live_teacher(teacher, log=print) -> None:
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
