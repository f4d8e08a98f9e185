"""The stages of a recipe over its run folder, with a manifest that makes re-runs cheap.

A stage is skipped when the manifest says it completed with the same input hash and its outputs
are still there; each stage's input hash covers its recipe sections and the hashes of the stages it
reads from, so changing the data re-runs everything downstream and nothing upstream.
"""

from __future__ import annotations

import json
import platform
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from distillery.io import atomic_write_json, atomic_write_text, read_json, sha256_json
from distillery.recipe import Recipe, dump_recipe


@dataclass
class Context:
    recipe: Recipe
    run: Path
    progress: bool = True
    log: Callable[[str], None] = print
    _teacher: object = None
    _blocks: tuple | None = None
    input_hash: str = ""
    force: bool = False

    # Lazily loaded and shared by the stages of one invocation.
    def teacher(self):
        if self._teacher is None:
            from distillery.models.load import load_model

            t = self.recipe.teacher
            self._teacher = load_model(t.model, device=t.device, dtype=t.dtype, cache=self.recipe.cache_dir,
                                       gguf_file=t.gguf_file)
        return self._teacher

    def blocks(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._blocks is None:
            from safetensors.torch import load_file

            data = load_file(self.run / "data" / "blocks.safetensors")
            self._blocks = (data["train"], data["heldout"])
        return self._blocks


# ---------------------------------------------------------------- stages


def stage_data(ctx: Context) -> list[str]:
    """Tokenise the training text into fixed-length blocks with a held-out tail."""
    from safetensors.torch import save_file

    from distillery.data.sources import read_source, to_blocks
    from distillery.models.load import load_tokenizer

    r = ctx.recipe
    tok = load_tokenizer(r.teacher.model, r.cache_dir, r.teacher.gguf_file)
    docs = read_source(r.data.source, r.cache_dir)
    train, held = to_blocks(docs, tok, r.data.block_size, r.data.heldout_fraction)
    if r.data.max_train_blocks:
        train = train[: r.data.max_train_blocks]
    out = ctx.run / "data" / "blocks.safetensors"
    tmp = out.with_name(".blocks.tmp")
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({"train": train.contiguous(), "heldout": held.contiguous()}, str(tmp))
    tmp.replace(out)
    ctx._blocks = (train, held)
    ctx.log(f"data: {len(docs)} documents -> {len(train)} training and {len(held)} held-out blocks "
            f"of {r.data.block_size} tokens")
    return ["data/blocks.safetensors"]


def stage_student_init(ctx: Context) -> list[str]:
    """Build the student (cut from the teacher or fresh) and save it as a plain HF folder."""
    from distillery.models.load import load_model
    from distillery.models.student import choose_layers, cut_layers, decoder_layers, fresh_student

    r, teacher = ctx.recipe, ctx.teacher()
    s = r.student
    if s.from_teacher is not None:
        total = len(decoder_layers(teacher.model))
        calib = ctx.blocks()[0][: s.from_teacher.calibration_blocks]
        keep = choose_layers(s.from_teacher, total, teacher.model, calib)
        student = cut_layers(teacher.model, keep)
        ctx.log(f"student: kept teacher layers {keep} ({len(keep)} of {total}, select={s.from_teacher.select})")
        meta = {"kept_layers": keep}
    elif s.model is not None:
        student = load_model(s.model, device=r.teacher.device, dtype="float32", cache=r.cache_dir).model
        meta = {"source": s.model}
    else:
        torch.manual_seed(r.seed)
        student = fresh_student(teacher.model.config, s.config).to(next(teacher.model.parameters()).device)
        meta = {"config": s.config}
    student = student.float()
    _save_hf(student, teacher.tokenizer, ctx.run / "student_init")
    atomic_write_json(ctx.run / "student_init" / "distillery.json", meta)
    return ["student_init"]


def stage_distill(ctx: Context) -> list[str]:
    from transformers import AutoModelForCausalLM

    from distillery.signals.online import OnlineTeacher
    from distillery.train.loop import train

    r, teacher = ctx.recipe, ctx.teacher()
    # Checkpoints resume only the run that wrote them: other inputs (or --force) start from step 0.
    owner = ctx.run / "checkpoints" / "inputs.json"
    if ctx.force or (owner.is_file() and read_json(owner).get("input_hash") != ctx.input_hash):
        shutil.rmtree(ctx.run / "checkpoints", ignore_errors=True)
        (ctx.run / "train.jsonl").unlink(missing_ok=True)
    atomic_write_json(owner, {"input_hash": ctx.input_hash})
    device = next(teacher.model.parameters()).device
    student = AutoModelForCausalLM.from_pretrained(ctx.run / "student_init", dtype=torch.float32).to(device)
    signal = OnlineTeacher(teacher.model, model_id=r.teacher.model, tokenizer_fingerprint=teacher.fingerprint)
    train_blocks, held = ctx.blocks()
    records = train(student, signal, train_blocks, r.distill, out_dir=ctx.run, seed=r.seed,
                    eval_blocks=held, eval_teacher=teacher.model, progress=ctx.progress, log=ctx.log)
    _save_hf(student, teacher.tokenizer, ctx.run / "student")
    if records:
        last = records[-1]
        ctx.log(f"distill: {len(records)} steps, final loss {last['loss']:.4f}"
                + (f", held-out KL {last['eval_kl_to_teacher']:.4f}" if "eval_kl_to_teacher" in last else ""))
    return ["student", "train.jsonl"]


def stage_evaluate(ctx: Context) -> list[str]:
    from transformers import AutoModelForCausalLM

    from distillery.evaluate.quality import evaluate_models

    r, teacher = ctx.recipe, ctx.teacher()
    device = next(teacher.model.parameters()).device
    held = ctx.blocks()[1][: r.evaluate.eval_blocks]
    folders = {"student_init": "student_init", "student": "student"}
    models = {name: AutoModelForCausalLM.from_pretrained(ctx.run / folders[name], dtype=torch.float32).to(device)
              for name in r.evaluate.variants if name != "teacher"}
    results = evaluate_models(models, held, teacher=teacher.model, batch_size=r.evaluate.batch_size,
                              progress=ctx.progress)
    results = {k: v for k, v in results.items() if k in r.evaluate.variants}
    atomic_write_json(ctx.run / "eval" / "summary.json", results)
    for name, m in results.items():
        ctx.log(f"evaluate: {name:13s} perplexity {m['perplexity']:12.2f}   KL to teacher {m['kl_to_teacher']:.4f}"
                f"   top-1 agreement {m['top1_agreement']:.3f}")
    return ["eval/summary.json"]


def stage_report(ctx: Context) -> list[str]:
    from distillery.report.html import write_report

    path = write_report(ctx.run, title=ctx.recipe.report.title or f"Distillery run: {ctx.recipe.name}")
    ctx.log(f"report: {path}")
    return ["report.html"]


def _save_hf(model, tokenizer, folder: Path) -> None:
    """save_pretrained into a temporary folder, then rename: a killed save never leaves half a model."""
    import tempfile

    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if folder.exists():
        shutil.rmtree(folder)
    tmp.replace(folder)


# name -> (function, recipe sections it reads, stages it reads from)
STAGES: dict[str, tuple[Callable[[Context], list[str]], tuple[str, ...], tuple[str, ...]]] = {
    "data": (stage_data, ("teacher", "data"), ()),
    "student_init": (stage_student_init, ("teacher", "student", "seed"), ("data",)),
    "distill": (stage_distill, ("teacher", "distill", "seed"), ("data", "student_init")),
    "evaluate": (stage_evaluate, ("evaluate",), ("data", "student_init", "distill")),
    "report": (stage_report, ("report",), ("distill", "evaluate")),
}


# ---------------------------------------------------------------- manifest and running


def versions() -> dict:
    import transformers

    import distillery

    return {"distillery": distillery.__version__, "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version()}


def load_manifest(run: Path) -> dict:
    path = run / "manifest.json"
    return read_json(path) if path.is_file() else {"stages": {}}


def input_hash(recipe: Recipe, name: str, manifest: dict) -> str:
    _, sections, upstream = STAGES[name]
    dumped = recipe.model_dump(mode="json")
    return sha256_json({"sections": {s: dumped.get(s) for s in sections},
                        "upstream": {u: manifest["stages"].get(u, {}).get("input_hash") for u in upstream}})


def run_stages(recipe: Recipe, names: list[str] | None = None, *, force: bool = False, progress: bool = True,
               log: Callable[[str], None] = print) -> dict:
    """Run the named stages (default: all, in order), skipping those already complete."""
    run = recipe.run_path
    run.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run / "recipe.yaml", dump_recipe(recipe))
    manifest = load_manifest(run)
    ctx = Context(recipe, run, progress, log, force=force)
    for name in names or list(STAGES):
        fn, _, upstream = STAGES[name]
        h = input_hash(recipe, name, manifest)
        entry = manifest["stages"].get(name, {})
        done = entry.get("status") == "complete" and entry.get("input_hash") == h
        if done and not force and all((run / o).exists() for o in entry.get("outputs", [])):
            log(f"{name}: already complete (inputs unchanged), skipped")
            continue
        missing = [u for u in upstream if manifest["stages"].get(u, {}).get("status") != "complete"]
        if missing:
            raise RuntimeError(f"stage {name} needs {', '.join(missing)} first: run `distillery run` "
                               f"or `distillery {missing[0].replace('_', '-')}`")
        manifest["stages"][name] = {"status": "running", "input_hash": h, "started": time.time()}
        atomic_write_json(run / "manifest.json", manifest)
        t0 = time.perf_counter()
        ctx.input_hash = h
        outputs = fn(ctx)
        manifest["stages"][name] = {"status": "complete", "input_hash": h, "outputs": outputs,
                                    "started": manifest["stages"][name]["started"], "finished": time.time(),
                                    "seconds": round(time.perf_counter() - t0, 2), "versions": versions()}
        atomic_write_json(run / "manifest.json", manifest)
    return manifest


def summary_line(run: Path) -> str | None:
    path = run / "eval" / "summary.json"
    if not path.is_file():
        return None
    s = json.loads(path.read_text())
    parts = [f"{k}: ppl {v['perplexity']:.1f}, KL {v.get('kl_to_teacher', float('nan')):.3f}" for k, v in s.items()]
    return " | ".join(parts)
