"""The `distillery` command: thin, it parses, calls the stage functions and shows progress."""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path
from typing import Optional

import typer

from distillery.recipe import RecipeError, load_recipe

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Distil a large language model into a smaller, faster student, and prove it.")

RecipeArg = typer.Argument(..., exists=False, help="the recipe YAML")
SetOpt = typer.Option(None, "--set", help="override a recipe field: dotted.key=value (repeatable)")


def _fail(msg: str) -> None:
    typer.secho(f"error: {msg}", fg="red", err=True)
    raise typer.Exit(2)


def _os_error(e: OSError) -> str:
    where = f"{e.filename}: " if e.filename else ""
    return f"{where}{e.strerror or e} (check the folder exists, is writable and the disk has room)"


def _recipe(path: Path, sets: list[str] | None):
    """The recipe, validated, including what needs more than the recipe itself (gate rules against the
    metrics, variants and slices its evaluation will produce)."""
    from distillery.gate import recipe_problems

    try:
        recipe = load_recipe(path, sets)
        problems = recipe_problems(recipe)
    except RecipeError as e:
        _fail(str(e))
    if problems:
        _fail("\n".join(f"{path}: {p}" for p in problems))
    return recipe


def _stages(path: Path, sets, names: list[str] | None, force: bool):
    from distillery.models.load import ModelLoadError
    from distillery.pipeline import run_stages, summary_line

    recipe = _recipe(path, sets)
    t0 = time.perf_counter()
    try:
        run_stages(recipe, names, force=force, log=lambda m: typer.echo(m))
    except (ModelLoadError, ValueError, RuntimeError) as e:
        _fail(str(e))
    except OSError as e:  # a read-only run folder, a full disk, a file that vanished mid-run
        _fail(_os_error(e))
    line = summary_line(recipe.run_path)
    typer.echo(f"done in {time.perf_counter() - t0:.0f}s -> {recipe.run_path}")
    if line and (names is None or "evaluate" in names):
        typer.echo(line)
    gate = recipe.run_path / "gate.json"
    if recipe.gate.rules and (names is None or "gate" in names) and gate.is_file():
        from distillery.io import read_json

        verdict = read_json(gate)
        if verdict.get("exit_code"):
            failed = [r["rule"] for r in verdict.get("rules", []) if r.get("verdict") != "pass"]
            typer.secho(f"gate: FAILED for {recipe.gated()}: {'; '.join(failed)}", fg="red", err=True)
            raise typer.Exit(verdict["exit_code"])
        typer.echo(f"gate: passed for {recipe.gated()} ({len(verdict.get('rules', []))} rules)")


@app.command()
def run(recipe: Path = RecipeArg, set: Optional[list[str]] = SetOpt,
        force: bool = typer.Option(False, help="re-run stages even when complete")):
    """Run every stage of the recipe (skipping those already complete; resuming an interrupted one)."""
    _stages(recipe, set, None, force)


@app.command()
def validate(recipe: Path = RecipeArg, set: Optional[list[str]] = SetOpt):
    """Check a recipe without running anything."""
    r = _recipe(recipe, set)
    typer.echo(f"{recipe}: ok (run folder {r.run_path})")


def _stage_command(name: str, stages: list[str], doc: str):
    def cmd(recipe: Path = RecipeArg, set: Optional[list[str]] = SetOpt,
            force: bool = typer.Option(False, help="re-run even when complete")):
        _stages(recipe, set, stages, force)
    cmd.__doc__ = doc
    app.command(name)(cmd)


_stage_command("generate", ["generate"], "Generate, score and curate teacher data (resumable, cached).")
_stage_command("prepare", ["data", "student_init"], "Tokenise the data and build the initial student.")


@app.command("capture")
def capture_cmd(recipe: Path = RecipeArg, set: Optional[list[str]] = SetOpt,
                force: bool = typer.Option(False, help="re-run even when complete"),
                repair: bool = typer.Option(False, help="re-capture the shards whose checksum fails (a store "
                                            "damaged after capture), keeping the rest")):
    """Capture the teacher's top-k log-probs into the logit store (resumable; --repair mends damaged shards)."""
    _stages(recipe, set, ["capture"], force or repair)


_stage_command("distill", ["distill"], "Distil the student (resumes from the last checkpoint).")
_stage_command("compress", ["compress"], "Make each compress variant (prune, lowrank, redistill, quantize).")
_stage_command("evaluate", ["evaluate"], "Evaluate every variant (teacher, students, compressed variants).")
_stage_command("report", ["report"], "Write report.html.")


