"""A compressed variant on disk, whatever was done to it: one loader and one saver for plain, factored
(low-rank) and quantized models, used by the compress stage, evaluation, serving and export alike."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from distillery.compress.lowrank import factored_layers, load_lowrank, save_lowrank
from distillery.compress.quantize import load_quantized, quantization_record, save_quantized
from distillery.io import save_model_folder


def variant_folder(run: str | os.PathLike, name: str) -> Path:
    """Where a variant of a run lives: student_init/, student/, or compressed/NAME/ (docs/pipeline.md)."""
    return Path(run) / (name if name in ("student_init", "student") else f"compressed/{name}")


def load_variant(folder: str | os.PathLike, device: str | torch.device = "cpu") -> torch.nn.Module:
    """Any folder a run writes (student_init/, student/, compressed/NAME/), in the numeric format it was
    saved in: a quantized model stays quantized, a factored one stays factored."""
    folder = Path(folder)
    if quantization_record(folder) is not None:
        return load_quantized(folder, device=device)
    return load_lowrank(folder, dtype=torch.float32, device=device)


def save_variant(model: torch.nn.Module, folder: str | os.PathLike, tokenizer=None) -> Path:
    if quantization_record(model) is not None:
        return save_quantized(model, folder, tokenizer)
    if factored_layers(model):
        return save_lowrank(model, folder, tokenizer)
    return save_model_folder(model, folder, tokenizer)


def describe(model: torch.nn.Module) -> dict:
    """What a variant is made of: parameters (elements), weight bytes, numeric format."""
    from distillery.compress.quantize import parameter_count, weight_bytes

    record = quantization_record(model)
    return {"parameters": parameter_count(model), "weight_bytes": weight_bytes(model),
            "format": record.get("scheme") if record else "float32", "factored_layers": len(factored_layers(model))}
