"""Where a Hugging Face causal LM keeps its decoder blocks: ``layers`` (Llama, Qwen, Mistral ...),
``h`` (GPT-2) or ``blocks``, under the model's ``base_model``."""

from __future__ import annotations

import torch

_NAMES = ("layers", "h", "blocks")


def _holder(model: torch.nn.Module) -> tuple[torch.nn.Module, str]:
    base = getattr(model, "base_model", model)
    for name in _NAMES:
        if isinstance(getattr(base, name, None), torch.nn.ModuleList):
            return base, name
    raise ValueError(f"{type(model).__name__}: cannot find its decoder layers (looked for {', '.join(_NAMES)})")


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The list of decoder blocks of a Hugging Face causal LM."""
    base, name = _holder(model)
    return getattr(base, name)


def replace_decoder_layers(model: torch.nn.Module, layers: torch.nn.ModuleList) -> torch.nn.ModuleList:
    """Put ``layers`` where the model keeps its decoder blocks; returns the blocks it held."""
    base, name = _holder(model)
    old = getattr(base, name)
    setattr(base, name, layers)
    return old
