"""The recipe: pydantic models of every stage's settings, loaded from YAML.

A bad recipe is rejected before any work starts, with one line per problem that names the field
path (``distill.losses.kd.temperature: must be > 0``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Union, get_args

import yaml
from pydantic import (AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, StrictInt, ValidationError,
                      ValidationInfo, field_validator, model_validator)


class RecipeError(ValueError):
    """A recipe that cannot be run; ``str(e)`` has one line per problem, each naming its field."""


def _not_bool(v: Any) -> Any:
    if isinstance(v, bool):
        raise ValueError("expected a number, not true/false")
    return v


# A float field: numbers and numeric strings (YAML reads 1e-4 as a string), never true/false.
Number = Annotated[float, BeforeValidator(_not_bool)]


def _from_recipe_folder(p: Path, info: ValidationInfo) -> Path:
    """A relative path written in a recipe file is relative to that file's folder, so a recipe means the
    same thing wherever it is run from (a recipe built in Python has no folder: the current directory)."""
    base = (info.context or {}).get("base")
    return Path(base) / p if base is not None and not p.is_absolute() else p


# A path from a recipe: relative to the recipe file's folder (see load_recipe).
RecipePath = Annotated[Path, AfterValidator(_from_recipe_folder)]


def _existing(p: Path) -> Path:
    if not p.exists():
        raise ValueError(f"file not found: {p}")
    return p


ExistingPath = Annotated[RecipePath, AfterValidator(_existing)]


def _model_source(v: str, info: ValidationInfo) -> str:
    """``builtin:NAME`` and hub ids pass as they are; a local folder or .gguf file is found relative to the
    recipe's folder and must exist."""
    if v.startswith("builtin:"):
        return v
    path = Path(v).expanduser()
    base = (info.context or {}).get("base")
    found = Path(base) / path if base is not None and not path.is_absolute() else path
    if found.exists():
        return str(found)
    if v.startswith((".", "/", "~")) or v.endswith(".gguf") or v.count("/") != 1:
        raise ValueError(f"not found: {found} (a local model folder or .gguf file; a hub id is org/name)")
    return v  # a hub id, fetched where a network exists


ModelSource = Annotated[str, AfterValidator(_model_source)]


def exactly_one(model: BaseModel, names: tuple[str, ...]) -> str:
    """The one of ``names`` that is set on ``model``; a ValueError naming them unless exactly one is."""
    given = [n for n in names if getattr(model, n) is not None]
    if len(given) != 1:
        raise ValueError(f"give exactly one of {', '.join(names)} (got {given or 'none'})")
    return given[0]


class Strict(BaseModel):
    # Unknown keys are errors: a typo must never be silently ignored.
    model_config = ConfigDict(extra="forbid", frozen=False)


# ---------------------------------------------------------------- models


class TeacherConfig(Strict):
    model: ModelSource = Field(
        "builtin:smollm2-135m-instruct",
        description="builtin:NAME, a Hugging Face folder, a .gguf file, or a hub id",
    )
    gguf_file: str | None = Field(None, description="GGUF file name inside `model` (a folder or hub repo)")
    device: str = Field("auto", description="where the teacher computes: auto (the GPU if any), cpu, cuda:1, ...")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    offload: bool = Field(False, description="keep the decoder layers in CPU memory and copy each to `device` only "
                          "for its forward: a teacher larger than the GPU, at the cost of the copies")
    keep_layers: list[int] | None = Field(
        None, description="use only these decoder layers of the model (e.g. a smaller ensemble member)")


class CutConfig(Strict):
    """Cut a student from the teacher by keeping some of its decoder layers."""

    keep_layers: list[int] | None = None
    every: StrictInt | None = Field(None, ge=1)
    num_layers: StrictInt | None = Field(None, ge=1)
    select: Literal["even", "importance", "skip_loss"] = Field(
        "even", description="which num_layers to keep: evenly spaced, by block influence (importance: the layers that "
        "turn the hidden state most), or by skip_loss (the layers whose skipping raises the calibration loss most)")
    calibration_blocks: StrictInt = Field(8, ge=1, description="blocks of training text used to score importance")
    bridge: Literal["none", "linear"] = Field(
        "none", description="linear: stand in for each run of dropped layers with a linear map fitted by least "
        "squares to the teacher's hidden states and folded into the kept layer before it (models/bridge.py)")
    bridge_blocks: StrictInt = Field(64, ge=1, description="blocks of training text the bridges are fitted on")
    bridge_ridge: float = Field(0.01, ge=0, description="shrinks each bridge toward the plain cut (the identity)")

    @model_validator(mode="after")
    def _one_way(self) -> "CutConfig":
        exactly_one(self, ("keep_layers", "every", "num_layers"))
        if self.keep_layers is not None and (not self.keep_layers or min(self.keep_layers) < 0):
            raise ValueError("keep_layers must be a non-empty list of layer indices >= 0")
        return self


class StudentConfig(Strict):
    from_teacher: CutConfig | None = None
    model: ModelSource | None = Field(None, description="an existing student: HF folder, GGUF or hub id")
    config: dict[str, Any] | None = Field(None, description="a fresh model: config overrides on the teacher's config")
    device: str = Field("auto", description="where the student trains and is evaluated; auto = where the teacher "
                        "computes (e.g. teacher.device: cpu with student.device: cuda puts the teacher on the CPU)")

    @model_validator(mode="after")
    def _one_way(self) -> "StudentConfig":
        exactly_one(self, ("from_teacher", "model", "config"))
        return self


# ---------------------------------------------------------------- data


class CorpusSource(Strict):
    kind: Literal["corpus"] = "corpus"
    name: Literal["austen", "gensim-lee", "gensim-wiki", "gensim-crime"]
    parts: list[str] | None = Field(None, description="e.g. Austen books: emma, persuasion, ...")


class FileSource(Strict):
    kind: Literal["text", "jsonl"]
    path: ExistingPath
    field: str | None = Field(None, description="JSONL: the text field (default: text, or prompt+response)")


class GeneratedSource(Strict):
    """The teacher's curated responses written by this run's ``generate`` stage (data/train.jsonl)."""

    kind: Literal["generated"]


class TeacherSamplesSource(Strict):
    """Data-free distillation: the teacher samples its own training text from BOS or seed prompts."""

    kind: Literal["teacher_samples"]
    num_samples: StrictInt = Field(64, ge=1)
    seed_prompts: list[str] = Field([], description="start texts; empty = start from BOS alone")
    max_new_tokens: StrictInt = Field(128, ge=1)
    temperature: Number = Field(1.0, gt=0, description="diversity: higher samples more varied text")
    top_p: Number = Field(0.95, gt=0, le=1)
    repetition_penalty: Number = Field(1.1, ge=1)
    batch_size: StrictInt = Field(16, ge=1)


