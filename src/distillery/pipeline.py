"""The stages of a recipe over its run folder: one ``Stage`` record each in ``STAGES``, run in order.

A stage is skipped when the manifest says it completed with the same input hash and every output file
it recorded is intact (manifest.py); its input hash covers its recipe sections, the content of the
local files they name, and what the stages it reads from wrote, so changing the data re-runs
everything downstream and nothing upstream.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from distillery.evaluate.quality import Examples
from distillery.io import atomic_path, atomic_write_json, atomic_write_text, read_json, save_model_folder, sha256_json
from distillery.manifest import (HashCache, input_fingerprints, load_manifest, outputs_digest, outputs_problem,
                                 record_outputs, versions)
from distillery.recipe import Recipe, dump_recipe


@dataclass
class Context:
    """What the stages of one invocation share: the recipe, the run folder, the process's rank, and the
    teacher and data blocks, loaded once on first use."""

    recipe: Recipe
    run: Path
    progress: bool = True
    log: Callable[[str], None] = print
    force: bool = False
    input_hash: str = ""
    rank: int = 0
    world_size: int = 1
    upstream: dict = field(default_factory=dict)  # stage -> digest of what it wrote (manifest)
    notes: dict = field(default_factory=dict)  # stage -> what its manifest entry states besides files
    _teacher: object = None
    _blocks: tuple[Examples, Examples] | None = None

    def teacher(self):
        if self._teacher is None:
            from distillery.models.teacher import load_teacher

            self._teacher = load_teacher(self.recipe.teacher, self.recipe.cache_dir)
        return self._teacher

    def student_device(self) -> torch.device:
        """``student.device``, or where the teacher computes (its first parameter: offloading keeps the
        embeddings on the device)."""
        from distillery.models.load import pick_device

        want = self.recipe.student.device
        return next(self.teacher().model.parameters()).device if want == "auto" else pick_device(want)

    def blocks(self) -> tuple[Examples, Examples]:
        """(train, held-out) examples: dicts of ``[N, T]`` tensors with ``input_ids`` and, for
        prompt/response pairs, ``attention_mask`` and ``labels``."""
        if self._blocks is None:
            from safetensors.torch import load_file

            data = load_file(self.run / "data" / "blocks.safetensors")
            self._blocks = tuple({k.split(".", 1)[1]: v for k, v in data.items() if k.startswith(f"{name}.")}
                                 for name in ("train", "heldout"))
        return self._blocks

    def mixture(self) -> dict | None:
        """``data/mixture.json`` (the components' rows and weights) when the data is a mixture."""
        return read_json(self.run / "data" / "mixture.json") if self.recipe.data.source.kind == "mixture" else None


# ---------------------------------------------------------------- stages


def stage_data(ctx: Context) -> list[str]:
    """Tokenise the training text into fixed-length blocks and held-out blocks (long documents' tails,
    whole short documents: ``sources.to_blocks``), or into prompt/response examples (format: pairs) with
    the loss on the response only; a mixture's components each in turn (data/mixture.json)."""
    from distillery.data import sources as src
    from distillery.models.load import load_tokenizer

    r = ctx.recipe
    tok = load_tokenizer(r.teacher.model, r.cache_dir, r.teacher.gguf_file)
    kind = r.data.source.kind
    (ctx.run / "data" / "mixture.json").unlink(missing_ok=True)
    if kind == "mixture":
        return _mixture_data(ctx, tok)
    if r.data.format == "pairs":
        pairs = src.read_pairs(_generated(ctx) if kind == "generated" else r.data.source.path)
        cut = max(1, int(len(pairs) * (1 - r.data.heldout_fraction)))
        if cut >= len(pairs):
            raise src.DataError(f"data: {len(pairs)} examples are too few to hold out {r.data.heldout_fraction:.0%}")
        train, held = src.to_pairs(pairs[:cut], tok, r.data.block_size), src.to_pairs(pairs[cut:], tok, r.data.block_size)
        what = f"{len(pairs)} prompt/response pairs"
    else:
        docs = _documents(ctx, r.data.source)
        train, held = src.to_blocks(docs, tok, r.data.block_size, r.data.heldout_fraction)
        train, held = {"input_ids": train}, {"input_ids": held}
        what = f"{len(docs)} documents"
    if r.data.max_train_blocks:
        from distillery.evaluate.quality import head

        train = head(train, r.data.max_train_blocks)
    _save_blocks(ctx, train, held)
    ctx.log(f"data: {what} -> {len(train['input_ids'])} training and {len(held['input_ids'])} held-out "
            f"examples of {r.data.block_size} tokens")
    return ["data/blocks.safetensors"]


def _documents(ctx: Context, source) -> list:
    """The documents of one (not mixed) source; generated pairs become running text."""
    from distillery.data import sources as src

    r = ctx.recipe
    if source.kind == "generated":
        return [src.Document(p, p + " " + q) for p, q in src.read_pairs(_generated(ctx))]
    if source.kind == "teacher_samples":
        return src.teacher_samples(ctx.teacher().model, ctx.teacher().tokenizer, source, r.seed, ctx.progress)
    return src.read_source(source, r.cache_dir)


def _mixture_data(ctx: Context, tok) -> list[str]:
    """Each component cut into blocks with its own held-out text; training rows one component after
    another, held-out rows interleaved by weight; data/mixture.json says which rows are whose."""
    from distillery.data import mixture, sources as src

    r = ctx.recipe
    parts = []
    for i, comp in enumerate(r.data.source.components):
        try:
            docs = _documents(ctx, comp.source)
            train, held = src.to_blocks(docs, tok, r.data.block_size, r.data.heldout_fraction)
        except src.DataError as e:
            raise src.DataError(f"data.source.components[{i}] ({comp.label}): {e}") from None
        if r.data.max_train_blocks:  # the cap is shared out by weight
            train = train[: max(1, round(r.data.max_train_blocks * r.data.source.shares()[comp.label]))]
        parts.append((comp.label, comp.weight, {"input_ids": train}, {"input_ids": held}, len(docs)))
    train, held, info = mixture.build(parts)
    _save_blocks(ctx, train, held)
    atomic_write_json(ctx.run / "data" / "mixture.json", info)
    stated = [{k: c[k] for k in ("name", "weight", "share", "documents", "train_blocks", "heldout_blocks")}
              for c in info["components"]]
    ctx.notes["data"] = {"mixture": stated}
    ctx.log("data: mixture " + ", ".join(f"{c['name']} {c['share']:.0%} ({c['train_blocks']} training, "
                                         f"{c['heldout_blocks']} held-out blocks)" for c in stated)
            + f" of {r.data.block_size} tokens")
    return ["data/blocks.safetensors", "data/mixture.json"]


def _save_blocks(ctx: Context, train: dict, held: dict) -> None:
    from safetensors.torch import save_file

    with atomic_path(ctx.run / "data" / "blocks.safetensors") as tmp:
        save_file({f"{split}.{k}": v.contiguous() for split, d in (("train", train), ("heldout", held))
                   for k, v in d.items()}, str(tmp))
    ctx._blocks = None


def _generated(ctx: Context) -> Path:
    path = ctx.run / "data" / "train.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no generated data; add a generate section to the recipe")
    return path


