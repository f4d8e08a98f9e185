"""The stages of a recipe over its run folder, with a manifest that makes re-runs cheap.

A stage is skipped when the manifest says it completed with the same input hash and its outputs
are still there; each stage's input hash covers its recipe sections and the hashes of the stages it
reads from, so changing the data re-runs everything downstream and nothing upstream.
"""

from __future__ import annotations

import json
import os
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
                                       gguf_file=t.gguf_file, offload=t.offload)
        return self._teacher

    def student_device(self) -> torch.device:
        """``student.device``, or where the teacher computes (its first parameter: offloading keeps the
        embeddings on the device)."""
        from distillery.models.load import pick_device

        want = self.recipe.student.device
        return next(self.teacher().model.parameters()).device if want == "auto" else pick_device(want)

    def blocks(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._blocks is None:
            from safetensors.torch import load_file

            data = load_file(self.run / "data" / "blocks.safetensors")
            split = [{k.split(".", 1)[1]: v for k, v in data.items() if k.startswith(f"{name}.")}
                     for name in ("train", "heldout")]
            self._blocks = tuple(d if len(d) > 1 else d["input_ids"] for d in split)
        return self._blocks


# ---------------------------------------------------------------- stages


def stage_data(ctx: Context) -> list[str]:
    """Tokenise the training text into fixed-length blocks with a held-out tail, or into
    prompt/response examples (format: pairs) with the loss on the response only."""
    from safetensors.torch import save_file

    from distillery.data import sources as src
    from distillery.models.load import load_tokenizer

    r = ctx.recipe
    tok = load_tokenizer(r.teacher.model, r.cache_dir, r.teacher.gguf_file)
    kind = r.data.source.kind
    if r.data.format == "pairs":
        pairs = src.read_pairs(_generated(ctx) if kind == "generated" else r.data.source.path)
        cut = max(1, int(len(pairs) * (1 - r.data.heldout_fraction)))
        if cut >= len(pairs):
            raise src.DataError(f"data: {len(pairs)} examples are too few to hold out {r.data.heldout_fraction:.0%}")
        train, held = src.to_pairs(pairs[:cut], tok, r.data.block_size), src.to_pairs(pairs[cut:], tok, r.data.block_size)
        what = f"{len(pairs)} prompt/response pairs"
    else:
        if kind == "generated":
            docs = [src.Document(p, p + " " + q) for p, q in src.read_pairs(_generated(ctx))]
        elif kind == "teacher_samples":
            docs = src.teacher_samples(ctx.teacher().model, ctx.teacher().tokenizer, r.data.source, r.seed,
                                       ctx.progress)
        else:
            docs = src.read_source(r.data.source, r.cache_dir)
        train, held = src.to_blocks(docs, tok, r.data.block_size, r.data.heldout_fraction)
        train, held = {"input_ids": train}, {"input_ids": held}
        what = f"{len(docs)} documents"
    if r.data.max_train_blocks:
        from distillery.evaluate.quality import head

        train = head(train, r.data.max_train_blocks)
    out = ctx.run / "data" / "blocks.safetensors"
    tmp = out.with_name(".blocks.tmp")
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({f"{split}.{k}": v.contiguous() for split, d in (("train", train), ("heldout", held))
               for k, v in d.items()}, str(tmp))
    tmp.replace(out)
    ctx._blocks = None
    ctx.log(f"data: {what} -> {len(train['input_ids'])} training and {len(held['input_ids'])} held-out "
            f"examples of {r.data.block_size} tokens")
    return ["data/blocks.safetensors"]


def _generated(ctx: Context) -> Path:
    path = ctx.run / "data" / "train.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no generated data; add a generate section to the recipe")
    return path


def stage_student_init(ctx: Context) -> list[str]:
    """Build the student (cut from the teacher or fresh) and save it as a plain HF folder."""
    from distillery.models.load import load_model
    from distillery.models.student import choose_layers, cut_layers, decoder_layers, fresh_student

    r, teacher = ctx.recipe, ctx.teacher()
    s = r.student
    if s.from_teacher is not None:
        total = len(decoder_layers(teacher.model))
        train = ctx.blocks()[0]
        calib = (train["input_ids"] if isinstance(train, dict) else train)[: s.from_teacher.calibration_blocks]
        keep = choose_layers(s.from_teacher, total, teacher.model, calib)
        student = cut_layers(teacher.model, keep)
        ctx.log(f"student: kept teacher layers {keep} ({len(keep)} of {total}, select={s.from_teacher.select})")
        meta = {"kept_layers": keep}
    elif s.model is not None:
        student = load_model(s.model, device=str(ctx.student_device()), dtype="float32", cache=r.cache_dir).model
        meta = {"source": s.model}
    else:
        torch.manual_seed(r.seed)
        student = fresh_student(teacher.model.config, s.config).to(ctx.student_device())
        meta = {"config": s.config}
    student = student.float()
    _save_hf(student, teacher.tokenizer, ctx.run / "student_init")
    atomic_write_json(ctx.run / "student_init" / "distillery.json", meta)
    return ["student_init"]


