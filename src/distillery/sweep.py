"""Grid sweeps: every combination of ``--set key=v1,v2`` values is its own run folder; the results
are gathered into one table (sweep.json) and a chart (sweep.png) beside them."""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path
from typing import Callable

from distillery.io import atomic_write_bytes, atomic_write_json
from distillery.recipe import RecipeError, load_recipe


def parse_grid(sets: list[str]) -> dict[str, list[str]]:
    grid = {}
    for item in sets:
        key, sep, values = item.partition("=")
        if not sep or not values:
            raise RecipeError(f"--set {item!r}: expected dotted.key=value1,value2,...")
        grid[key] = [v.strip() for v in values.split(",")]
    return grid


def point_name(base: str, point: dict[str, str]) -> str:
    parts = [f"{k.split('.')[-1]}_{v}" for k, v in point.items()]
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{base}--{'--'.join(parts)}")


def run_sweep(recipe_path: Path, sets: list[str], *, progress: bool = True,
              log: Callable[[str], None] = print) -> list[dict]:
    from distillery.pipeline import run_stages

    grid = parse_grid(sets)
    base = load_recipe(recipe_path)
    points = [dict(zip(grid, combo)) for combo in itertools.product(*grid.values())]
    # Validate every point before running any, so a bad value fails in seconds, not hours.
    recipes = []
    for point in points:
        overrides = [f"{k}={v}" for k, v in point.items()] + [f"name={point_name(base.name, point)}"]
        recipes.append(load_recipe(recipe_path, overrides))
    rows = []
    for point, recipe in zip(points, recipes):
        log(f"sweep: {recipe.name}")
        run_stages(recipe, progress=progress, log=log)
        summary = json.loads((recipe.run_path / "eval" / "summary.json").read_text())
        rows.append({**point, "run": str(recipe.run_path), **{f"{variant}.{m}": v for variant, ms in summary.items()
                                                              for m, v in ms.items() if m != "tokens"}})
    out = base.run_dir / f"{base.name}-sweep"
    atomic_write_json(out / "sweep.json", {"grid": grid, "rows": rows})
    _chart(rows, list(grid), out / "sweep.png")
    return rows


def _chart(rows: list[dict], keys: list[str], path: Path) -> None:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [", ".join(f"{k.split('.')[-1]}={r[k]}" for k in keys) for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(max(8, 1.2 * len(rows)), 4))
    for ax, metric, title in ((axes[0], "student.kl_to_teacher", "held-out KL to the teacher"),
                              (axes[1], "student.perplexity", "held-out perplexity")):
        ax.bar(range(len(rows)), [r.get(metric, float("nan")) for r in rows], color="C0")
        ax.set_xticks(range(len(rows)), labels, rotation=30, ha="right", fontsize=8)
        ax.set_title(title)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
