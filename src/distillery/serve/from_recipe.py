"""A recipe's run, served: the gated variant (or another) as the student, the recipe's teacher behind the
confidence router, with the recipe's ``serve:`` settings; and the router's calibration on held-out prompts.
What ``distillery serve`` and ``distillery route calibrate`` run."""

from __future__ import annotations

from pathlib import Path

from distillery.recipe import Recipe
from distillery.serve.config import ModelConfig, RouterConfig, ServeConfig

TEACHER = "teacher"


def calibration_path(recipe: Recipe) -> Path:
    return recipe.run_path / "router.json"


def serve_config(recipe: Recipe, variant: str | None = None, *, port: int | None = None,
                 need_threshold: bool = True) -> tuple[ServeConfig, dict]:
    """(the server's settings, the student preloaded in the format it was saved in)."""
    from distillery.compress.variants import load_variant, variant_folder
    from distillery.models.load import load_tokenizer

    s, variant = recipe.serve, variant or recipe.gated()
    if variant == TEACHER or variant not in recipe.variant_names():
        raise ValueError(f"--variant {variant}: not a student variant of this recipe "
                         f"({', '.join(recipe.variant_names()[1:])})")
    folder = variant_folder(recipe.run_path, variant)
    if not (folder / "config.json").is_file():
        raise ValueError(f"{folder}: not made yet; run `distillery run` first")
    t = recipe.teacher
    models = [ModelConfig(name=variant, path=str(folder), batching=s.batching),
              ModelConfig(name=TEACHER, path=t.model, device=t.device, dtype=t.dtype, batching=s.batching)]
    router = None
    if s.router:
        calibrated = calibration_path(recipe)
        if need_threshold and s.threshold is None and not calibrated.is_file():
            raise ValueError(f"serve.threshold: none set and {calibrated} does not exist; run "
                             "`distillery route calibrate RECIPE` first, or set serve.threshold")
        router = RouterConfig(student=variant, teacher=TEACHER, score=s.score, threshold=s.threshold,
                              calibration=calibrated if calibrated.is_file() and s.threshold is None else None)
    config = ServeConfig(host=s.host, port=port if port is not None else s.port, api_key_env=s.api_key_env,
                         models=models, limits=s.limits, router=router, drift=s.drift)
    preloaded = {variant: (load_variant(folder), load_tokenizer(str(folder)))}
    return config, preloaded


def calibration_prompts(recipe: Recipe) -> list[str]:
    """The held-out prompts of ``serve.calibrate.prompts`` (by default the checkable built-in tasks)."""
    from distillery.data.prompts import read_prompts

    return [p.text for p in read_prompts(recipe.serve.calibrate.prompts, recipe.seed)]


def calibrate_recipe(recipe: Recipe, variant: str | None = None):
    from distillery.serve.router import calibrate_config

    c = recipe.serve.calibrate
    config, preloaded = serve_config(recipe, variant, need_threshold=False)
    return calibrate_config(config, calibration_prompts(recipe), out=calibration_path(recipe), preloaded=preloaded,
                            target=c.target, metric=c.metric, max_tokens=c.max_tokens, chat=c.chat)