def stage_student_init(ctx: Context) -> list[str]:
    """Build the student (cut from the teacher or fresh) and save it as a plain HF folder."""
    from distillery.data.mixture import first_drawn
    from distillery.models.load import load_model
    from distillery.models.layers import decoder_layers
    from distillery.models.student import cut_from_teacher, fresh_student

    r, teacher = ctx.recipe, ctx.teacher()
    s = r.student
    if s.from_teacher is not None:
        # calibration text: the first n training blocks the run draws (read once: a bridge asks again)
        ids, info = ctx.blocks()[0]["input_ids"], ctx.mixture()
        student, meta = cut_from_teacher(s.from_teacher, teacher.model, lambda n: first_drawn(ids, info, r.seed, n))
        keep, total = meta["kept_layers"], len(decoder_layers(teacher.model))
        ctx.log(f"student: kept teacher layers {keep} ({len(keep)} of {total}, select={s.from_teacher.select})")
        for b in meta.get("bridges", []):
            ctx.log(f"student: bridge after teacher layer {b['after_teacher_layer']} over {b['replaces']}: "
                    f"hidden-state error {b['mse_before']:.3g} -> {b['mse_after']:.3g}")
    elif s.model is not None:
        student = load_model(s.model, device=str(ctx.student_device()), dtype="float32", cache=r.cache_dir).model
        meta = {"source": s.model}
    else:
        torch.manual_seed(r.seed)
        student = fresh_student(teacher.model.config, s.config).to(ctx.student_device())
        meta = {"config": s.config}
    student = student.float()
    save_model_folder(student, ctx.run / "student_init", teacher.tokenizer)
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
    signal = OnlineTeacher(teacher.model, model_id=teacher.source, tokenizer_fingerprint=teacher.fingerprint)
    # repair: shards whose checksum fails (damaged after capture) are captured again, the rest kept.
    c = r.capture
    store = capture(signal, ctx.blocks()[0]["input_ids"], ctx.run / "logits",
                    k=c.stored_k, temperature=c.temperature, shard_tokens=c.shard_tokens,
                    batch_size=c.batch_size, progress=ctx.progress, repair=True, log=ctx.log,
                    encoding=c.encoding, draws=c.draws if c.encoding != "topk" else 0, seed=c.seed)
    store.verify()
    ctx.log(f"capture: {store.manifest['tokens']} tokens, {store.bytes_on_disk() / store.manifest['tokens']:.0f} "
            f"bytes/token ({c.encoding}, k={c.stored_k}" + (f", {c.draws} draws)" if c.encoding != "topk" else ")"))
    return ["logits"]