# One source of text (what a mixture's components and evaluation slices are).
SingleSource = Annotated[Union[CorpusSource, FileSource, GeneratedSource, TeacherSamplesSource],
                         Field(discriminator="kind")]


def source_name(source) -> str:
    """A source's default name in a mixture: the corpus, the file's stem, or the kind."""
    if source.kind == "corpus":
        return source.name
    if source.kind in ("text", "jsonl"):
        return Path(source.path).stem
    return source.kind


class MixtureComponent(Strict):
    weight: Number = Field(..., gt=0, description="its share of every step's examples, relative to the others'")
    source: SingleSource
    name: str | None = Field(None, pattern=r"^[A-Za-z0-9_.-]+$", description="how the manifest and report name "
                             "it (default: the corpus name, the file's stem, or the kind)")

    @property
    def label(self) -> str:
        return self.name or source_name(self.source)


class MixtureSource(Strict):
    """Several sources, each step's examples drawn from them by weight (data/mixture.py): a pure function of
    the seed and the step, so a resumed run reads the same batches."""

    kind: Literal["mixture"]
    components: list[MixtureComponent] = Field(..., min_length=1)

    @model_validator(mode="after")
    def _unique(self) -> "MixtureSource":
        labels = [c.label for c in self.components]
        for i, label in enumerate(labels):
            if labels.index(label) != i:
                raise ValueError(f"components[{i}]: the name {label!r} is taken by components[{labels.index(label)}] "
                                 "(give each component a unique name:)")
        return self

    def shares(self) -> dict[str, float]:
        total = sum(c.weight for c in self.components)
        return {c.label: c.weight / total for c in self.components}


Source = Annotated[Union[CorpusSource, FileSource, GeneratedSource, TeacherSamplesSource, MixtureSource],
                   Field(discriminator="kind")]


def single_sources(source) -> list:
    """The single sources a data.source reads: its components for a mixture, else itself."""
    return [c.source for c in source.components] if source.kind == "mixture" else [source]


class DataConfig(Strict):
    source: Source
    format: Literal["blocks", "pairs"] = Field(
        "blocks", description="blocks: fixed-length windows of running text; pairs: one prompt+response "
        "example per record, loss on the response only (sequence-level / response-level KD)")
    block_size: StrictInt = Field(128, ge=8, description="blocks: window length; pairs: maximum example length")
    heldout_fraction: Number = Field(0.1, gt=0, lt=1)
    max_train_blocks: StrictInt | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _pairs_need_pairs(self) -> "DataConfig":
        if self.format == "pairs" and self.source.kind not in ("jsonl", "generated"):
            raise ValueError(f"format pairs needs a jsonl or generated source (got {self.source.kind})")
        return self


# ---------------------------------------------------------------- distillation


Divergence = Literal[
    "forward_kl", "reverse_kl", "skew_forward_kl", "skew_reverse_kl", "jsd", "jsd_unscaled", "tvd", "mse"
]


class KDLossConfig(Strict):
    divergence: Divergence = "forward_kl"
    weight: Number = Field(1.0, ge=0, description="alpha: the weight of the token-level KD term")
    temperature: Number = Field(1.0, gt=0)
    scale_t2: bool = Field(True, description="multiply by T^2 so gradients keep their size across T")
    beta: Number = Field(0.5, ge=0, le=1, description="generalized JSD interpolation")
    skew: Number = Field(0.1, ge=0, le=1, description="skew KL mixing weight")
    tail: Literal["renormalize", "bucket", "uniform"] = "bucket"
    chunk_size: StrictInt = Field(1024, ge=1, description="tokens per chunk of the vocabulary-sized math")
    fused_lm_head: bool = Field(
        True, description="when KD is the only logit loss, compute the student's logits chunk by chunk from its "
        "last hidden state, so its full [tokens, vocab] logits are never kept for backward (one process only)")


class HiddenLossConfig(Strict):
    """Hidden-state matching (losses/hidden.py); layers index ``output_hidden_states`` (0 = embeddings)."""

    weight: Number = Field(0.0, ge=0, description="0 turns hidden-state matching off")
    kind: Literal["mse", "cosine", "infonce"] = "mse"
    layer_map: list[tuple[int, int]] | Literal["even"] = Field(
        "even", description="explicit [student_layer, teacher_layer] pairs, or evenly spaced")
    num_pairs: StrictInt | None = Field(None, ge=1, description="with layer_map: even, how many pairs (default: all)")
    infonce_temperature: Number = Field(0.1, gt=0)


class AttentionLossConfig(Strict):
    """Attention-map KL (losses/attention.py); layers are 0-based decoder layers."""

    weight: Number = Field(0.0, ge=0, description="0 turns attention matching off")
    layer_map: list[tuple[int, int]] | Literal["even"] = "even"
    head_mode: Literal["average", "grouped"] = "average"


class BalanceConfig(Strict):
    mode: Literal["static", "magnitude"] = "static"
    reference: Literal["ce", "kd"] | None = Field(
        None, description="magnitude: the term others are rescaled to (default: ce if ce_weight > 0, else kd)")


class ScheduleConfig(Strict):
    """A ramp from ``start`` to ``end`` over ``steps`` steps after ``delay`` steps (a weight: >= 0)."""

    kind: Literal["constant", "linear", "cosine"] = "linear"
    start: Number = Field(..., ge=0)
    end: Number = Field(..., ge=0)
    steps: StrictInt = Field(0, ge=0)
    delay: StrictInt = Field(0, ge=0)


class UnitScheduleConfig(ScheduleConfig):
    """A ramp of a value in [0, 1] (the generalized JSD's beta)."""

    start: Number = Field(..., ge=0, le=1)
    end: Number = Field(..., ge=0, le=1)


class TemperatureScheduleConfig(ScheduleConfig):
    start: Number = Field(..., gt=0)
    end: Number = Field(..., gt=0)


class SchedulesConfig(Strict):
    alpha: ScheduleConfig | None = Field(None, description="overrides kd.weight per step")
    beta: UnitScheduleConfig | None = Field(None, description="overrides kd.beta per step")
    hidden_weight: ScheduleConfig | None = None
    attention_weight: ScheduleConfig | None = None
    temperature: TemperatureScheduleConfig | None = None
    representation_start_step: StrictInt = Field(0, ge=0, description="hidden/attention terms are off before this step")


