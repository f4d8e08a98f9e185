"""Distillery: distil a large language model into a smaller, faster student, and prove it."""

__version__ = "0.1.0"

__all__ = ["Distiller", "load_recipe", "__version__"]


def __getattr__(name):  # keep `import distillery` light: torch loads only when these are used
    if name == "Distiller":
        from distillery.train.distiller import Distiller

        return Distiller
    if name == "load_recipe":
        from distillery.recipe import load_recipe

        return load_recipe
    raise AttributeError(name)
