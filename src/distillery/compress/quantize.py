"""Post-training quantization and the QAT convert step, through torchao; PyTorch's own dynamic
int8 (``torch.ao.quantization.quantize_dynamic``) as a second backend where it runs faster.

Schemes (torchao configs, checked against the installed torchao 0.18):

======================================  ==============================================================
``int8_dynamic``                        ``Int8DynamicActivationInt8WeightConfig``: int8 weights per
                                        output channel, activations quantized per token at run time
``int8_weight_only``                    ``Int8WeightOnlyConfig``: int8 weights per output channel
``int4_weight_only``                    ``IntxWeightOnlyConfig(int4, PerGroup(g), symmetric)``
``int8_dynamic_act_int4_weight``        ``Int8DynamicActivationIntxWeightConfig(int4, PerGroup(g))``
======================================  ==============================================================

int4 goes through torchao's ``Intx`` configs because torchao's ``Int4WeightOnlyConfig`` has no CPU
path in this version (its plain layout needs the ``mslk`` CUDA kernels, its tile-packed layout
bfloat16 on CUDA); the Intx configs run anywhere (int4 values held in int8 storage, dequantized
at matmul) and are exactly the numerics of the QAT fake quantization in ``train/perturb.py``
(symmetric per-group int4 weights, asymmetric per-token int8 activations), so ``convert_qat``
turns a trained fake-quantized student into a real low-bit one with the outputs it trained with.

``keep_float`` leaves linear layers float by name fragment. Its default keeps the MLP's ``down_proj``
float under ``int8_dynamic``: that layer's input (the gated MLP's product) carries the outliers that
per-tensor int8 activations (torch's ``quantize_dynamic``) round away. On the compress recipe's
half-size student (held-out Austen, 16 blocks) every linear in int8 raised perplexity 80.8 -> 98.7;
with ``down_proj`` float 83.2, at the same tokens/s (1.41x the float model's, both).

The output head (tied to the embeddings in the builtin teacher) stays float unless
``quantize_embeddings``: then the head is untied and quantized with the scheme, and the input
embedding is quantized weight-only (int8 per row, or int4 per group for int4 schemes).

Saving: a torchao-quantized model carries transformers' ``TorchAoConfig`` in its config and a
torchao ``hf_quantizer``, so ``save_pretrained`` writes safetensors with torchao's tensor metadata
and plain ``AutoModelForCausalLM.from_pretrained(folder)`` restores the quantized model. The
``torch_dynamic`` backend has no transformers integration: ``save_quantized`` writes the float
parts plus each quantized layer's int8 values, scales and zero points as safetensors, and
``load_quantized`` rebuilds it. ``load_quantized`` reads either kind.
"""

from __future__ import annotations

import copy
import json
import os
import statistics
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

# torchao is imported inside the functions that use it: importing it takes seconds

SCHEMES = ("int8_dynamic", "int8_weight_only", "int4_weight_only", "int8_dynamic_act_int4_weight")
BACKENDS = ("torchao", "torch_dynamic", "auto")
CONFIG_KEY = "distillery_quantization"
FORMAT = 1
DYNAMIC_FILE = "quantized.safetensors"


class QuantizeError(ValueError):
    """A quantization request that cannot be met; the message names the parameter at fault."""


def torchao_config(scheme: str, group_size: int = 32):
    """The torchao config for a scheme name."""
    import torchao.quantization as tq
    from torchao.quantization.granularity import PerGroup
    from torchao.quantization.quant_primitives import MappingType

    if scheme == "int8_dynamic":
        return tq.Int8DynamicActivationInt8WeightConfig()
    if scheme == "int8_weight_only":
        return tq.Int8WeightOnlyConfig()
    if scheme == "int4_weight_only":
        return tq.IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(group_size),
                                       mapping_type=MappingType.SYMMETRIC)
    if scheme == "int8_dynamic_act_int4_weight":
        return tq.Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4,
                                                        weight_granularity=PerGroup(group_size),
                                                        weight_mapping_type=MappingType.SYMMETRIC)
    raise QuantizeError(f"scheme: {scheme!r} is not one of {', '.join(SCHEMES)}")


def _embedding_config(scheme: str, group_size: int):
    import torchao.quantization as tq
    from torchao.quantization.granularity import PerAxis, PerGroup

    if "int4" in scheme:
        return tq.IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(group_size))
    return tq.IntxWeightOnlyConfig(weight_dtype=torch.int8, granularity=PerAxis(0))