class CrossLossConfig(Strict):
    """Losses for a teacher with another tokenizer (distill.cross_tokenizer; losses/cross_vocab.py)."""

    mode: Literal["hybrid", "uld"] = Field(
        "hybrid", description="hybrid: tokens in both vocabularies through kd (its divergence, weight kd.weight), "
        "the rest through ULD; uld: ULD over the whole distributions, no kd term")
    uld_weight: Number = Field(1.0, ge=0, description="weight of the ULD term (sorted-probability L1)")
    span_weight: Number = Field(0.0, ge=0, description="weight of the span-level KL on aligned spans")
    uld_k: StrictInt | None = Field(None, ge=1, description="the student's largest probabilities in ULD "
                                    "(default: as many as the teacher gives)")


class LossesConfig(Strict):
    ce_weight: Number = Field(0.0, ge=0, description="weight of the task cross-entropy on the data")
    kd: KDLossConfig = KDLossConfig()
    cross: CrossLossConfig = CrossLossConfig()
    hidden: HiddenLossConfig = HiddenLossConfig()
    attention: AttentionLossConfig = AttentionLossConfig()
    balance: BalanceConfig = BalanceConfig()
    schedules: SchedulesConfig = SchedulesConfig()


class NoiseConfig(Strict):
    """Compression-aware distillation: perturb the student so it learns to survive low precision."""

    logits_std: Number = Field(0.0, ge=0, description="Gaussian noise added to the student's logits")
    hidden_std: Number = Field(0.0, ge=0, description="relative Gaussian noise on each decoder layer's output")


class QATConfig(Strict):
    """Quantization-aware distillation through torchao's QAT prepare/convert."""

    scheme: Literal["int8_dynamic_act_int4_weight", "int4_weight_only"] = "int8_dynamic_act_int4_weight"
    group_size: StrictInt = Field(32, ge=8)


def env_key(name: str | None, field: str = "api_key_env") -> str | None:
    """The API key held by the environment variable ``name`` (None when no variable is named); a named
    variable that is not set is an error, not an anonymous call."""
    if not name:
        return None
    key = os.environ.get(name)
    if not key:
        raise RecipeError(f"{field}: ${name} is not set (unset {field} for no key)")
    return key


class EndpointConfig(Strict):
    """An OpenAI-compatible server (vLLM, llama.cpp's server, another Distillery): where it is, which served
    model, and the environment variable that holds its API key."""

    base_url: str = Field(..., description="e.g. http://127.0.0.1:8000")
    model: str = Field(..., description="the served model name")
    api_key_env: str | None = Field(None, description="environment variable holding the API key")
    timeout_s: Number = Field(120.0, gt=0)

    def api_key(self) -> str | None:
        return env_key(self.api_key_env)


class SamplingServerConfig(EndpointConfig):
    """An OpenAI-compatible server that serves the student (e.g. ``vllm serve``) and samples for it.
    After the student is written to ``on_policy.sync_dir`` (the folder the server was started from),
    ``reload_body`` is POSTed to ``reload_path``, then the server's prefix cache is reset."""

    reload_path: str = Field("/collective_rpc", description="vLLM's, with VLLM_SERVER_DEV_MODE=1")
    reload_body: dict[str, Any] = Field({"method": "reload_weights"}, description="vLLM: reload from disk")
    reset_cache_path: str | None = Field(
        "/reset_prefix_cache", description="POSTed after each reload, so no KV cache computed with the old "
        "weights is reused (vLLM, dev mode); null for a server without a prefix cache")
    timeout_s: Number = Field(300.0, gt=0)


class OnPolicyConfig(Strict):
    """GKD: with probability ``lam`` a batch is replaced by the student's own sampled completions of
    its prompts (the first ``prompt_tokens`` of each example), scored by the teacher."""

    lam: Number = Field(0.5, ge=0, le=1)
    prompt_tokens: StrictInt = Field(32, ge=1)
    max_new_tokens: StrictInt = Field(64, ge=1)
    temperature: Number = Field(1.0, gt=0)
    top_p: Number = Field(1.0, gt=0, le=1)
    generator: Literal["transformers", "server", "vllm"] = Field(
        "transformers", description="transformers: the student's generate in this process; server: an "
        "OpenAI-compatible server serving the student (vllm serve); vllm: vLLM's engine in this process. "
        "Server and vllm sample from a copy of the student, synced before they sample")
    sync_dir: RecipePath | None = Field(None, description="server, vllm: the folder the student is written to for "
                                  "them (a server must be started from it); default <run>/policy")
    sync_every: StrictInt = Field(1, ge=1, description="re-sync once the copy is this many optimiser steps old")
    server: SamplingServerConfig | None = None
    vllm_gpu_memory: Number = Field(0.3, gt=0, lt=1, description="vllm: the share of GPU memory vLLM's engine "
                                   "takes (weights and KV cache); training keeps the rest")
    kv_cache: Literal["auto", "dynamic", "static"] = Field(
        "auto", description="transformers generator: a static KV cache is compiled by transformers on a GPU, much faster than a "
        "dynamic one there (README, benchmarks/cuda_paths.py); auto = static on CUDA")

    @model_validator(mode="after")
    def _server_named(self):
        if self.generator == "server" and self.server is None:
            raise ValueError("generator 'server' needs a server block (base_url, model)")
        return self


class CaptureConfig(Strict):
    """The logit store: the teacher's top-k log-probs over the training data, captured once."""

    k: StrictInt = Field(64, ge=1, description="top-k ids kept exactly (encodings topk and topk_sampled; "
                         "sampled keeps none)")
    temperature: Number = Field(1.0, gt=0, description="must equal distill.losses.kd.temperature to be used")
    shard_tokens: StrictInt = Field(1 << 20, ge=1)
    batch_size: StrictInt = Field(8, ge=1)
    encoding: Literal["topk", "sampled", "topk_sampled"] = Field(
        "topk", description="topk: the top k log-probs and a tail mass (any divergence, biased by the cut); "
        "sampled: `draws` tokens drawn from the teacher with their counts (RS-KD, unbiased forward KL only); "
        "topk_sampled: the exact top k plus `draws` tokens drawn from the rest (forward KL only); docs/logit-store.md")
    draws: StrictInt = Field(32, ge=1, le=255, description="tokens drawn per position (sampled encodings)")
    seed: StrictInt = Field(0, ge=0, description="the draws' seed (with the example index: reproducible)")

    @property
    def stored_k(self) -> int:
        """The k the store records: 0 for the sampled encoding, which keeps no top k."""
        return 0 if self.encoding == "sampled" else self.k


class EnsembleConfig(Strict):
    """Multi-teacher: the main teacher plus ``members``, mixed in probability space."""

    members: list[TeacherConfig] = Field(..., min_length=1)
    weights: list[float] | None = Field(None, description="one per teacher, main teacher first")
    route_by: str | None = Field(None, description="a data field whose value picks the teacher")
    routes: dict[str, int] | None = None
    top_k: StrictInt | None = Field(
        None, ge=1, description="every teacher gives its top-k (mixed over the union of ids); a member with "
        "another tokenizer than the main teacher needs it, and defaults it to 64")


