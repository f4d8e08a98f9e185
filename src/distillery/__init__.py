"""Distillery: distil a large language model into a smaller, faster student, and prove it."""

import logging

__version__ = "0.1.0"

# transformers imports torchao when it is installed; on CPU-only machines torchao then logs that its
# CUDA kernels cannot load, and torch warns about its enum registration. Neither is actionable here.
for _name in ("torchao", "torchao.kernel.intmm", "torch.utils._pytree"):
    logging.getLogger(_name).setLevel(logging.ERROR)

__all__ = ["Distiller", "load_recipe", "__version__"]


def __getattr__(name):  # keep `import distillery` light: torch loads only when these are used
    if name == "Distiller":
        from distillery.train.distiller import Distiller

        return Distiller
    if name == "load_recipe":
        from distillery.recipe import load_recipe

        return load_recipe
    raise AttributeError(name)