def stage_generate(ctx: Context) -> list[str]:
    """Teacher data: prompts -> responses (mixed decoding, cached) -> curation -> data/."""
    from distillery.data.generate import run_generate

    summary = run_generate(ctx.recipe, ctx.run, progress=ctx.progress)
    ctx.log(f"generate: {summary}" if not isinstance(summary, dict) else
            "generate: " + ", ".join(f"{k} {v}" for k, v in summary.items() if isinstance(v, (int, float))))
    return ["data/train.jsonl"]


def stage_capture(ctx: Context) -> list[str]:
    """The logit store: the teacher's top-k over the training blocks, captured once, resumable."""
    from distillery.signals.capture import capture
    from distillery.signals.online import OnlineTeacher

    r, teacher = ctx.recipe, ctx.teacher()
    signal = OnlineTeacher(teacher.model, model_id=r.teacher.model, tokenizer_fingerprint=teacher.fingerprint)
    train = ctx.blocks()[0]
    store = capture(signal, train if torch.is_tensor(train) else train["input_ids"], ctx.run / "logits",
                    k=r.capture.k, temperature=r.capture.temperature, shard_tokens=r.capture.shard_tokens,
                    batch_size=r.capture.batch_size, progress=ctx.progress)
    store.verify()
    ctx.log(f"capture: {store.manifest['tokens']} tokens, {store.bytes_on_disk() / store.manifest['tokens']:.0f} "
            f"bytes/token at k={r.capture.k}")
    return ["logits/manifest.json"]


def _teacher_signal(ctx: Context):
    """The recipe's teacher as a signal: live, from the logit store, or an ensemble."""
    from distillery.models.load import load_model
    from distillery.signals.online import OnlineTeacher

    r, teacher = ctx.recipe, ctx.teacher()
    if r.distill.teacher_source == "store":
        from distillery.signals.store import StoredTeacher

        signal = StoredTeacher(ctx.run / "logits")
        signal.identity.check_compatible(tokenizer_fingerprint=teacher.fingerprint, k=r.capture.k,
                                         temperature=r.distill.losses.kd.temperature, what=f"{ctx.run / 'logits'}")
        return signal
    if r.distill.teacher_source == "served":
        import os

        from distillery.signals.served import ServedTeacher

        sv = r.distill.served
        return ServedTeacher(sv.base_url, sv.model, tokenizer_fingerprint=teacher.fingerprint, top_k=sv.top_k,
                             api_key=os.environ.get(sv.api_key_env) if sv.api_key_env else None, timeout=sv.timeout_s)
    main = OnlineTeacher(teacher.model, model_id=r.teacher.model, tokenizer_fingerprint=teacher.fingerprint)
    if r.ensemble is None:
        return main
    from distillery.signals.ensemble import EnsembleTeacher

    members = [main]
    for m in r.ensemble.members:
        loaded = load_model(m.model, device=m.device, dtype=m.dtype, cache=r.cache_dir, gguf_file=m.gguf_file,
                            offload=m.offload)
        model, model_id = loaded.model, m.model
        if m.keep_layers is not None:
            from distillery.models.student import cut_layers

            model, model_id = cut_layers(model, m.keep_layers), f"{m.model}[layers {m.keep_layers}]"
        members.append(OnlineTeacher(model, model_id=model_id, tokenizer_fingerprint=loaded.fingerprint))
    return EnsembleTeacher(members, r.ensemble.weights, route_by=r.ensemble.route_by, routes=r.ensemble.routes)


