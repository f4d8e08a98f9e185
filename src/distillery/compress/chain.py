"""The compress stage's work: each recipe variant is a chain of steps (prune, lowrank, redistill, quantize)
applied to the distilled student or to another variant, written to ``compressed/<name>/`` with a
``compress.json`` record of every step (what was done, parameters and bytes before and after, seconds).

A variant whose record matches its settings and its source is not made again, so an interrupted stage
resumes with the next variant; a ``redistill`` step resumes from its own checkpoints (kept outside the
variant's folder, under ``checkpoints/compress/``)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from distillery.compress.variants import describe, load_variant, save_variant
from distillery.data.mixture import first_drawn
from distillery.io import atomic_write_json, read_json, sha256_json


@dataclass
class Inputs:
    """What the steps need from the run: calibration and training examples, the teacher as a signal (made
    on first use) and as a model for held-out scores, the tokenizer, where to train, how to report."""

    run: Path
    train_examples: dict
    eval_examples: dict
    teacher_signal: Callable[[], object]
    eval_teacher: torch.nn.Module
    tokenizer: object
    device: torch.device
    log: Callable[[str], None] = print
    progress: bool = True
    mixture: dict | None = None  # data/mixture.json: re-distillation draws by the same weights


def compress_variants(recipe, inputs: Inputs, source_digest: str) -> list[str]:
    """Make every variant of ``recipe.compress`` in order; returns their folders (relative to the run)."""
    keys: dict[str, str] = {"student": source_digest}
    made = []
    for v in recipe.compress:
        folder = inputs.run / "compressed" / v.name
        key = sha256_json({"variant": v.model_dump(mode="json", by_alias=True), "source": keys[v.from_],
                           "distill": recipe.distill.model_dump(mode="json"), "seed": recipe.seed})
        keys[v.name] = key
        made.append(str(folder.relative_to(inputs.run)))
        record = folder / "compress.json"
        if record.is_file() and read_json(record).get("key") == key:
            inputs.log(f"compress: {v.name}: already made (same settings and source), skipped")
            continue
        source = inputs.run / ("student" if v.from_ == "student" else f"compressed/{v.from_}")
        model = load_variant(source)
        steps, before = [], describe(model)
        for i, step in enumerate(v.steps):
            t0 = time.perf_counter()
            last = i + 1 < len(v.steps) and v.steps[i + 1].kind == "quantize"
            model, detail = _apply(step, model, recipe, inputs, inputs.run / "checkpoints" / "compress" / v.name /
                                   f"step-{i + 1}", keep_fake_quant=last)
            steps.append({"step": step.kind, "settings": getattr(step, step.kind).model_dump(mode="json"),
                          **detail, **describe(model), "seconds": round(time.perf_counter() - t0, 2)})
            inputs.log(f"compress: {v.name}: {step.kind} -> {steps[-1]['parameters']:,} parameters, "
                       f"{steps[-1]['weight_bytes'] / 2**20:.1f} MiB of weights ({steps[-1]['format']})")
        save_variant(model, folder, inputs.tokenizer)
        atomic_write_json(record, {"key": key, "name": v.name, "from": v.from_, "before": before,
                                   "after": describe(model), "steps": steps,
                                   "bytes_on_disk": sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())})
    return made


def calibration_blocks(inputs: Inputs, seed: int, n: int) -> torch.Tensor:
    """What prune and lowrank score channels, heads and layers on: the first ``n`` training blocks the run
    draws, as the student's cut does. For a mixture those come from every component by weight; the first
    ``n`` rows would all be the first component's (the rows lie component after component)."""
    return first_drawn(inputs.train_examples["input_ids"], inputs.mixture, seed, n)


def _apply(step, model: torch.nn.Module, recipe, inputs: Inputs, work: Path, keep_fake_quant: bool):
    """One step: (the new model, what it measured)."""
    kind = step.kind
    cfg = getattr(step, kind)
    if kind == "prune":
        from distillery.compress.prune import prune, prune_to_target

        blocks = calibration_blocks(inputs, recipe.seed, cfg.calibration_blocks)
        options = dict(head_mode=cfg.head_mode, depth_method=cfg.depth_method)
        result = (prune_to_target(model, blocks, cfg.target, axes=tuple(cfg.axes), **options) if cfg.target else
                  prune(model, blocks, layers=cfg.layers, mlp_channels=cfg.mlp_channels, heads=cfg.heads,
                        hidden=cfg.hidden, **options))
        return result.model, {"report": result.report}
    if kind == "lowrank":
        from distillery.compress.lowrank import factorize

        blocks = calibration_blocks(inputs, recipe.seed, cfg.calibration_blocks)
        report = factorize(model, cfg.layers, rank=cfg.rank, energy=cfg.energy, param_ratio=cfg.param_ratio,
                           method=cfg.method, blocks=blocks if cfg.method == "asvd" else None)
        return model, {"report": report.to_dict()}
    if kind == "redistill":
        return _redistill(model, cfg, recipe, inputs, work, keep_fake_quant)
    from distillery.compress.quantize import convert_qat, qat_scheme, quantize

    if qat_scheme(model) is not None:
        return convert_qat(model, cfg.scheme), {"converted_from_qat": True}
    example = inputs.train_examples["input_ids"][:1]
    model = quantize(model, cfg.scheme, backend=cfg.backend, group_size=cfg.group_size,
                     quantize_embeddings=cfg.quantize_embeddings, example=example, keep_float=cfg.keep_float)
    return model, {"converted_from_qat": False}


def _redistill(model, cfg, recipe, inputs: Inputs, work: Path, keep_fake_quant: bool):
    """The distill loop again, on the compressed model, with the recipe's losses and teacher signal."""
    from distillery.evaluate.quality import evaluate_models, head
    from distillery.train.loop import train
    from distillery.train.perturb import has_qat, strip_qat

    d = recipe.distill
    train_cfg = d.model_copy(update={"steps": cfg.steps, "lr": cfg.lr or d.lr, "warmup_steps": cfg.warmup_steps,
                                     "qat": cfg.qat, "eval_every": cfg.steps, "generations": 1,
                                     "early_stopping_patience": None})
    model = model.to(inputs.device)
    held = head(inputs.eval_examples, d.eval_blocks)
    before = evaluate_models({"m": model}, held, teacher=inputs.eval_teacher)["m"]
    records = train(model, inputs.teacher_signal(), inputs.train_examples, train_cfg, out_dir=work,
                    seed=recipe.seed, eval_blocks=held, eval_teacher=inputs.eval_teacher,
                    progress=inputs.progress, log=inputs.log, mixture=inputs.mixture)
    if has_qat(model) and not keep_fake_quant:
        strip_qat(model)
    model = model.cpu()
    after = {k.removeprefix("eval_"): v for k, v in records[-1].items() if k.startswith("eval_")}
    return model, {"steps_trained": len(records), "kl_before": before["kl_to_teacher"],
                   "kl_after": after.get("kl_to_teacher"), "perplexity_before": before["perplexity"],
                   "perplexity_after": after.get("perplexity")}