class ServedConfig(EndpointConfig):
    """A teacher behind an OpenAI-compatible server that returns prompt log-probs (e.g. vLLM)."""

    top_k: StrictInt = Field(20, ge=1)


class CrossTeacherConfig(Strict):
    """A teacher with another tokenizer (signals/cross.py): it replaces ``teacher`` as the distillation signal,
    while ``teacher`` still gives the student its tokenizer (and its layers, with from_teacher)."""

    teacher: TeacherConfig
    top_k: StrictInt = Field(64, ge=1, description="the teacher's largest probabilities over shared tokens")
    unmatched_k: StrictInt = Field(64, ge=0, description="... and over tokens the student does not have (ULD)")
    special_map: dict[str, str | None] | None = Field(
        None, description="student special token -> the teacher's (null drops it); BOS/EOS and ChatML's turn "
        "markers are paired by default")


class DistillConfig(Strict):
    steps: StrictInt = Field(100, ge=1, description="optimiser steps (a student that should not train: leave the "
                             "distill stage out by evaluating student_init)")
    batch_size: StrictInt = Field(4, ge=1)
    grad_accum: StrictInt = Field(1, ge=1)
    lr: Number = Field(1e-4, gt=0)
    weight_decay: Number = Field(0.0, ge=0)
    warmup_steps: StrictInt = Field(10, ge=0)
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    min_lr_ratio: Number = Field(0.1, ge=0, le=1)
    clip_grad: Number | None = Field(1.0, gt=0)
    eval_every: StrictInt = Field(50, ge=1)
    eval_blocks: StrictInt = Field(16, ge=1)
    checkpoint_every: StrictInt = Field(25, ge=1)
    keep_checkpoints: StrictInt = Field(2, ge=1)
    optimizer: Literal["adamw", "sgd", "adafactor"] = "adamw"
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="autocast for the student's forward; auto = bf16 on CUDA with bf16, else fp32")
    gradient_checkpointing: bool = False
    tensorboard: bool = Field(False, description="also log every record to <run>/tensorboard (needs tensorboard)")
    fsdp: bool = Field(False, description="under torchrun: shard the student with FSDP2 (fully_shard per "
                       "decoder layer) instead of replicating it with DDP")
    shard_teacher: bool = Field(True, description="with fsdp: shard a live teacher too, so neither model has to "
                                "fit one device whole; false keeps a full teacher on every rank (no all-gathers)")
    on_nonfinite: Literal["stop", "skip"] = Field(
        "stop", description="a step whose loss or gradient is NaN/inf: stop with an error naming the step and "
        "the loss terms (nothing from it is saved), or skip its update and go on")
    early_stopping_patience: StrictInt | None = Field(
        None, ge=1, description="stop after this many evals without a lower held-out KL to the teacher")
    noise: NoiseConfig | None = None
    qat: QATConfig | None = None
    teacher_source: Literal["online", "store", "served"] = Field(
        "online", description="online: run the teacher every step; store: read the capture stage's logit store; "
        "served: ask an OpenAI-compatible server with prompt logprobs (vLLM) for the teacher's top-k")
    served: ServedConfig | None = None
    generations: StrictInt = Field(1, ge=1, description="born-again: each generation's student teaches the next")
    on_policy: OnPolicyConfig | None = None
    cross_tokenizer: CrossTeacherConfig | None = Field(
        None, description="distil from a teacher with another tokenizer (teacher_source: online)")
    losses: LossesConfig = LossesConfig()

    @model_validator(mode="after")
    def _cross_is_live(self) -> "DistillConfig":
        if self.cross_tokenizer is not None and self.teacher_source != "online":
            raise ValueError(f"cross_tokenizer: a teacher with another tokenizer runs live (teacher_source: online), "
                             f"not {self.teacher_source}")
        return self

    @model_validator(mode="after")
    def _warmup_within_steps(self) -> "DistillConfig":
        if self.warmup_steps > self.steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) is more than steps ({self.steps}): the learning "
                             "rate would never reach distill.lr")
        return self


# ---------------------------------------------------------------- evaluation and report


# ---------------------------------------------------------------- compression


Ratio = Annotated[Number, Field(ge=0, lt=1)]


class PruneStep(Strict):
    """Remove fractions of layers, MLP channels, query heads and hidden channels (compress/prune.py), ranked by
    activation importance on calibration blocks; or prune to ``target`` parameters (a count, or a fraction of
    the model) by solving for the share removed from ``axes``."""

    layers: Ratio = 0.0
    mlp_channels: Ratio = 0.0
    heads: Ratio = 0.0
    hidden: Ratio = 0.0
    target: Number | None = Field(None, gt=0, description="parameters after pruning: a count, or a fraction < 1")
    axes: list[Literal["layers", "mlp_channels", "heads", "hidden"]] = ["mlp_channels", "hidden"]
    head_mode: Literal["groups", "queries"] = Field(
        "groups", description="remove whole key/value groups, or the same number of query heads from each group")
    depth_method: Literal["influence", "skip_loss"] = "influence"
    calibration_blocks: StrictInt = Field(16, ge=1)

    @model_validator(mode="after")
    def _something(self) -> "PruneStep":
        if self.target is None and not any((self.layers, self.mlp_channels, self.heads, self.hidden)):
            raise ValueError("give a target or a fraction of at least one of layers, mlp_channels, heads, hidden")
        return self


class LowRankStep(Strict):
    """Replace linears (name globs, e.g. ``*.mlp.*``) by two thinner ones from a truncated SVD (compress/lowrank.py)."""

    layers: list[str] = Field(["*.mlp.*"], min_length=1)
    rank: StrictInt | None = Field(None, ge=1)
    energy: Number | None = Field(None, gt=0, le=1)
    param_ratio: Number | None = Field(None, gt=0, lt=1, description="keep this share of each layer's parameters")
    method: Literal["svd", "asvd"] = Field("asvd", description="asvd: whitened by the inputs' statistics (SVD-LLM)")
    calibration_blocks: StrictInt = Field(16, ge=1)

    @model_validator(mode="after")
    def _one_size(self) -> "LowRankStep":
        exactly_one(self, ("rank", "energy", "param_ratio"))
        return self


class RedistillStep(Strict):
    """Recover quality with the teacher in the loop: the distill loop, losses and teacher signal, for more steps
    (optionally under fake quantization, converted to the real low-bit model by a following quantize step)."""

    steps: StrictInt = Field(50, ge=1)
    lr: Number | None = Field(None, gt=0, description="default: distill.lr")
    warmup_steps: StrictInt = Field(0, ge=0)
    qat: QATConfig | None = None