def _check(scheme: str, backend: str, group_size: int) -> None:
    if scheme not in SCHEMES:
        raise QuantizeError(f"scheme: {scheme!r} is not one of {', '.join(SCHEMES)}")
    if backend not in BACKENDS:
        raise QuantizeError(f"backend: {backend!r} is not one of {', '.join(BACKENDS)}")
    if backend == "torch_dynamic" and scheme != "int8_dynamic":
        raise QuantizeError(f"backend: torch_dynamic (torch.ao quantize_dynamic) only does int8_dynamic, not {scheme}")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise QuantizeError(f"group_size: {group_size!r} is not a positive integer")


def default_keep_float(scheme: str) -> tuple[str, ...]:
    """The linear layers a scheme leaves float unless told otherwise (see the module's docstring)."""
    return ("down_proj",) if scheme == "int8_dynamic" else ()


def _linears(model: torch.nn.Module, include_head: bool, keep_float=()) -> dict[str, torch.nn.Linear]:
    head = model.get_output_embeddings()
    every = {n: m for n, m in model.named_modules()
             if isinstance(m, torch.nn.Linear) and (include_head or m is not head)}
    for fragment in keep_float:
        if not isinstance(fragment, str) or not any(fragment in n for n in every):
            raise QuantizeError(f"keep_float: {fragment!r} names no linear layer of the model "
                                f"(e.g. {', '.join(sorted({n.rsplit('.', 1)[-1] for n in every}))})")
    return {n: m for n, m in every.items() if not any(f in n for f in keep_float)}


def _check_groups(model: torch.nn.Module, names, group_size: int) -> None:
    bad = [n for n in names if model.get_submodule(n).in_features % group_size]
    if bad:
        raise QuantizeError(f"group_size: {group_size} does not divide the input width of {bad[:3]} "
                            f"({model.get_submodule(bad[0]).in_features})")


def _untie_head(model: torch.nn.Module) -> None:
    """Give the output head its own copy of the weights, so quantizing it leaves the embedding alone."""
    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    if head is not None and head.weight is emb.weight:
        head.weight = torch.nn.Parameter(emb.weight.detach().clone(), requires_grad=False)
    model.config.tie_word_embeddings = False
    if hasattr(model.config, "get_text_config"):
        model.config.get_text_config().tie_word_embeddings = False


def _name_pattern(names, generalise: bool = True) -> str:
    """One ``re:`` pattern matching these module names, with layer indices generalised unless some
    layers of a kind were left float (then each name exactly)."""
    import re

    parts = sorted({re.sub(r"\\\.\d+\\\.", r"\\.\\d+\\.", re.escape(n)) if generalise else re.escape(n)
                    for n in names})
    return "re:(?:" + "|".join(parts) + ")"


def _attach_transformers_quantizer(model: torch.nn.Module, ao_config, quantize_embeddings: bool,
                                   embedding_config=None, linears=(), some_kept_float: bool = False) -> None:
    """Make ``save_pretrained`` write torchao's serialized tensors and ``from_pretrained`` read them."""
    from transformers import TorchAoConfig
    from transformers.quantizers import AutoHfQuantizer
    import torchao.quantization as tq

    if quantize_embeddings:
        emb_name = next(n for n, m in model.named_modules() if m is model.get_input_embeddings())
        # explicit modules rather than torchao's deprecated "_default" key
        quant = TorchAoConfig(tq.FqnToConfig({emb_name: embedding_config,
                                              _name_pattern(linears, not some_kept_float): ao_config}),
                              include_input_output_embeddings=True, untie_embedding_weights=True)
    elif some_kept_float:  # only the quantized linears, so that the reloaded model keeps the rest float
        quant = TorchAoConfig(tq.FqnToConfig({_name_pattern(linears, generalise=False): ao_config}))
    else:
        quant = TorchAoConfig(ao_config)
    model.config.quantization_config = quant
    model.hf_quantizer = AutoHfQuantizer.from_config(quant, pre_quantized=False)


def _record(model, **fields) -> None:
    setattr(model.config, CONFIG_KEY, {"format": FORMAT, **fields})