@app.command()
def gate(recipe: Path = RecipeArg, set: Optional[list[str]] = SetOpt,
         variant: Optional[str] = typer.Option(None, help="judge this variant instead of the recipe's "
                                               "(gate.variant); writes gate-VARIANT.json, the run is untouched")):
    """Check the recipe's release rules: exit 0 when every rule passes, 1 when one fails, 2 for a bad rule."""
    from distillery.gate import exit_code, format_table

    r = _recipe(recipe, set)
    if not r.gate.rules:
        _fail(f"{recipe}: gate.rules: no rules to check")
    if variant is None:
        _stages(recipe, set, ["gate"], False)
        return
    if variant not in r.evaluated():
        _fail(f"--variant {variant}: not evaluated by this recipe ({', '.join(r.evaluated())})")
    from distillery.pipeline import judge

    try:
        results = judge(r, r.run_path, variant, r.run_path / f"gate-{variant}.json")
    except (ValueError, RuntimeError) as e:
        _fail(str(e))
    typer.echo(format_table(results))
    code = exit_code(results)
    typer.echo(f"gate: {'passed' if code == 0 else 'FAILED'} for {variant}")
    raise typer.Exit(code)


@app.command("serve")
def serve_cmd(recipe: Path = RecipeArg, set: Optional[list[str]] = SetOpt,
              variant: Optional[str] = typer.Option(None, help="the student variant (default: the gated one)"),
              port: Optional[int] = typer.Option(None, help="default: serve.port")):
    """Serve a variant (and the teacher behind the confidence router) on OpenAI-compatible endpoints."""
    from distillery.serve.app import serve
    from distillery.serve.from_recipe import serve_config

    r = _recipe(recipe, set)
    try:
        config, preloaded = serve_config(r, variant, port=port)
    except (ValueError, RuntimeError) as e:
        _fail(str(e))
    typer.echo(f"serving {config.models[0].name} (+ teacher, router: {config.router is not None}) on "
               f"http://{config.host}:{config.port}/v1")
    serve(config, preloaded=preloaded)


route_app = typer.Typer(help="The confidence router.", no_args_is_help=True)
app.add_typer(route_app, name="route")


@route_app.command("calibrate")
def route_calibrate(recipe: Path = RecipeArg, set: Optional[list[str]] = SetOpt,
                    variant: Optional[str] = typer.Option(None, help="the student variant (default: the gated one)")):
    """Choose the router's threshold on held-out prompts: the fewest teacher calls reaching serve.calibrate.target
    of the teacher's quality; writes <run>/router.json, which `distillery serve` reads."""
    from distillery.serve.from_recipe import calibrate_recipe, calibration_path

    r = _recipe(recipe, set)
    try:
        cal = calibrate_recipe(r, variant)
    except (ValueError, RuntimeError) as e:
        _fail(str(e))
    typer.echo(f"route calibrate: threshold {cal.threshold:.4g}, teacher share {cal.teacher_share:.1%} at target "
               f"{cal.target:.0%} of the teacher's quality -> {calibration_path(r)}")


@app.command()
def export(recipe: Path = RecipeArg, set: Optional[list[str]] = SetOpt,
           variant: str = typer.Option("student", help="student, or a compress variant by name"),
           format: str = typer.Option("gguf", help="gguf (llama.cpp, Ollama, LM Studio) or hf (a plain folder)"),
           gguf_type: str = typer.Option("Q8_0", help="gguf: F32, F16, Q8_0 or Q4_0"),
           out: Optional[Path] = typer.Option(None, help="default: <run>/export/VARIANT.gguf or .../VARIANT/")):
    """Export a variant for serving: a GGUF file, or a plain Hugging Face folder."""
    from distillery.compress.variants import variant_folder

    r = _recipe(recipe, set)
    if variant not in r.variant_names() or variant == "teacher":
        _fail(f"--variant {variant}: not a student variant of this recipe ({', '.join(r.variant_names()[1:])})")
    folder = variant_folder(r.run_path, variant)
    if not (folder / "config.json").is_file():
        _fail(f"{folder}: not made yet; run `distillery run {recipe}` first")
    try:
        if format == "gguf":
            from distillery.compress.gguf_export import export_gguf_folder

            target = out or r.run_path / "export" / f"{variant}.{gguf_type.lower()}.gguf"
            export_gguf_folder(folder, target, gguf_type)
        elif format == "hf":
            from distillery.compress.variants import load_variant, save_variant
            from distillery.models.load import load_tokenizer

            target = out or r.run_path / "export" / variant
            save_variant(load_variant(folder), target, load_tokenizer(str(folder)))
        else:
            _fail(f"--format {format}: expected gguf or hf")
    except (ValueError, RuntimeError) as e:
        _fail(str(e))
    except OSError as e:
        _fail(_os_error(e))
    typer.echo(f"exported {variant} -> {target}")


