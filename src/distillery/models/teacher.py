"""A teacher as a recipe describes it (``teacher``, an ensemble member, a ``generate.teachers`` candidate):
loaded, placed, and cut to ``keep_layers`` when the recipe asks for a smaller copy."""

from __future__ import annotations

import os

from distillery.models.load import Loaded, load_model
from distillery.recipe import TeacherConfig


def load_teacher(cfg: TeacherConfig, cache: str | os.PathLike | None = None) -> Loaded:
    """``Loaded.source`` names what teaches (``model[layers ...]`` for a cut copy): it becomes the
    signal's model id, recorded with every artifact made from it."""
    loaded = load_model(cfg.model, device=cfg.device, dtype=cfg.dtype, cache=cache, gguf_file=cfg.gguf_file,
                        offload=cfg.offload)
    if cfg.keep_layers is None:
        return loaded
    from distillery.models.student import cut_layers

    return Loaded(cut_layers(loaded.model, cfg.keep_layers).eval(), loaded.tokenizer,
                  f"{cfg.model}[layers {cfg.keep_layers}]", loaded.fingerprint)