@torch.no_grad()
def quantize(model: torch.nn.Module, scheme: str, *, backend: str = "torchao", group_size: int = 32,
             quantize_embeddings: bool = False, example: torch.Tensor | None = None,
             keep_float=None) -> torch.nn.Module:
    """Quantize ``model`` in place (and return it). ``backend="auto"`` times torchao against
    ``quantize_dynamic`` on ``example`` token ids (``choose_backend``) for ``int8_dynamic``.
    ``keep_float``: name fragments of linear layers to leave float (None: ``default_keep_float``)."""
    _check(scheme, backend, group_size)
    keep_float = tuple(default_keep_float(scheme) if keep_float is None else keep_float)
    if backend == "auto":
        backend = choose_backend(model, scheme, example, quantize_embeddings=quantize_embeddings,
                                 keep_float=keep_float).backend
    if backend == "torch_dynamic":
        return _quantize_dynamic(model, quantize_embeddings, keep_float)
    import torchao.quantization as tq
    if quantize_embeddings:
        _untie_head(model)
    names = _linears(model, include_head=quantize_embeddings, keep_float=keep_float)
    if "int4" in scheme:
        _check_groups(model, names, group_size)
    config = torchao_config(scheme, group_size)
    tq.quantize_(model, config, filter_fn=lambda m, fqn: fqn in names)
    emb_config = None
    if quantize_embeddings:
        emb_config = _embedding_config(scheme, group_size)
        emb = model.get_input_embeddings()
        if "int4" in scheme and emb.weight.shape[1] % group_size:
            raise QuantizeError(f"group_size: {group_size} does not divide the embedding width {emb.weight.shape[1]}")
        tq.quantize_(model, emb_config, filter_fn=lambda m, fqn: m is emb)
    _attach_transformers_quantizer(model, config, quantize_embeddings, emb_config, names, bool(keep_float))
    _record(model, scheme=scheme, backend="torchao", group_size=group_size, quantize_embeddings=quantize_embeddings,
            keep_float=list(keep_float))
    return model


# ---------------------------------------------------------------------------------- QAT convert


def qat_scheme(model: torch.nn.Module) -> tuple[str, int] | None:
    """(scheme, group_size) a QAT-prepared model's fake quantizers simulate, or None if it has none."""
    try:
        from torchao.quantization.qat import FakeQuantizedLinear
    except ImportError:
        return None
    found = set()
    for m in model.modules():
        if isinstance(m, FakeQuantizedLinear):
            w = m.weight_fake_quantizer.config if m.weight_fake_quantizer is not None else None
            gran = getattr(w, "granularity", None)
            found.add((getattr(w, "dtype", None), getattr(gran, "group_size", None),
                       m.activation_fake_quantizer is not None))
    if not found:
        return None
    if len(found) > 1:
        raise QuantizeError(f"scheme: the model's fake quantizers disagree ({sorted(map(str, found))})")
    dtype, group, act = found.pop()
    if dtype != torch.int4 or group is None:
        raise QuantizeError(f"scheme: fake quantization of {dtype} with group size {group} has no converter here")
    return ("int8_dynamic_act_int4_weight" if act else "int4_weight_only"), group


@torch.no_grad()
def convert_qat(model: torch.nn.Module, scheme: str | None = None) -> torch.nn.Module:
    """Turn a model prepared by ``train.perturb.prepare_qat`` (fake quantization) into the real
    low-bit model (torchao's ``QATConfig(base, step="convert")``), in place. ``scheme``, if given,
    must be what the fake quantizers simulate; the group size is read from them."""
    found = qat_scheme(model)
    if found is None:
        raise QuantizeError("model: no fake-quantized layers to convert (was it prepared with distill.qat?)")
    simulated, group = found
    if scheme is not None and scheme != simulated:
        raise QuantizeError(f"scheme: {scheme} asked, but the model was trained under {simulated} fake quantization")
    import torchao.quantization as tq
    from torchao.quantization.qat import FakeQuantizedLinear, QATConfig

    base = torchao_config(simulated, group)
    tq.quantize_(model, QATConfig(base, step="convert"), filter_fn=lambda m, fqn: isinstance(m, FakeQuantizedLinear))
    _attach_transformers_quantizer(model, base, quantize_embeddings=False)
    _record(model, scheme=simulated, backend="torchao", group_size=group, quantize_embeddings=False, qat=True)
    return model


# ---------------------------------------------------------------------------------- torch.ao dynamic


def _dynamic_api():
    with warnings.catch_warnings():  # torch.ao.quantization warns that it is deprecated in favour of torchao
        warnings.simplefilter("ignore")
        from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic
    return quantize_dynamic, per_channel_dynamic_qconfig