class QuantizeStep(Strict):
    """Post-training quantization (compress/quantize.py); after a ``redistill`` with ``qat`` it converts the
    fake-quantized model instead."""

    scheme: Literal["int8_dynamic", "int8_weight_only", "int4_weight_only", "int8_dynamic_act_int4_weight"] = \
        "int8_dynamic"
    backend: Literal["torchao", "torch_dynamic", "auto"] = Field(
        "auto", description="auto: the faster of torchao and torch's quantize_dynamic, measured on this machine")
    group_size: StrictInt = Field(32, ge=8)
    quantize_embeddings: bool = Field(False, description="also quantize the embeddings and lm_head")
    keep_float: list[str] | None = Field(
        None, description="linear layers left float, by name fragment; default: [down_proj] for int8_dynamic "
        "(its outlier-heavy input loses most to int8 activations), none otherwise; [] quantizes every one")


class CompressStep(Strict):
    """One step of a chain: exactly one of prune, lowrank, redistill, quantize."""

    prune: PruneStep | None = None
    lowrank: LowRankStep | None = None
    redistill: RedistillStep | None = None
    quantize: QuantizeStep | None = None

    @model_validator(mode="after")
    def _one(self) -> "CompressStep":
        exactly_one(self, self.KINDS)
        return self

    KINDS: ClassVar[tuple[str, ...]] = ("prune", "lowrank", "redistill", "quantize")

    @property
    def kind(self) -> str:
        return exactly_one(self, self.KINDS)


class CompressVariant(Strict):
    name: str = Field(..., pattern=r"^[A-Za-z][A-Za-z0-9_]*(-[A-Za-z0-9_]+)*$",
                      description="the variant's folder under compressed/ and its name in evaluation and gates")
    from_: str = Field("student", alias="from", description="student, or another variant by name")
    steps: list[CompressStep] = Field(..., min_length=1)

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    @model_validator(mode="after")
    def _quantize_last(self) -> "CompressVariant":
        kinds = [s.kind for s in self.steps]
        if "quantize" in kinds and kinds.index("quantize") != len(kinds) - 1:
            raise ValueError("quantize must be the last step (a quantized model is not pruned or trained further)")
        return self


# ---------------------------------------------------------------- evaluation, gate and report


BASE_VARIANTS = ("teacher", "student_init", "student")


class TaskConfig(Strict):
    """A task built from real data the package fetches (evaluate/task_builders.py), scored on every variant."""

    name: Literal["sentiment", "analogies", "arithmetic"]
    limit: StrictInt | None = Field(None, ge=1, description="examples (sentiment: of 200; others: how many to build)")
    seed: StrictInt = 0
    batch_size: StrictInt = Field(8, ge=1)


class SpeedConfig(Strict):
    """Operational metrics (evaluate/speed.py): latency percentiles, tokens/s, memory, size, cold start."""

    requests: StrictInt = Field(20, ge=1, description="timed requests per setting, after warm-up")
    new_tokens: StrictInt = Field(32, ge=1)
    concurrency: list[StrictInt] = Field([1, 4, 8], min_length=1, description="requests arriving together, "
                                         "served as one batched generate call")
    sampling: bool = Field(False, description="also time sampled decoding (greedy always)")
    cold_start: bool = Field(True, description="time loading each variant's folder to its first token, in a "
                             "fresh process")


class SamplingConfig(Strict):
    temperature: Number = Field(0.7, gt=0)
    top_p: Number = Field(0.95, gt=0, le=1)
    top_k: StrictInt = Field(0, ge=0, description="0 = no top-k cut")


class SequenceConfig(Strict):
    """Sequence-level divergence (evaluate/sequence.py): the teacher and each variant continue the same
    held-out prompts, greedily and sampled; ROUGE-L and exact match between their continuations."""

    prompts: StrictInt = Field(16, ge=1, description="held-out blocks whose first tokens are the prompts")
    prompt_tokens: StrictInt = Field(16, ge=1)
    new_tokens: StrictInt = Field(32, ge=1)
    sampling: SamplingConfig | None = Field(
        None, description="default: the recipe's intended sampling: the first sampled generate.decoding, "
        "else distill.on_policy's temperature and top_p, else temperature 0.7, top_p 0.95")
    seed: StrictInt = 0
    batch_size: StrictInt = Field(8, ge=1)


class RobustnessConfig(Strict):
    """A perturbation slice made from held-out blocks (and task rows, when there are tasks), every metric
    measured on it and on the same rows unperturbed (evaluate/robustness.py)."""

    # the kinds of evaluate/robustness.py (KINDS); paraphrase asks the teacher to rewrite each text
    kinds: list[Literal["lowercase", "uppercase", "whitespace", "typos", "paraphrase"]] = Field(
        ["lowercase", "whitespace", "typos"], min_length=1)
    blocks: StrictInt = Field(16, ge=1, description="held-out blocks perturbed (tasks: every row)")
    typo_rate: Number = Field(0.1, gt=0, le=1)
    seed: StrictInt = 0


class ReviewConfig(Strict):
    """Human review (evaluate/review.py): paired greedy continuations of held-out prompts by two variants,
    exported to eval/review/ for rating; a filled file imported as ``human_win_rate``."""

    prompts: StrictInt = Field(16, ge=1)
    prompt_tokens: StrictInt = Field(16, ge=1)
    new_tokens: StrictInt = Field(48, ge=1)
    variant: str | None = Field(None, description="the variant rated (default: the gated one)")
    against: str = "teacher"
    ratings: ExistingPath | None = Field(None, description="a filled eval/review/review.csv or .jsonl: imported "
                                         "as the variant's human_win_rate")
    seed: StrictInt = 0


class EvaluateConfig(Strict):
    eval_blocks: StrictInt = Field(32, ge=1, description="held-out blocks scored per model variant")
    batch_size: StrictInt = Field(8, ge=1)
    slices: dict[str, SingleSource] = Field(
        {}, description="more text to score every variant on, by name (e.g. another domain); -> eval/slices.json")
    variants: list[str] | None = Field(
        None, description="what to score: teacher, student_init, student and compress variants by name "
        "(default: all of them)")
    calibration: bool = Field(True, description="next-token ECE/MCE (15 bins) on the held-out blocks")
    tasks: list[TaskConfig] = Field([], description="task accuracy with paired per-example results")
    speed: SpeedConfig | None = Field(None, description="latency and memory of every variant (opt-in: minutes)")
    lmeval: bool = Field(False, description="also run lm-evaluation-harness on the multiple-choice tasks")
    sequence: SequenceConfig | None = Field(None, description="ROUGE-L and exact match between the teacher's "
                                            "and each variant's generations, greedy and sampled (opt-in)")
    robustness: RobustnessConfig | None = Field(None, description="a perturbation slice and each metric's change "
                                                "under it (opt-in)")
    review: ReviewConfig | None = Field(None, description="export paired samples for human rating; import "
                                        "ratings (opt-in)")