def _teacher_signal(ctx: Context):
    """The recipe's teacher as a signal: live, from the logit store, from a server, or an ensemble."""
    from distillery.signals.online import OnlineTeacher

    r, teacher = ctx.recipe, ctx.teacher()
    if r.distill.teacher_source == "store":
        from distillery.signals.store import StoredTeacher

        signal = StoredTeacher(ctx.run / "logits")
        signal.identity.check_compatible(tokenizer_fingerprint=teacher.fingerprint, k=r.capture.stored_k,
                                         temperature=r.distill.losses.kd.temperature, what=f"{ctx.run / 'logits'}")
        return signal
    if r.distill.teacher_source == "served":
        from distillery.signals.served import ServedTeacher

        sv = r.distill.served
        return ServedTeacher(sv.base_url, sv.model, tokenizer_fingerprint=teacher.fingerprint, top_k=sv.top_k,
                             api_key=sv.api_key(), timeout=sv.timeout_s)
    if r.distill.cross_tokenizer is not None:
        return _cross_teacher(ctx)
    if r.ensemble is None:
        return OnlineTeacher(teacher.model, model_id=teacher.source, tokenizer_fingerprint=teacher.fingerprint)
    from distillery.models.teacher import load_teacher
    from distillery.signals.ensemble import EnsembleTeacher

    loaded_members = [load_teacher(m, r.cache_dir) for m in r.ensemble.members]
    # A member with another tokenizer speaks through the cross-tokenizer path; then every member gives top-k.
    foreign = [m.fingerprint != teacher.fingerprint for m in loaded_members]
    k = r.ensemble.top_k or (64 if any(foreign) else None)
    T = r.distill.losses.kd.temperature if k else 1.0
    members = [OnlineTeacher(teacher.model, model_id=teacher.source, tokenizer_fingerprint=teacher.fingerprint,
                             top_k=k, temperature=T)]
    for loaded, other in zip(loaded_members, foreign):
        if other:
            members.append(_cross_signal(loaded, teacher, top_k=k, unmatched_k=k, temperature=T))
        else:
            members.append(OnlineTeacher(loaded.model, model_id=loaded.source, tokenizer_fingerprint=loaded.fingerprint,
                                         top_k=k, temperature=T))
    return EnsembleTeacher(members, r.ensemble.weights, route_by=r.ensemble.route_by, routes=r.ensemble.routes)


def _cross_teacher(ctx: Context):
    """distill.cross_tokenizer: a teacher with another tokenizer, speaking in the student's ids and positions
    (the recipe's ``teacher`` gives the student its tokenizer)."""
    from distillery.models.teacher import load_teacher

    r = ctx.recipe
    cx = r.distill.cross_tokenizer
    return _cross_signal(load_teacher(cx.teacher, r.cache_dir), ctx.teacher(), top_k=cx.top_k,
                         unmatched_k=cx.unmatched_k, temperature=r.distill.losses.kd.temperature,
                         special_map=cx.special_map)


def _cross_signal(loaded, student_side, **options):
    """A loaded teacher of another tokenizer, speaking in the ids of ``student_side``'s tokenizer."""
    from distillery.signals.cross import CrossTokenizerTeacher

    return CrossTokenizerTeacher(loaded.model, loaded.tokenizer, student_side.tokenizer, model_id=loaded.source,
                                 student_fingerprint=student_side.fingerprint, teacher_fingerprint=loaded.fingerprint,
                                 **options)