def _quantize_dynamic(model: torch.nn.Module, quantize_embeddings: bool, keep_float=()) -> torch.nn.Module:
    if quantize_embeddings:
        # quantize_dynamic leaves nn.Embedding float: untying the head to quantize it would add a
        # copy of the embedding and grow the model.
        raise QuantizeError("quantize_embeddings: the torch_dynamic backend cannot quantize the input "
                            "embedding; use backend torchao")
    quantize_dynamic, qconfig = _dynamic_api()
    names = sorted(_linears(model, include_head=False, keep_float=keep_float))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantize_dynamic(model, {n: qconfig for n in names}, dtype=torch.qint8, inplace=True)
    _record(model, scheme="int8_dynamic", backend="torch_dynamic", group_size=None,
            quantize_embeddings=quantize_embeddings, modules=names, keep_float=list(keep_float))
    return model


def _dynamic_linears(model):
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    return {n: m for n, m in model.named_modules() if isinstance(m, DynamicLinear)}


# ---------------------------------------------------------------------------------- measuring


def parameter_count(model: torch.nn.Module) -> int:
    """Weights of the model as elements, quantized or not: torch's dynamic int8 layers hold theirs
    outside ``parameters()``, so counting those alone undercounts a quantized model."""
    total = sum(p.numel() for p in model.parameters())
    for m in _dynamic_linears(model).values():
        w, b = m._weight_bias()
        total += w.numel() + (0 if b is None else b.numel())
    return total


def weight_bytes(model: torch.nn.Module) -> int:
    """Resident bytes of the model's weights and buffers, counting what quantized tensors really
    hold (torchao subclasses: their inner tensors; dynamic int8 layers: int8 values and scales)."""

    def size(t: torch.Tensor) -> int:
        if hasattr(t, "__tensor_flatten__") and type(t) not in (torch.Tensor, torch.nn.Parameter):
            names, _ = t.__tensor_flatten__()
            return sum(size(getattr(t, n)) for n in names)
        if t.is_quantized:
            if t.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
                return t.numel() + sum(q.numel() * q.element_size()
                                       for q in (t.q_per_channel_scales(), t.q_per_channel_zero_points()))
            return t.numel() + 16
        return t.numel() * t.element_size()

    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) not in seen:
            seen.add(id(t))
            total += size(t)
    for m in _dynamic_linears(model).values():
        w, b = m._weight_bias()
        total += size(w) + (0 if b is None else size(b))
    return total


@dataclass
class BackendChoice:
    backend: str
    seconds: dict[str, float] = field(default_factory=dict)  # median seconds per forward, per backend
    float_seconds: float | None = None

    def to_dict(self) -> dict:
        return {"backend": self.backend, "seconds": self.seconds, "float_seconds": self.float_seconds}


@torch.no_grad()
def _median_forward(models: dict[str, torch.nn.Module], example: torch.Tensor, repeats: int) -> dict[str, float]:
    times = {k: [] for k in models}
    for m in models.values():  # warm-up: first calls pack weights and pick kernels
        m(input_ids=example, use_cache=False)
    for _ in range(repeats):  # interleaved, so a noisy neighbour slows every backend alike
        for k, m in models.items():
            t0 = time.perf_counter()
            m(input_ids=example, use_cache=False)
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def choose_backend(model: torch.nn.Module, scheme: str = "int8_dynamic", example: torch.Tensor | None = None, *,
                   repeats: int = 5, quantize_embeddings: bool = False, keep_float=None) -> BackendChoice:
    """The faster backend for ``scheme`` on this machine, by timing forward passes of quantized
    copies of ``model`` on ``example`` token ids (default: one 32-token sequence), interleaved.
    Only ``int8_dynamic`` with float embeddings has two backends; anything else gets torchao
    without a measurement."""
    if scheme != "int8_dynamic":
        _check(scheme, "torchao", 32)
        return BackendChoice("torchao")
    if example is None:
        example = torch.arange(32).remainder(model.config.vocab_size)[None]
    example = example.to(next(model.parameters()).device)
    if quantize_embeddings:  # only torchao quantizes the embedding
        return BackendChoice("torchao")
    candidates = {"float": model}
    for backend in ("torchao", "torch_dynamic"):
        candidates[backend] = quantize(copy.deepcopy(model), scheme, backend=backend, keep_float=keep_float)
    seconds = _median_forward(candidates, example, repeats)
    best = min(("torchao", "torch_dynamic"), key=seconds.__getitem__)
    return BackendChoice(best, {k: seconds[k] for k in ("torchao", "torch_dynamic")}, seconds["float"])


# ---------------------------------------------------------------------------------- save / load


def quantization_record(folder_or_model) -> dict | None:
    if isinstance(folder_or_model, torch.nn.Module):
        return getattr(folder_or_model.config, CONFIG_KEY, None)
    path = Path(folder_or_model) / "config.json"
    return json.loads(path.read_text()).get(CONFIG_KEY) if path.is_file() else None