class GateConfig(Strict):
    """Release rules (gate.py grammar), e.g. ``kl_to_teacher <= 0.8``, ``accuracy >= 0.95 * teacher.accuracy``,
    ``accuracy not worse than student_init (paired, p < 0.05)``."""

    rules: list[str] = Field([], description="each must hold for the gated variant")
    variant: str | None = Field(None, description="the variant judged (default: the last compress variant, "
                                "else student)")


class ReportConfig(Strict):
    enabled: bool = True
    title: str | None = None


# ---------------------------------------------------------------- teacher data (generate stage)


class PromptSourceConfig(Strict):
    """Where prompts come from: a file, a dataset saved with ``datasets.save_to_disk``, or built-in
    checkable tasks (arithmetic, copy/format) that carry their answers."""

    kind: Literal["tasks", "text", "jsonl", "csv", "parquet", "hf_disk"] = "tasks"
    path: ExistingPath | None = None
    field: str = Field("prompt", description="column/field holding the prompt (text files: one prompt a line)")
    answer_field: str | None = Field(None, description="column holding a checkable answer, if any")
    id_field: str | None = None
    tasks: list[Literal["arithmetic", "copy", "format"]] = ["arithmetic", "copy"]
    limit: StrictInt | None = Field(None, ge=1, description="tasks: how many to build; files: read at most this many")

    @model_validator(mode="after")
    def _path_needed(self) -> "PromptSourceConfig":
        if self.kind != "tasks":
            if self.path is None:
                raise ValueError(f"kind {self.kind} needs a path")
        return self


class DecodingConfig(Strict):
    name: str = Field(..., pattern=r"^[A-Za-z0-9_.-]+$")
    do_sample: bool = False
    temperature: Number = Field(1.0, gt=0)
    top_p: Number = Field(1.0, gt=0, le=1)
    top_k: StrictInt = Field(0, ge=0, description="0 = no top-k cut")
    n: StrictInt = Field(1, ge=1, description="samples per prompt")
    max_new_tokens: StrictInt = Field(64, ge=1)
    share: Number | None = Field(None, gt=0, le=1, description="fraction of prompts; null = all prompts")

    @model_validator(mode="after")
    def _greedy_once(self) -> "DecodingConfig":
        if not self.do_sample and self.n > 1:
            raise ValueError("greedy decoding gives one answer: n > 1 needs do_sample: true")
        return self


class BackendConfig(EndpointConfig):
    """Where teacher generations come from; the endpoint fields apply to ``kind: openai``."""

    kind: Literal["transformers", "openai", "vllm"] = "transformers"
    batch_size: StrictInt = Field(16, ge=1)
    base_url: str | None = Field(None, description="openai: e.g. http://127.0.0.1:8000/v1")
    model: str | None = Field(None, description="openai/vllm: the served model name")

    @model_validator(mode="after")
    def _url(self) -> "BackendConfig":
        if self.kind == "openai" and not self.base_url:
            raise ValueError("backend openai needs base_url")
        return self


class VerifierConfig(Strict):
    name: str
    kind: Literal["regex", "python", "json_schema", "answer"]
    pattern: str | None = Field(None, description="regex: must match somewhere in the response")
    function: str | None = Field(None, description="python: module:function(record) -> bool")
    schema_: dict[str, Any] | None = Field(None, alias="schema", description="json_schema: inline schema")
    schema_path: ExistingPath | None = None
    required: bool = Field(True, description="reject the record when this verifier fails")

    @model_validator(mode="after")
    def _args(self) -> "VerifierConfig":
        need = {"regex": "pattern", "python": "function"}.get(self.kind)
        if need and getattr(self, need) is None:
            raise ValueError(f"verifier {self.name}: kind {self.kind} needs {need}")
        if self.kind == "json_schema" and self.schema_ is None and self.schema_path is None:
            raise ValueError(f"verifier {self.name}: json_schema needs schema or schema_path")
        return self


class ScoreFilterConfig(Strict):
    score: Literal["mean_entropy", "mean_gap", "min_gap", "mean_logprob", "agreement"]
    min: Number | None = None
    max: Number | None = None
    quantile_min: Number | None = Field(None, ge=0, le=1, description="drop the lowest fraction")
    quantile_max: Number | None = Field(None, ge=0, le=1, description="drop above this quantile")


class PIIConfig(Strict):
    enabled: bool = True
    kinds: list[Literal["email", "phone", "card", "ip", "iban", "national_id"]] = [
        "email", "phone", "card", "ip", "iban", "national_id"]


class CurateConfig(Strict):
    verifiers: list[VerifierConfig] = []
    filters: list[ScoreFilterConfig] = []
    min_chars: StrictInt = Field(1, ge=0)
    max_chars: StrictInt | None = Field(None, ge=1)
    max_repetition: Number = Field(0.5, gt=0, le=1, description="max fraction of repeated word 3-grams")
    exact_dedup: bool = True
    near_dup_threshold: Number | None = Field(0.9, gt=0, le=1, description="MinHash Jaccard; null = off")
    pii: PIIConfig = PIIConfig()
    seed_fraction: Number = Field(0.2, ge=0, le=1, description="highest-confidence share staged as `seed`")
    review_fraction: Number = Field(0.05, ge=0, le=1, description="lowest-confidence share exported for review")
    review_file: ExistingPath | None = Field(None, description="a reviewed file to import (verdicts override)")
    valid_fraction: Number = Field(0.1, ge=0, lt=1)


class GenerateConfig(Strict):
    prompts: PromptSourceConfig = PromptSourceConfig()
    template: str | None = Field(None, description="format string with {prompt}; applied before the chat template")
    chat_template: bool = Field(True, description="wrap in the tokenizer's chat template when it has one")
    system: str | None = Field(None, description="chat system message (default: the template's own)")
    decoding: list[DecodingConfig] = [DecodingConfig(name="greedy")]
    backend: BackendConfig = BackendConfig()
    teachers: list[TeacherConfig] = Field([], description="teachers compare: candidates (the first is the reference)")
    compare_prompts: StrictInt = Field(32, ge=1)
    cache_dir: RecipePath | None = Field(None, description="default: <run>/data/cache")
    curate: CurateConfig = CurateConfig()

    @model_validator(mode="after")
    def _shares(self) -> "GenerateConfig":
        names = [d.name for d in self.decoding]
        if len(set(names)) != len(names):
            raise ValueError(f"decoding names must be unique (got {names})")
        total = sum(d.share for d in self.decoding if d.share is not None)
        if total > 1 + 1e-9:
            raise ValueError(f"decoding shares sum to {total:.3g}, more than 1")
        return self