@app.command()
def sweep(recipe: Path = RecipeArg,
          set: list[str] = typer.Option(..., "--set", help="a grid axis: dotted.key=v1,v2,... (repeatable)")):
    """Run a grid of recipes, each point its own run folder; write a comparison table and chart."""
    from rich.table import Table

    from distillery.models.load import ModelLoadError
    from distillery.sweep import run_sweep

    try:
        rows = run_sweep(recipe, set, log=lambda m: typer.echo(m))
    except RecipeError as e:
        _fail(str(e))
    except (ModelLoadError, ValueError, FileNotFoundError, RuntimeError) as e:
        _fail(str(e))
    table = Table(title="sweep")
    cols = [c for c in rows[0] if c != "run" and not c.startswith(("teacher.", "student_init."))]
    for c in cols:
        table.add_column(c)
    for r in rows:
        table.add_row(*[f"{r[c]:.4g}" if isinstance(r[c], float) else str(r[c]) for c in cols])
    _console().print(table)


def _console():
    from rich.console import Console

    return Console(width=None if sys.stdout.isatty() else 200)  # pipes and logs get whole tables


logits_app = typer.Typer(help="The logit store.", no_args_is_help=True)
app.add_typer(logits_app, name="logits")


@logits_app.command("inspect")
def logits_inspect(path: Path = typer.Argument(..., help="a logit store folder (runs/NAME/logits)")):
    """Print a logit store's manifest and its size per token."""
    from distillery.signals.store import StoreError, inspect

    try:
        typer.echo(inspect(path))
    except (StoreError, FileNotFoundError, ValueError) as e:
        _fail(str(e))


@logits_app.command("verify")
def logits_verify(path: Path = typer.Argument(..., help="a logit store folder")):
    """Check every shard's checksum; names the first bad shard."""
    from distillery.signals.store import LogitStore, StoreError

    try:
        LogitStore(path).verify()
    except (StoreError, FileNotFoundError, ValueError) as e:
        _fail(str(e))
    typer.echo(f"{path}: ok")


teachers_app = typer.Typer(help="Choosing a teacher.", no_args_is_help=True)
app.add_typer(teachers_app, name="teachers")


@teachers_app.command("compare")
def teachers_compare(recipe: Path = RecipeArg, set: Optional[list[str]] = SetOpt,
                     prompts: Optional[int] = typer.Option(None, help="how many prompts (default generate.compare_prompts)"),
                     json_out: Optional[Path] = typer.Option(None, "--json", help="also write the rows as JSON")):
    """Run candidate teachers (generate.teachers; the first is the reference) on a sample of prompts."""
    from rich.table import Table

    from distillery.data.generate import compare_teachers

    r = _recipe(recipe, set)
    try:
        rows = compare_teachers(r, n_prompts=prompts)
    except (ValueError, RuntimeError, FileNotFoundError) as e:
        _fail(str(e))
    table = Table(title="teachers compare")
    for col in rows[0]:
        table.add_column(col)
    for row in rows:
        table.add_row(*[f"{v:.4g}" if isinstance(v, float) else str(v) for v in row.values()])
    _console().print(table)
    if json_out:
        from distillery.io import atomic_write_json

        atomic_write_json(json_out, rows)


@app.command()
def doctor(cache: Optional[Path] = typer.Option(None, help="cache folder (default $DISTILLERY_CACHE or ~/.cache/distillery)")):
    """What this machine has: torch, devices, threads, cache folder, the builtin teacher."""
    import torch

    from distillery.models.load import cache_dir, check_builtins

    typer.echo(f"python        {sys.version.split()[0]}")
    typer.echo(f"torch         {torch.__version__} (threads {torch.get_num_threads()}, cpus {os.cpu_count()})")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            typer.echo(f"cuda:{i}        {p.name}, {p.total_memory / 2**30:.0f} GiB, bf16 "
                       f"{torch.cuda.is_bf16_supported()}")
    else:
        typer.echo("cuda          not available (CPU, float32)")
    c = cache_dir(cache)
    typer.echo(f"cache         {c}")
    ok, lines = check_builtins(cache)
    for line in lines:
        typer.echo(f"teacher       {line}")
    from distillery.data.sources import DataError, austen_dir, gensim_data_dir

    for label, fn in (("corpus        austen", lambda: austen_dir(cache)), ("corpus        gensim", gensim_data_dir)):
        try:
            typer.echo(f"{label}: {fn()}")
        except DataError as e:
            typer.echo(f"{label}: {e}")
    if not ok:
        _fail("a cached conversion of a builtin teacher is damaged (above); it is re-converted from its GGUF "
              "on next use, or delete the folder named")


def main():
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    app()


if __name__ == "__main__":
    main()