def save_quantized(model: torch.nn.Module, folder: str | os.PathLike, tokenizer=None) -> Path:
    """Write a quantized model atomically: torchao models through ``save_pretrained`` (loadable by
    plain transformers), ``torch_dynamic`` ones as float weights plus ``quantized.safetensors``."""
    from distillery.io import save_model_folder

    record = quantization_record(model)
    if record is None:
        raise QuantizeError("model: not quantized by distillery (no distillery_quantization in its config)")
    if record["backend"] == "torchao":
        return save_model_folder(model, folder, tokenizer)
    return _save_dynamic(model, Path(folder), tokenizer, record)


def _save_dynamic(model, folder: Path, tokenizer, record: dict) -> Path:

    from safetensors.torch import save_file

    quantized, floats = {}, {}
    dynamic = _dynamic_linears(model)
    for name, m in dynamic.items():
        w, b = m._weight_bias()
        quantized[f"{name}.weight.int8"] = w.int_repr().contiguous()
        quantized[f"{name}.weight.scales"] = w.q_per_channel_scales().float().contiguous()
        quantized[f"{name}.weight.zero_points"] = w.q_per_channel_zero_points().contiguous()
        if b is not None:
            quantized[f"{name}.bias"] = b.detach().contiguous()
    skip = tuple(f"{n}." for n in dynamic)
    for name, t in model.state_dict().items():
        if isinstance(t, torch.Tensor) and not name.startswith(skip):
            floats[name] = t.detach().contiguous()
    # Tied weights are one tensor: keep the first name, the loader re-ties the rest.
    seen, unique = {}, {}
    for name, t in floats.items():
        key = (t.data_ptr(), t.shape)
        if key not in seen:
            seen[key] = name
            unique[name] = t
    from distillery.io import atomic_folder

    with atomic_folder(folder) as tmp:
        model.config.save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        save_file(unique, tmp / "model.safetensors", metadata={"format": "pt"})
        save_file(quantized, tmp / DYNAMIC_FILE, metadata={"format": "pt", "axis": "0"})
    return folder


def load_quantized(folder: str | os.PathLike, device: str | torch.device = "cpu") -> torch.nn.Module:
    """Load a model written by ``save_quantized`` (either backend), in eval mode."""
    from transformers import AutoModelForCausalLM

    folder = Path(folder)
    record = quantization_record(folder)
    if record is None or record.get("backend") == "torchao":
        return AutoModelForCausalLM.from_pretrained(folder, device_map=str(device)).eval()
    if record.get("backend") != "torch_dynamic" or record.get("format") != FORMAT:
        raise QuantizeError(f"{folder / 'config.json'}: {CONFIG_KEY} has an unknown backend or format: {record}")
    return _load_dynamic(folder, record)


def _load_dynamic(folder: Path, record: dict) -> torch.nn.Module:
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    if not (folder / DYNAMIC_FILE).is_file():
        raise QuantizeError(f"{folder}: {DYNAMIC_FILE} is missing (a torch_dynamic model keeps its int8 layers there)")
    config = AutoConfig.from_pretrained(folder)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    floats = load_file(folder / "model.safetensors")
    missing, unexpected = model.load_state_dict(floats, strict=False)
    modules = record["modules"]
    allowed = {f"{n}.{p}" for n in modules for p in ("weight", "bias")}
    tied = set(getattr(model, "_tied_weights_keys", None) or ()) if config.tie_word_embeddings else set()
    if unexpected or set(missing) - allowed - tied:
        raise QuantizeError(f"{folder}/model.safetensors: does not match the model "
                            f"(missing {sorted(set(missing) - allowed - tied)[:5]}, unexpected {unexpected[:5]})")
    if tied:
        model.tie_weights()
    quantize_dynamic, qconfig = _dynamic_api()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantize_dynamic(model, {n: qconfig for n in modules}, dtype=torch.qint8, inplace=True)
    q = load_file(folder / DYNAMIC_FILE)
    for name, m in _dynamic_linears(model).items():
        try:
            w = torch._make_per_channel_quantized_tensor(q[f"{name}.weight.int8"], q[f"{name}.weight.scales"].double(),
                                                         q[f"{name}.weight.zero_points"], 0)
        except KeyError as e:
            raise QuantizeError(f"{folder / DYNAMIC_FILE}: no {e.args[0]}") from None
        m.set_weight_bias(w, q.get(f"{name}.bias"))
    return model