# ---------------------------------------------------------------- serving


SCORES = ("mean_prob", "geo_mean_prob", "min_prob", "mean_margin", "min_margin", "neg_entropy")


class BatchingConfig(Strict):
    max_batch_size: StrictInt = Field(8, ge=1, description="sequences generated together in one batch")
    max_wait_ms: Number = Field(10.0, ge=0, description="how long the oldest waiting request waits for company")
    max_queue: StrictInt = Field(64, ge=1, description="sequences waiting beyond which requests get 429")


class LimitsConfig(Strict):
    max_tokens: StrictInt = Field(1024, ge=1, description="largest max_tokens a request may ask for")
    default_max_tokens: StrictInt = Field(16, ge=1, description="max_tokens of a request that names none")
    max_prompt_tokens: StrictInt | None = Field(None, ge=1, description="default: the model's context length")
    max_n: StrictInt = Field(8, ge=1)
    max_logprobs: StrictInt = Field(100, ge=0, description="largest logprobs / top_logprobs / prompt_logprobs")
    max_body_bytes: StrictInt = Field(4 * 2**20, ge=1024, description="larger request bodies get 413")


class DriftConfig(Strict):
    window: StrictInt = Field(500, ge=10, description="recent router queries compared with the calibration set")
    min_samples: StrictInt = Field(50, ge=10)
    bins: StrictInt = Field(10, ge=2)
    psi_warning: Number = Field(0.2, gt=0, description="PSI above which a warning is logged (0.2: a real shift)")


class RouteCalibrationConfig(Strict):
    """``distillery route calibrate``: the student's answers to held-out prompts, scored against the
    teacher's, set the threshold that reaches ``target`` of the teacher's quality with the fewest teacher calls."""

    prompts: PromptSourceConfig = PromptSourceConfig(tasks=["arithmetic", "copy", "format"], limit=64)
    target: Number = Field(0.95, gt=0, le=1)
    metric: Literal["rouge_l", "exact_match", "token_f1"] = "rouge_l"
    max_tokens: StrictInt = Field(32, ge=1)
    chat: bool = Field(True, description="wrap prompts in the chat template")


class ServeSection(Strict):
    """``distillery serve``: the gated variant (or ``--variant``) as the student, the recipe's teacher behind
    the confidence router, OpenAI-compatible endpoints (serve/)."""

    host: str = "127.0.0.1"
    port: StrictInt = Field(8000, ge=0, le=65535)
    api_key_env: str | None = Field(None, description="when set, every endpoint but /health needs this key")
    batching: BatchingConfig = BatchingConfig()
    limits: LimitsConfig = LimitsConfig()
    router: bool = Field(True, description="serve the confidence cascade (student, then teacher) as `router`")
    score: Literal[SCORES] = "geo_mean_prob"
    threshold: Number | None = Field(None, ge=0, description="default: the calibrated one (<run>/router.json)")
    calibrate: RouteCalibrationConfig = RouteCalibrationConfig()
    drift: DriftConfig = DriftConfig()