def stage_distill(ctx: Context) -> list[str]:
    """Distil the student; with ``generations > 1`` each generation's student teaches the next
    (born-again), and every generation is scored against the original teacher."""
    r = ctx.recipe
    if ctx.world_size > 1 and r.distill.generations > 1:
        raise RuntimeError("distill.generations > 1 (born-again) runs in one process, not under torchrun")
    _claim_checkpoints(ctx)
    student = _initial_student(ctx)
    if r.distill.generations == 1:
        records = _train_generation(ctx, student, _teacher_signal(ctx), ctx.run, 0)
    else:
        student, records = _born_again(ctx, student)
    _export_student(ctx, student)
    if records:
        last = records[-1]
        ctx.log(f"distill: {len(records)} steps, final loss {last['loss']:.4f}"
                + (f", held-out KL {last['eval_kl_to_teacher']:.4f}" if "eval_kl_to_teacher" in last else ""))
    return ["student", "train.jsonl"]


def _claim_checkpoints(ctx: Context) -> None:
    """Checkpoints resume only the run that wrote them: other inputs (or --force) start from step 0."""
    from distillery.train.distributed import barrier

    owner = ctx.run / "checkpoints" / "inputs.json"
    if ctx.rank == 0:
        if ctx.force or (owner.is_file() and read_json(owner).get("input_hash") != ctx.input_hash):
            for stale in ("checkpoints", "generations"):
                shutil.rmtree(ctx.run / stale, ignore_errors=True)
            (ctx.run / "train.jsonl").unlink(missing_ok=True)
        atomic_write_json(owner, {"input_hash": ctx.input_hash})
    barrier()


def _initial_student(ctx: Context) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(ctx.run / "student_init", dtype=torch.float32).to(ctx.student_device())


def _train_generation(ctx: Context, student, signal, out_dir: Path, generation: int) -> list[dict]:
    """One run of the training loop (checkpoints and train.jsonl in ``out_dir``); the student is left a
    plain float model (fake quantisation stripped)."""
    from distillery.train.loop import train
    from distillery.train.perturb import has_qat, strip_qat

    r = ctx.recipe
    records = train(student, signal, ctx.blocks()[0], r.distill, out_dir=out_dir, seed=r.seed + generation,
                    eval_blocks=ctx.blocks()[1], eval_teacher=ctx.teacher().model, progress=ctx.progress,
                    log=ctx.log, batch_transform=_on_policy_batches(ctx, student, generation), mixture=ctx.mixture())
    if has_qat(student):
        strip_qat(student)
    return records


def _on_policy_batches(ctx: Context, student, generation: int):
    """The batch transform that swaps in the student's own samples (GKD), or None."""
    op = ctx.recipe.distill.on_policy
    if op is None:
        return None
    from distillery.train.distributed import barrier
    from distillery.train.onpolicy import OnPolicyBatches

    tok = ctx.teacher().tokenizer
    sampler = None
    if op.generator != "transformers":
        from distillery.train.onpolicy import ServerSampler, VLLMSampler

        sampler = (ServerSampler if op.generator == "server" else VLLMSampler)(
            student, op, op.sync_dir or ctx.run / "policy", eos_token_id=tok.eos_token_id, tokenizer=tok,
            rank=ctx.rank, barrier=barrier)
    return OnPolicyBatches(student, op, seed=ctx.recipe.seed + generation, eos_token_id=tok.eos_token_id,
                           pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else 0, sampler=sampler)