def stage_distill(ctx: Context) -> list[str]:
    """Distil the student; with ``generations > 1`` each generation's student teaches the next
    (born-again), and every generation is scored against the original teacher."""
    import copy

    from transformers import AutoModelForCausalLM

    from distillery.evaluate.quality import evaluate_models, head
    from distillery.signals.online import OnlineTeacher
    from distillery.train.loop import train
    from distillery.train.onpolicy import OnPolicyBatches
    from distillery.train.perturb import has_qat, strip_qat

    from distillery.train.loop import barrier, full_state_dict, init_distributed, world

    init_distributed()
    rank, world_size = world()
    if world_size > 1 and ctx.recipe.distill.generations > 1:
        raise RuntimeError("distill.generations > 1 (born-again) runs in one process, not under torchrun")
    r, teacher = ctx.recipe, ctx.teacher()
    # Checkpoints resume only the run that wrote them: other inputs (or --force) start from step 0.
    owner = ctx.run / "checkpoints" / "inputs.json"
    if rank == 0:
        if ctx.force or (owner.is_file() and read_json(owner).get("input_hash") != ctx.input_hash):
            for stale in ("checkpoints", "generations"):
                shutil.rmtree(ctx.run / stale, ignore_errors=True)
            (ctx.run / "train.jsonl").unlink(missing_ok=True)
        atomic_write_json(owner, {"input_hash": ctx.input_hash})
    barrier()
    device = ctx.student_device()
    student = AutoModelForCausalLM.from_pretrained(ctx.run / "student_init", dtype=torch.float32).to(device)
    signal = _teacher_signal(ctx)
    train_data, held = ctx.blocks()
    tok = teacher.tokenizer
    per_generation = []
    for g in range(r.distill.generations):
        out_dir = ctx.run if r.distill.generations == 1 else ctx.run / "generations" / f"gen-{g + 1}"
        if g > 0:  # born-again: the previous generation teaches; the next student starts from the cut again
            previous = student.eval()
            signal = OnlineTeacher(previous, model_id=f"born-again gen {g}", tokenizer_fingerprint=teacher.fingerprint)
            student = AutoModelForCausalLM.from_pretrained(ctx.run / "student_init", dtype=torch.float32).to(device)
        transform = None
        if r.distill.on_policy is not None:
            op = r.distill.on_policy
            sampler = None
            if op.generator != "transformers":
                from distillery.train.onpolicy import ServerSampler, VLLMSampler

                sampler = (ServerSampler if op.generator == "server" else VLLMSampler)(
                    student, op, op.sync_dir or ctx.run / "policy", eos_token_id=tok.eos_token_id, tokenizer=tok,
                    rank=rank, barrier=barrier)
            transform = OnPolicyBatches(student, op, seed=r.seed + g, eos_token_id=tok.eos_token_id,
                                        pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else 0,
                                        sampler=sampler)
        if r.distill.generations > 1:
            ctx.log(f"distill: generation {g + 1} of {r.distill.generations}")
        records = train(student, signal, train_data, r.distill, out_dir=out_dir, seed=r.seed + g,
                        eval_blocks=held, eval_teacher=teacher.model, progress=ctx.progress, log=ctx.log,
                        batch_transform=transform)
        if has_qat(student):
            strip_qat(student)  # export as a plain float model
        if r.distill.generations > 1:
            m = evaluate_models({"s": student}, head(held, r.evaluate.eval_blocks), teacher=teacher.model)["s"]
            per_generation.append({"generation": g + 1, **m})
            _save_hf(student, tok, out_dir / "student")
            student = copy.deepcopy(student)
    if per_generation:
        atomic_write_json(ctx.run / "eval" / "generations.json", per_generation)
        shutil.copyfile(out_dir / "train.jsonl", ctx.run / "train.jsonl")
        for m in per_generation:
            ctx.log(f"distill: generation {m['generation']}: perplexity {m['perplexity']:.2f}, "
                    f"KL to teacher {m['kl_to_teacher']:.4f}")
    if world_size > 1:
        state = full_state_dict(student)  # a collective: every rank takes part, rank 0 gets the tensors
        if rank == 0:
            plain = AutoModelForCausalLM.from_pretrained(ctx.run / "student_init", dtype=torch.float32)
            plain.load_state_dict(state)
            _save_hf(plain, tok, ctx.run / "student")
        barrier()
        return ["student", "train.jsonl"]
    _save_hf(student, tok, ctx.run / "student")
    if records:
        last = records[-1]
        ctx.log(f"distill: {len(records)} steps, final loss {last['loss']:.4f}"
                + (f", held-out KL {last['eval_kl_to_teacher']:.4f}" if "eval_kl_to_teacher" in last else ""))
    return ["student", "train.jsonl"]


