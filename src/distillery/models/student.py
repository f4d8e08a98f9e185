"""Students: cut from the teacher (keep some decoder layers) or built fresh from a config.

The result is always a plain transformers model: ``save_pretrained`` writes it and
``AutoModelForCausalLM.from_pretrained`` reads it back with no distillery code.
"""

from __future__ import annotations

import copy

import torch

from distillery.models.layers import decoder_layers, replace_decoder_layers
from distillery.models.offload import offload_like


class StudentError(ValueError):
    pass


def evenly_spaced(total: int, n: int) -> list[int]:
    """n of ``total`` layers, evenly spaced, always keeping the first and the last."""
    if not 1 <= n <= total:
        raise StudentError(f"student.from_teacher.num_layers: {n} is not between 1 and the teacher's {total} layers")
    if n == 1:
        return [total - 1]
    return sorted({round(i * (total - 1) / (n - 1)) for i in range(n)})


@torch.no_grad()
def block_influence(model: torch.nn.Module, blocks: torch.Tensor, batch_size: int = 4) -> list[float]:
    """Per layer, the mean over tokens of 1 - cos(input, output) of the block (ShortGPT's block
    influence): a layer that barely turns the hidden state is the cheapest to drop."""
    layers = decoder_layers(model)
    sums = torch.zeros(len(layers), dtype=torch.float64)
    count = 0
    captured: dict[int, torch.Tensor] = {}

    def hook(i):
        def fn(module, args, kwargs, output):
            x = args[0] if args else kwargs["hidden_states"]
            y = output[0] if isinstance(output, tuple) else output
            cos = torch.nn.functional.cosine_similarity(x.float(), y.float(), dim=-1)
            captured[i] = (1 - cos).double().sum()
        return fn

    handles = [layer.register_forward_hook(hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        device = next(model.parameters()).device
        for start in range(0, len(blocks), batch_size):
            batch = blocks[start:start + batch_size].to(device)
            model(input_ids=batch)
            for i, v in captured.items():
                sums[i] += v.cpu()
            count += batch.numel()
    finally:
        for h in handles:
            h.remove()
    return (sums / max(count, 1)).tolist()


@torch.no_grad()
def calibration_loss(model: torch.nn.Module, blocks: torch.Tensor, batch_size: int = 4) -> float:
    """Mean next-token cross-entropy of ``model`` on ``blocks``."""
    device = next(model.parameters()).device
    total, n = 0.0, 0
    for start in range(0, len(blocks), batch_size):
        batch = blocks[start:start + batch_size].to(device)
        logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()
        total += torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten(),
                                                   reduction="sum").item()
        n += batch[:, 1:].numel()
    return total / max(n, 1)


@torch.no_grad()
def skip_loss_increase(model: torch.nn.Module, blocks: torch.Tensor, batch_size: int = 4) -> list[float]:
    """Per layer, how much the calibration loss rises when that layer alone is skipped (its output
    replaced by its input): the cheapest layers to drop rise least. One forward pass per layer."""
    base = calibration_loss(model, blocks, batch_size)

    def identity(module, args, kwargs, output):
        x = args[0] if args else kwargs["hidden_states"]
        return (x, *output[1:]) if isinstance(output, tuple) else x

    rises = []
    for layer in decoder_layers(model):
        handle = layer.register_forward_hook(identity, with_kwargs=True)
        try:
            rises.append(calibration_loss(model, blocks, batch_size) - base)
        finally:
            handle.remove()
    return rises


SCORING = ("influence", "skip_loss")


def layer_scores(model: torch.nn.Module, blocks: torch.Tensor, method: str = "influence",
                 batch_size: int = 4) -> list[float]:
    """How much each layer matters (higher: keep): block influence, or the loss rise when skipped."""
    if method == "influence":
        return block_influence(model, blocks, batch_size)
    if method == "skip_loss":
        return skip_loss_increase(model, blocks, batch_size)
    raise StudentError(f"layer scoring {method!r} is not one of {', '.join(SCORING)}")


def top_layers(scores: list[float], n: int) -> list[int]:
    """The indices of the ``n`` highest scores, in layer order."""
    return sorted(sorted(range(len(scores)), key=lambda i: -scores[i])[:n])


def choose_layers(cfg, total: int, teacher: torch.nn.Module | None = None,
                  calibration: torch.Tensor | None = None) -> list[int]:
    """The teacher layers a ``student.from_teacher`` recipe section keeps, in order."""
    if cfg.keep_layers is not None:
        bad = [i for i in cfg.keep_layers if i >= total]
        if bad:
            raise StudentError(f"student.from_teacher.keep_layers: {bad} out of range (teacher has {total} layers)")
        return sorted(set(cfg.keep_layers))
    if cfg.every is not None:
        return list(range(0, total, cfg.every))
    n = cfg.num_layers
    if cfg.select == "even":
        return evenly_spaced(total, n)
    if n > total:
        raise StudentError(f"student.from_teacher.num_layers: {n} > the teacher's {total} layers")
    if teacher is None or calibration is None:
        raise StudentError(f"student.from_teacher.select={cfg.select} needs the teacher and calibration text")
    # "importance" is block influence, its name from before skip_loss existed
    return top_layers(layer_scores(teacher, calibration, "influence" if cfg.select == "importance" else cfg.select), n)


def cut_from_teacher(cfg, teacher: torch.nn.Module, rows) -> tuple[torch.nn.Module, dict]:
    """The student a ``student.from_teacher`` section (``cfg``) describes: the layers it keeps cut from
    ``teacher``, bridged over the dropped ones if it asks. ``rows(n)``: n blocks of training text for
    calibration. Returns the student and what was done (kept layers, the bridges' fit)."""
    keep = choose_layers(cfg, len(decoder_layers(teacher)), teacher, rows(cfg.calibration_blocks))
    student = cut_layers(teacher, keep)
    meta: dict = {"kept_layers": keep}
    if cfg.bridge == "linear":
        from distillery.models.bridge import fit_bridges

        meta["bridges"] = fit_bridges(student, teacher, keep, rows(cfg.bridge_blocks), cfg.bridge_ridge)
    return student, meta


def cut_layers(teacher: torch.nn.Module, keep: list[int]) -> torch.nn.Module:
    """A deep copy of ``teacher`` that keeps only the decoder layers ``keep`` (in order)."""
    layers = decoder_layers(teacher)
    if not keep or min(keep) < 0 or max(keep) >= len(layers):
        raise StudentError(f"keep_layers {keep}: out of range for {len(layers)} layers")
    student = copy.deepcopy(teacher)
    for src, dst in zip(layers, decoder_layers(student)):
        offload_like(src, dst)
    kept = torch.nn.ModuleList([decoder_layers(student)[i] for i in keep])
    for new_idx, layer in enumerate(kept):
        # The KV cache is indexed by each attention module's layer_idx: renumber them.
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_idx
    replace_decoder_layers(student, kept)
    cfg = student.config
    for attr in ("num_hidden_layers", "n_layer", "num_layers"):
        if hasattr(cfg, attr):
            setattr(cfg, attr, len(keep))
    if getattr(cfg, "layer_types", None):  # per-layer attention kinds (sliding/full) follow their layers
        cfg.layer_types = [cfg.layer_types[i] for i in keep]
    return student


def fresh_student(teacher_config, overrides: dict) -> torch.nn.Module:
    """A randomly initialised model of the teacher's architecture with some config fields changed."""
    from transformers import AutoModelForCausalLM

    cfg = copy.deepcopy(teacher_config)
    for key, value in overrides.items():
        if not hasattr(cfg, key):
            raise StudentError(f"student.config.{key}: the teacher's {type(cfg).__name__} has no such field")
        setattr(cfg, key, value)
    if hasattr(cfg, "layer_types") and cfg.layer_types and len(cfg.layer_types) != cfg.num_hidden_layers:
        cfg.layer_types = cfg.layer_types[: cfg.num_hidden_layers]
    try:
        return AutoModelForCausalLM.from_config(cfg)
    except (ValueError, RuntimeError, AssertionError) as e:
        raise StudentError(f"student.config: {e}") from None