def _born_again(ctx: Context, student) -> tuple[torch.nn.Module, list[dict]]:
    """Generation g+1 starts again from the cut student and learns from generation g; each generation is
    saved under generations/gen-N and scored against the original teacher (eval/generations.json)."""
    import copy

    from distillery.evaluate.quality import evaluate_models, head
    from distillery.signals.online import OnlineTeacher

    r, teacher = ctx.recipe, ctx.teacher()
    signal, scores = _teacher_signal(ctx), []
    for g in range(r.distill.generations):
        out_dir = ctx.run / "generations" / f"gen-{g + 1}"
        if g > 0:
            signal = OnlineTeacher(student.eval(), model_id=f"born-again gen {g}",
                                   tokenizer_fingerprint=teacher.fingerprint)
            student = _initial_student(ctx)
        ctx.log(f"distill: generation {g + 1} of {r.distill.generations}")
        records = _train_generation(ctx, student, signal, out_dir, g)
        m = evaluate_models({"s": student}, head(ctx.blocks()[1], r.evaluate.eval_blocks), teacher=teacher.model)["s"]
        scores.append({"generation": g + 1, **m})
        ctx.log(f"distill: generation {g + 1}: perplexity {m['perplexity']:.2f}, KL to teacher "
                f"{m['kl_to_teacher']:.4f}")
        save_model_folder(student, out_dir / "student", teacher.tokenizer)
        student = copy.deepcopy(student)
    atomic_write_json(ctx.run / "eval" / "generations.json", scores)
    shutil.copyfile(out_dir / "train.jsonl", ctx.run / "train.jsonl")
    return student, records


def _export_student(ctx: Context, student) -> None:
    """student/ as a plain Hugging Face folder; an FSDP2-sharded student is gathered first (a collective:
    every rank takes part, rank 0 writes)."""
    from transformers import AutoModelForCausalLM

    from distillery.train.distributed import barrier, full_state_dict, is_sharded

    if is_sharded(student):
        state = full_state_dict(student)
        if ctx.rank == 0:
            student = AutoModelForCausalLM.from_pretrained(ctx.run / "student_init", dtype=torch.float32)
            student.load_state_dict(state)
    if ctx.rank == 0:
        save_model_folder(student, ctx.run / "student", ctx.teacher().tokenizer)
    barrier()


def stage_compress(ctx: Context) -> list[str]:
    """Each ``compress`` variant: a chain of prune / lowrank / redistill / quantize steps from the distilled
    student or another variant, with the teacher recovering quality (compress/chain.py)."""
    from distillery.compress.chain import Inputs, compress_variants
    from distillery.manifest import outputs_digest

    r = ctx.recipe
    train, held = ctx.blocks()
    inputs = Inputs(ctx.run, train, held, lambda: _teacher_signal(ctx), ctx.teacher().model, ctx.teacher().tokenizer,
                    ctx.student_device(), ctx.log, ctx.progress, ctx.mixture())
    return compress_variants(r, inputs, source_digest=ctx.upstream.get("distill") or "")


def stage_evaluate(ctx: Context) -> list[str]:
    """Every variant scored the same way, in the format it ships in (evaluate/suite.py)."""
    from distillery.compress.variants import load_variant, variant_folder
    from distillery.evaluate.suite import evaluate_variants

    r, teacher = ctx.recipe, ctx.teacher()
    names = [n for n in r.evaluated() if n != "teacher"]
    models = {n: load_variant(variant_folder(ctx.run, n), device=ctx.student_device()) for n in names}
    slices = {}
    if r.evaluate.slices:
        from distillery.data.sources import read_source, to_blocks

        for name, source in r.evaluate.slices.items():
            slices[name] = to_blocks(read_source(source, r.cache_dir), teacher.tokenizer, r.data.block_size, 0.5)[1]
    if ctx.mixture() is not None:  # each component's own held-out text, so the report shows every domain
        from distillery.data.mixture import heldout_of

        for c in ctx.mixture()["components"]:
            slices[f"heldout:{c['name']}"] = heldout_of(ctx.mixture(), ctx.blocks()[1], c["name"])["input_ids"]
    teacher_folder = None
    if r.evaluate.speed is not None and r.teacher.keep_layers is None:  # the folder a served teacher loads from
        from distillery.models.load import resolve_source

        where, gguf = resolve_source(r.teacher.model, r.cache_dir, r.teacher.gguf_file)
        teacher_folder = Path(where) if not gguf and Path(where).is_dir() else None
    return evaluate_variants(r.evaluate, ctx.run, models, teacher.model, teacher.tokenizer, ctx.blocks()[1], slices,
                             with_teacher="teacher" in r.evaluated(), teacher_folder=teacher_folder, log=ctx.log,
                             progress=ctx.progress, sampling=r.intended_sampling(), reviewed=r.gated())


def stage_gate(ctx: Context) -> list[str]:
    """The recipe's release rules on the gated variant -> gate.json (its exit code: 0 pass, 1 fail, 2 bad rule)."""
    results = judge(ctx.recipe, ctx.run, ctx.recipe.gated(), ctx.run / "gate.json")
    from distillery.gate import format_table

    ctx.log("gate: " + format_table(results).replace("\n", "\ngate: "))
    return ["gate.json"]