def stage_evaluate(ctx: Context) -> list[str]:
    from transformers import AutoModelForCausalLM

    from distillery.evaluate.quality import evaluate_models, head

    r, teacher = ctx.recipe, ctx.teacher()
    device = ctx.student_device()
    held = head(ctx.blocks()[1], r.evaluate.eval_blocks)
    folders = {"student_init": "student_init", "student": "student"}
    models = {name: AutoModelForCausalLM.from_pretrained(ctx.run / folders[name], dtype=torch.float32).to(device)
              for name in r.evaluate.variants if name != "teacher"}
    results = evaluate_models(models, held, teacher=teacher.model, batch_size=r.evaluate.batch_size,
                              progress=ctx.progress)
    results = {k: v for k, v in results.items() if k in r.evaluate.variants}
    atomic_write_json(ctx.run / "eval" / "summary.json", results)
    outputs = ["eval/summary.json"]
    if r.evaluate.slices:
        from distillery.data.sources import read_source, to_blocks

        slices = {}
        for name, source in r.evaluate.slices.items():
            _, blocks = to_blocks(read_source(source, r.cache_dir), teacher.tokenizer, r.data.block_size, 0.5)
            scores = evaluate_models(models, blocks[: r.evaluate.eval_blocks], teacher=teacher.model,
                                     batch_size=r.evaluate.batch_size, progress=ctx.progress)
            slices[name] = {k: v for k, v in scores.items() if k in r.evaluate.variants}
            for variant, m in slices[name].items():
                ctx.log(f"evaluate: [{name}] {variant:13s} perplexity {m['perplexity']:12.2f}   "
                        f"KL to teacher {m['kl_to_teacher']:.4f}")
        atomic_write_json(ctx.run / "eval" / "slices.json", slices)
        outputs.append("eval/slices.json")
    for name, m in results.items():
        ctx.log(f"evaluate: {name:13s} perplexity {m['perplexity']:12.2f}   KL to teacher {m['kl_to_teacher']:.4f}"
                f"   top-1 agreement {m['top1_agreement']:.3f}")
    return outputs


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


# name -> (function, recipe sections it reads, stages it reads from, whether the recipe has it)
STAGES: dict[str, tuple[Callable[[Context], list[str]], tuple[str, ...], tuple[str, ...], Callable[[Recipe], bool]]] = {
    "generate": (stage_generate, ("teacher", "generate", "seed"), (), lambda r: r.generate is not None),
    "data": (stage_data, ("teacher", "data", "seed"), ("generate",), lambda r: True),
    "student_init": (stage_student_init, ("teacher", "student", "seed"), ("data",), lambda r: True),
    "capture": (stage_capture, ("teacher", "capture"), ("data",), lambda r: r.distill.teacher_source == "store"),
    "distill": (stage_distill, ("teacher", "distill", "ensemble", "seed"), ("data", "student_init", "capture"),
                lambda r: True),
    "evaluate": (stage_evaluate, ("evaluate",), ("data", "student_init", "distill"), lambda r: True),
    "report": (stage_report, ("report",), ("distill", "evaluate"), lambda r: r.report.enabled),
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
    _, sections, upstream, _ = STAGES[name]
    dumped = recipe.model_dump(mode="json")
    return sha256_json({"sections": {s: dumped.get(s) for s in sections},
                        "upstream": {u: manifest["stages"].get(u, {}).get("input_hash") for u in upstream}})


def run_stages(recipe: Recipe, names: list[str] | None = None, *, force: bool = False, progress: bool = True,
               log: Callable[[str], None] = print) -> dict:
    """Run the named stages (default: all, in order), skipping those already complete."""
    run = recipe.run_path
    stages = names or [n for n, st in STAGES.items() if st[3](recipe)]
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if world_size > 1 and stages != ["distill"]:
        raise RuntimeError("under torchrun only the distill stage runs (`torchrun ... -m distillery.cli distill "
                           "recipe.yaml`); run `distillery prepare` (and `capture`) in one process first")
    leader = rank == 0
    if not leader:
        log = lambda m: None  # noqa: E731 - one voice per job
    run.mkdir(parents=True, exist_ok=True)
    if leader:
        atomic_write_text(run / "recipe.yaml", dump_recipe(recipe))
    manifest = load_manifest(run)
    ctx = Context(recipe, run, progress and leader, log, force=force)
    for name in stages:
        fn, _, upstream, _ = STAGES[name]
        upstream = tuple(u for u in upstream if STAGES[u][3](recipe))
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
        if leader:
            atomic_write_json(run / "manifest.json", manifest)
        t0 = time.perf_counter()
        ctx.input_hash = h
        outputs = fn(ctx)
        manifest["stages"][name] = {"status": "complete", "input_hash": h, "outputs": outputs,
                                    "started": manifest["stages"][name]["started"], "finished": time.time(),
                                    "seconds": round(time.perf_counter() - t0, 2), "versions": versions()}
        if leader:
            atomic_write_json(run / "manifest.json", manifest)
    return manifest


def summary_line(run: Path) -> str | None:
    path = run / "eval" / "summary.json"
    if not path.is_file():
        return None
    s = json.loads(path.read_text())
    parts = [f"{k}: ppl {v['perplexity']:.1f}, KL {v.get('kl_to_teacher', float('nan')):.3f}" for k, v in s.items()]
    return " | ".join(parts)