class Recipe(Strict):
    name: str = Field(..., pattern=r"^[A-Za-z0-9_.-]+$", description="the run folder's name under run_dir: one "
                      "path component (letters, digits, _ . -), never . or ..")
    seed: StrictInt = 0
    run_dir: RecipePath = Field(Path("runs"), description="where run folders go; the default is runs/ in the "
                                "current directory, a path written in the recipe is relative to the recipe's folder")
    cache_dir: RecipePath | None = Field(None, description="default: $DISTILLERY_CACHE or ~/.cache/distillery")
    teacher: TeacherConfig = TeacherConfig()
    student: StudentConfig
    data: DataConfig
    capture: CaptureConfig | None = None
    ensemble: EnsembleConfig | None = None
    distill: DistillConfig = DistillConfig()
    compress: list[CompressVariant] = []
    evaluate: EvaluateConfig = EvaluateConfig()
    gate: GateConfig = GateConfig()
    report: ReportConfig = ReportConfig()
    serve: ServeSection = ServeSection()
    generate: GenerateConfig | None = None

    @field_validator("name")
    @classmethod
    def _one_component(cls, v: str) -> str:
        if set(v) == {"."}:
            raise ValueError(f"{v!r} is not a folder of its own (the run folder would be run_dir itself or "
                             "its parent); pick a name")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> "Recipe":
        d = self.distill
        self._check_representations()
        self._check_compress()
        if d.teacher_source == "store":
            if self.capture is None:
                raise ValueError("distill.teacher_source: store needs a capture section (k, temperature)")
            if self.capture.encoding != "topk" and d.losses.kd.divergence != "forward_kl":
                raise ValueError(f"capture.encoding {self.capture.encoding!r} stores sampled tokens, which estimate "
                                 f"the forward KL only; distill.losses.kd.divergence is {d.losses.kd.divergence!r} "
                                 "(use forward_kl, or capture.encoding: topk)")
            if abs(self.capture.temperature - d.losses.kd.temperature) > 1e-9:
                raise ValueError(f"capture.temperature ({self.capture.temperature}) differs from "
                                 f"distill.losses.kd.temperature ({d.losses.kd.temperature})")
            if self.data.format != "blocks":
                raise ValueError("distill.teacher_source: store works with data.format: blocks")
            if d.on_policy is not None and d.on_policy.lam > 0:
                raise ValueError("distill.on_policy: the student's samples are new text the logit store has no "
                                 "entries for; use teacher_source online or served")
        if d.teacher_source == "served" and d.served is None:
            raise ValueError("distill.teacher_source: served needs distill.served (base_url, model)")
        if self.ensemble is not None and self.distill.cross_tokenizer is not None:
            raise ValueError("distill.cross_tokenizer: not with an ensemble; put the teacher with another tokenizer "
                             "among ensemble.members instead")
        if self.ensemble is not None and self.ensemble.weights is not None \
                and len(self.ensemble.weights) != 1 + len(self.ensemble.members):
            raise ValueError(f"ensemble.weights: {len(self.ensemble.weights)} weights for "
                             f"{1 + len(self.ensemble.members)} teachers (the main teacher comes first)")
        if any(s.kind == "generated" for s in single_sources(self.data.source)) and self.generate is None:
            raise ValueError("data.source: kind generated needs a generate section")
        return self

    def variant_names(self) -> list[str]:
        """Every model a run makes or reads, in order: teacher, student_init, student, compress variants."""
        return [*BASE_VARIANTS, *(v.name for v in self.compress)]

    def evaluated(self) -> list[str]:
        return self.evaluate.variants if self.evaluate.variants is not None else self.variant_names()

    def gated(self) -> str:
        return self.gate.variant or (self.compress[-1].name if self.compress else "student")

    def intended_sampling(self) -> tuple[dict, str]:
        """The sampling a served variant is meant to use, and where it came from: evaluate.sequence.sampling,
        else the first sampled generate.decoding, else distill.on_policy, else the default."""
        seq = self.evaluate.sequence
        if seq is not None and seq.sampling is not None:
            return seq.sampling.model_dump(), "evaluate.sequence.sampling"
        for i, d in enumerate(self.generate.decoding if self.generate is not None else []):
            if d.do_sample:
                return ({"temperature": d.temperature, "top_p": d.top_p, "top_k": d.top_k},
                        f"generate.decoding[{i}] ({d.name})")
        op = self.distill.on_policy
        if op is not None and op.lam > 0:
            return {"temperature": op.temperature, "top_p": op.top_p, "top_k": 0}, "distill.on_policy"
        return SamplingConfig().model_dump(), "default"

    def _check_compress(self) -> None:
        names = [v.name for v in self.compress]
        for i, v in enumerate(self.compress):
            if v.name in BASE_VARIANTS or names.count(v.name) > 1:
                raise ValueError(f"compress[{i}].name: {v.name!r} is taken (names must be unique and not "
                                 f"{', '.join(BASE_VARIANTS)})")
            if v.from_ != "student" and v.from_ not in names:
                raise ValueError(f"compress[{i}].from: {v.from_!r} names no variant (student or one of {names})")
        parents = {v.name: v.from_ for v in self.compress}
        for i, v in enumerate(self.compress):
            seen, node = {v.name}, v.from_
            while node in parents:
                if node in seen:
                    raise ValueError(f"compress[{i}].from: {v.name!r} comes from itself through {node!r} (a cycle)")
                seen.add(node)
                node = parents[node]
        if self.evaluate.variants is not None:
            unknown = [n for n in self.evaluate.variants if n not in self.variant_names()]
            if unknown:
                raise ValueError(f"evaluate.variants: {unknown} are not variants of this recipe "
                                 f"({', '.join(self.variant_names())})")
        review = self.evaluate.review
        if review is not None:
            for field, name in (("variant", review.variant or self.gated()), ("against", review.against)):
                if name not in self.evaluated():
                    raise ValueError(f"evaluate.review.{field}: {name!r} is not evaluated "
                                     f"({', '.join(self.evaluated())})")
            if (review.variant or self.gated()) == review.against:
                raise ValueError(f"evaluate.review: the rated variant and 'against' are both {review.against!r}")
        if self.gate.variant is not None and self.gate.variant not in self.evaluated():
            raise ValueError(f"gate.variant: {self.gate.variant!r} is not evaluated ({', '.join(self.evaluated())})")

    def _check_representations(self) -> None:
        """Hidden-state and attention matching read the teacher's insides: a single live teacher, and layer
        maps within the student's depth where the recipe fixes it (the teacher's is checked once loaded)."""
        L, d = self.distill.losses, self.distill
        hidden = L.hidden.weight > 0 or L.schedules.hidden_weight is not None
        attention = L.attention.weight > 0 or L.schedules.attention_weight is not None
        if not (hidden or attention):
            return
        what = "distill.losses." + ("hidden" if hidden else "attention")
        if d.teacher_source != "online":
            raise ValueError(f"{what}: representation matching needs a live teacher (teacher_source: online), "
                             f"not {d.teacher_source} logits")
        if self.ensemble is not None:
            raise ValueError(f"{what}: representation matching needs one teacher, not an ensemble")
        if d.cross_tokenizer is not None:
            raise ValueError(f"{what}: representation matching needs the teacher's positions to be the student's; "
                             "a cross_tokenizer teacher's are not")
        cut = self.student.from_teacher
        depth = (len(set(cut.keep_layers)) if cut.keep_layers is not None else cut.num_layers) if cut else None
        if depth is None:
            return
        for name, cfg, top in (("hidden", L.hidden, depth), ("attention", L.attention, depth - 1)):
            if (name == "hidden" and not hidden) or (name == "attention" and not attention) or cfg.layer_map == "even":
                continue
            for i, (s, _) in enumerate(cfg.layer_map):
                if not 0 <= s <= top:
                    raise ValueError(f"distill.losses.{name}.layer_map[{i}]: student layer {s} outside 0..{top} "
                                     f"(the student has {depth} layers)")

    @property
    def run_path(self) -> Path:
        return self.run_dir / self.name


def _format_errors(e: ValidationError, source: str) -> str:
    lines = []
    for err in e.errors():
        loc = ".".join(str(p) for p in err["loc"] if not (isinstance(p, str) and p in _TAGS)) or "(recipe)"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key (check its spelling)"
        lines.append(f"{source}: {loc}: {msg}")
    return "\n".join(lines)


# The discriminated-union tags pydantic puts in error paths: every ``kind`` a Source can have.
_TAGS = {tag for model in get_args(get_args(Source)[0]) for tag in get_args(model.model_fields["kind"].annotation)}


def parse_recipe(data: dict[str, Any], source: str = "recipe", base: str | Path | None = None) -> Recipe:
    """Validate a recipe; relative paths in it are taken from ``base`` (the recipe file's folder), or from
    the current directory when None."""
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: the recipe must be a YAML mapping, got {type(data).__name__}")
    try:
        return Recipe.model_validate(data, context={"base": base})
    except ValidationError as e:
        raise RecipeError(_format_errors(e, source)) from None


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Load a YAML recipe; ``overrides`` are ``dotted.key=value`` strings (values parsed as YAML)."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"{path}: recipe file not found")
    try:
        data = yaml.safe_load(path.read_text("utf-8"))
    except UnicodeDecodeError as e:
        raise RecipeError(f"{path}: not UTF-8 text (byte {e.start}); save the recipe as UTF-8") from None
    except OSError as e:
        raise RecipeError(f"{path}: cannot read the recipe ({e.strerror})") from None
    except yaml.YAMLError as e:
        raise RecipeError(f"{path}: not valid YAML: {e}".replace("\n", " ")) from None
    if data is None and overrides:
        data = {}  # an empty recipe: --set may build it up; validation then names what is missing
    for item in overrides or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise RecipeError(f"--set {item!r}: expected dotted.key=value")
        if not isinstance(data, dict):
            break  # parse_recipe names the problem
        node = data
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise RecipeError(f"--set {item!r}: {p} is not a mapping")
        try:
            node[parts[-1]] = yaml.safe_load(value)
        except yaml.YAMLError as e:
            raise RecipeError(f"--set {item!r}: the value is not valid YAML ({str(e).splitlines()[0]})") from None
    return parse_recipe(data, str(path), base=path.resolve().parent)


def dump_recipe(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)