def judge(recipe: Recipe, run: Path, variant: str, out: Path) -> list[dict]:
    """The recipe's gate rules on ``variant``'s evaluation (eval/metrics.json), written to ``out``."""
    from distillery.gate import evaluate_rules, write_gate

    path = run / "eval" / "metrics.json"
    if not path.is_file():
        raise RuntimeError(f"{path}: no evaluation to judge; run `distillery evaluate` first")
    table = read_json(path)
    results = evaluate_rules(recipe.gate.rules, table["metrics"], variant, table["per_example"], seed=recipe.seed)
    write_gate(out, results)
    return results


def stage_report(ctx: Context) -> list[str]:
    from distillery.report.html import write_report

    path = write_report(ctx.run, title=ctx.recipe.report.title or f"Distillery run: {ctx.recipe.name}")
    ctx.log(f"report: {path}")
    return ["report.html"]


@dataclass(frozen=True)
class Stage:
    """One row of the pipeline: ``run`` does the work and returns its outputs (paths under the run folder);
    its input hash covers the recipe ``sections`` it reads and the hashes of the ``upstream`` stages it
    reads from; ``enabled`` says whether a recipe has it at all."""

    name: str
    run: Callable[[Context], list[str]]
    sections: tuple[str, ...]
    upstream: tuple[str, ...] = ()
    enabled: Callable[[Recipe], bool] = lambda r: True
    # settings the stage reads from outside its sections (resolved from the whole recipe), hashed with them
    derived: Callable[[Recipe], dict] = lambda r: {}


def _split_rule() -> dict:
    from distillery.data.sources import HELDOUT_SPLIT

    return {"heldout_split": HELDOUT_SPLIT}


STAGES: dict[str, Stage] = {s.name: s for s in (
    Stage("generate", stage_generate, ("teacher", "generate", "seed"), enabled=lambda r: r.generate is not None),
    Stage("data", stage_data, ("teacher", "data", "seed"), ("generate",), derived=lambda r: _split_rule()),
    Stage("student_init", stage_student_init, ("teacher", "student", "seed"), ("data",)),
    Stage("capture", stage_capture, ("teacher", "capture"), ("data",),
          enabled=lambda r: r.distill.teacher_source == "store"),
    Stage("distill", stage_distill, ("teacher", "distill", "ensemble", "seed"), ("data", "student_init", "capture")),
    Stage("compress", stage_compress, ("teacher", "compress", "distill", "ensemble", "seed"),
          ("data", "distill", "capture"), enabled=lambda r: bool(r.compress)),
    Stage("evaluate", stage_evaluate, ("teacher", "evaluate", "compress"), ("data", "student_init", "distill",
                                                                             "compress"),
          derived=lambda r: {**({"sampling": r.intended_sampling()} if r.evaluate.sequence else {}),
                             **({"reviewed": r.gated()} if r.evaluate.review else {}),
                             **(_split_rule() if r.evaluate.slices else {})}),
    Stage("gate", stage_gate, ("gate", "evaluate", "compress"), ("evaluate",), enabled=lambda r: bool(r.gate.rules)),
    Stage("report", stage_report, ("report",), ("distill", "evaluate", "gate"), enabled=lambda r: r.report.enabled),
)}


# ---------------------------------------------------------------- manifest and running


def input_hash(recipe: Recipe, name: str, manifest: dict, cache: HashCache) -> tuple[str, dict]:
    """(hash, fingerprints of the local files it covers): the stage's recipe sections, the content of the
    files and folders they name, and what the stages it reads from wrote."""
    stage = STAGES[name]
    dumped = recipe.model_dump(mode="json")
    sections = {s: dumped.get(s) for s in stage.sections}
    files = input_fingerprints(sections, cache)
    if derived := stage.derived(recipe):
        sections["derived"] = derived
    upstream = {u: outputs_digest(manifest["stages"].get(u, {})) for u in stage.upstream}
    return sha256_json({"sections": sections, "files": files, "upstream": upstream}), files


def run_stages(recipe: Recipe, names: list[str] | None = None, *, force: bool = False, progress: bool = True,
               log: Callable[[str], None] = print) -> dict:
    """Run the named stages (default: all, in order). A stage is skipped when its inputs are unchanged and
    its recorded outputs are intact; otherwise it runs (resuming where it can) and every stage after it
    that read its outputs becomes out of date."""
    from distillery.models.load import cache_dir
    from distillery.train.distributed import init_distributed, world

    run = recipe.run_path
    stages = names or [n for n, st in STAGES.items() if st.enabled(recipe)]
    init_distributed()  # a no-op unless launched by torchrun
    rank, world_size = world()
    if world_size > 1 and stages != ["distill"]:
        raise RuntimeError("under torchrun only the distill stage runs (`torchrun ... -m distillery.cli distill "
                           "recipe.yaml`); run `distillery prepare` (and `capture`) in one process first")
    leader = rank == 0
    if not leader:
        log = lambda m: None  # noqa: E731 - one voice per job
    if run.is_dir() and not (run / "manifest.json").exists() and any(run.iterdir()):
        raise RuntimeError(f"{run}: exists and is not a Distillery run folder (no manifest.json); nothing in it "
                           "is touched: pick another name or run_dir, or empty it")
    run.mkdir(parents=True, exist_ok=True)
    manifest = load_manifest(run)
    if leader:
        atomic_write_text(run / "recipe.yaml", dump_recipe(recipe))
    cache = HashCache(cache_dir(recipe.cache_dir) / "fingerprints.json" if leader else None)
    ctx = Context(recipe, run, progress and leader, log, force=force, rank=rank, world_size=world_size)
    for name in stages:
        stage = STAGES[name]
        h, inputs = input_hash(recipe, name, manifest, cache)
        entry = manifest["stages"].get(name, {})
        if entry.get("status") == "complete" and entry.get("input_hash") == h and not force:
            problem = outputs_problem(run, entry, cache)
            if problem is None:
                log(f"{name}: already complete (inputs unchanged, outputs intact), skipped")
                continue
            log(f"{name}: {problem}; running it again")
        _check_upstream(run, stage, recipe, manifest, cache)
        manifest["stages"][name] = {"status": "running", "input_hash": h, "inputs": inputs, "started": time.time()}
        if leader:
            atomic_write_json(run / "manifest.json", manifest)
        t0 = time.perf_counter()
        ctx.input_hash = h
        ctx.upstream = {u: outputs_digest(manifest["stages"].get(u, {})) for u in stage.upstream}
        outputs = stage.run(ctx)
        manifest["stages"][name] = {**manifest["stages"][name], "status": "complete", "outputs": outputs,
                                    "files": record_outputs(run, outputs, cache) if leader else {},
                                    "finished": time.time(), "seconds": round(time.perf_counter() - t0, 2),
                                    "versions": versions(), **ctx.notes.pop(name, {})}
        if leader:
            atomic_write_json(run / "manifest.json", manifest)
            cache.save()
    return manifest


def _check_upstream(run: Path, stage: Stage, recipe: Recipe, manifest: dict, cache: HashCache) -> None:
    """Refuse to run on the outputs of a stage that has not completed or whose outputs were damaged."""
    for u in stage.upstream:
        if not STAGES[u].enabled(recipe):
            continue
        entry = manifest["stages"].get(u, {})
        problem = "it has not completed" if entry.get("status") != "complete" else outputs_problem(run, entry, cache)
        if problem:
            raise RuntimeError(f"stage {stage.name} needs {u} first ({problem}): run `distillery run` "
                               f"or `distillery {u.replace('_', '-')}`")


def summary_line(run: Path) -> str | None:
    path = run / "eval" / "summary.json"
    if not path.is_file():
        return None
    s = json.loads(path.read_text())
    parts = [f"{k}: ppl {v['perplexity']:.1f}, KL {v.get('kl_to_teacher', float('nan')):.3f}" for k, v in s.items()]
    line = " | ".join(parts)
    texts = {"held-out": s}
    if (run / "eval" / "slices.json").is_file():
        texts.update(json.loads((run / "eval" / "slices.json").read_text()))
    # how much of the teacher's ability each trained variant keeps on each kind of text: the distilled student,
    # then the variants compressed from it (the format that ships)
    for variant in sorted((v for v in s if v not in ("teacher", "student_init")), key=lambda v: v != "student"):
        ratios = [f"{name} {t[variant]['perplexity'] / t['teacher']['perplexity']:.2f}x"
                  for name, t in texts.items() if variant in t and "teacher" in t]
        if ratios:
            line += f"\n{variant}/teacher perplexity: " + ", ".join(ratios)
    return line
