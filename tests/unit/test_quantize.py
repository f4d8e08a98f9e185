"""Post-training quantization (torchao and torch.ao dynamic), QAT convert, save and reload."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from distillery.compress.quantize import (
    SCHEMES,
    QuantizeError,
    choose_backend,
    convert_qat,
    load_quantized,
    parameter_count,
    qat_scheme,
    quantize,
    save_quantized,
    weight_bytes,
)
from distillery.recipe import QATConfig
from distillery.train.perturb import prepare_qat
from tests.helpers import tiny_llama

# Relative RMS error of the logits against float, on a tiny random model whose logits are
# widened (std ~ 3). Per-channel int8 weights carry ~0.4% error per weight (step / sqrt(12) of a
# 1/127 step), averaging down over the 64-wide dot products: measured 0.1-0.5%. Per-group int4
# weights have a 16x coarser step: measured 1.5%. Bounds are ~5x the measurements.
TOLERANCE = {"int8_dynamic": 0.02, "int8_weight_only": 0.02, "int4_weight_only": 0.08,
             "int8_dynamic_act_int4_weight": 0.08}


@pytest.fixture(scope="module")
def model():
    return tiny_llama(hidden=64)


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 512, (4, 32), generator=torch.Generator().manual_seed(2))


@torch.no_grad()
def _logits(m, ids):
    return m(input_ids=ids, use_cache=False).logits


def _rel(a, b) -> float:
    return ((a - b).norm() / b.norm()).item()


def _disk(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def _cases():
    for scheme in SCHEMES:
        yield scheme, "torchao"
    yield "int8_dynamic", "torch_dynamic"


@pytest.mark.parametrize("scheme, backend", list(_cases()))
def test_quantized_outputs_are_close_reload_equal_and_smaller(scheme, backend, model, ids, tmp_path):
    ref = _logits(model, ids)
    q = quantize(copy.deepcopy(model), scheme, backend=backend, keep_float=[])  # every linear but the head
    out = _logits(q, ids)
    assert 0 < _rel(out, ref) < TOLERANCE[scheme]
    assert (out.argmax(-1) == ref.argmax(-1)).float().mean() > 0.95
    folder = save_quantized(q, tmp_path / "q")
    assert torch.equal(_logits(load_quantized(folder), ids), out)
    if backend == "torchao":  # no distillery code needed to read it back
        assert torch.equal(_logits(AutoModelForCausalLM.from_pretrained(folder), ids), out)
    model.save_pretrained(tmp_path / "float")
    # the float embedding/head (33k of 180k parameters) stays: int8 elsewhere gives ~0.43x
    assert _disk(folder) < 0.5 * _disk(tmp_path / "float")
    assert weight_bytes(q) < 0.5 * weight_bytes(model)
    assert parameter_count(q) == parameter_count(model)  # the same weights, held in fewer bytes


@pytest.mark.parametrize("backend", ["torchao", "torch_dynamic"])
def test_keep_float_leaves_the_named_linears_float_and_reloads_so(backend, model, ids, tmp_path):
    default = quantize(copy.deepcopy(model), "int8_dynamic", backend=backend)  # int8_dynamic: down_proj float
    every = quantize(copy.deepcopy(model), "int8_dynamic", backend=backend, keep_float=[])
    one = quantize(copy.deepcopy(model), "int8_dynamic", backend=backend, keep_float=["layers.0.self_attn.q_proj"])

    def is_float(m, name):
        mod = m.get_submodule(name)
        return type(mod) is torch.nn.Linear and type(mod.weight) is torch.nn.Parameter

    layers = range(model.config.num_hidden_layers)
    assert all(is_float(default, f"model.layers.{i}.mlp.down_proj") for i in layers)
    assert not any(is_float(default, f"model.layers.{i}.mlp.up_proj") for i in layers)
    assert not any(is_float(every, f"model.layers.{i}.mlp.down_proj") for i in layers)
    assert is_float(one, "model.layers.0.self_attn.q_proj") and not is_float(one, "model.layers.1.self_attn.q_proj")
    assert weight_bytes(every) < weight_bytes(default) < weight_bytes(model)
    for name, q in (("default", default), ("one", one)):
        out = _logits(q, ids)
        folder = save_quantized(q, tmp_path / name)
        back = load_quantized(folder)
        assert torch.equal(_logits(back, ids), out)
        assert is_float(back, "model.layers.0.self_attn.q_proj") == (name == "one")
        assert is_float(back, "model.layers.1.mlp.down_proj") == (name == "default")
    with pytest.raises(QuantizeError, match="^keep_float: 'down_prj' names no linear layer"):
        quantize(copy.deepcopy(model), "int8_dynamic", backend=backend, keep_float=["down_prj"])


def test_quantized_embeddings_shrink_further_and_reload(model, ids, tmp_path):
    kept = quantize(copy.deepcopy(model), "int8_weight_only")
    both = quantize(copy.deepcopy(model), "int8_weight_only", quantize_embeddings=True)
    assert type(both.lm_head.weight).__name__ != "Parameter" and both.lm_head.weight is not both.model.embed_tokens.weight
    assert weight_bytes(both) < 0.85 * weight_bytes(kept)
    out = _logits(both, ids)
    assert _rel(out, _logits(model, ids)) < 0.05
    folder = save_quantized(both, tmp_path / "qe")
    assert torch.equal(_logits(AutoModelForCausalLM.from_pretrained(folder), ids), out)
    with pytest.raises(ValueError, match="^quantize_embeddings:"):
        quantize(copy.deepcopy(model), "int8_dynamic", backend="torch_dynamic", quantize_embeddings=True)


def test_choose_backend_picks_the_faster_one_by_measurement(model, ids):
    choice = choose_backend(model, "int8_dynamic", ids[:1], repeats=3)
    assert set(choice.seconds) == {"torchao", "torch_dynamic"} and all(s > 0 for s in choice.seconds.values())
    assert choice.backend == min(choice.seconds, key=choice.seconds.get)
    assert choice.float_seconds > 0
    assert choose_backend(model, "int4_weight_only").backend == "torchao"  # one backend: nothing to time


@pytest.mark.parametrize("scheme", ["int4_weight_only", "int8_dynamic_act_int4_weight"])
def test_convert_qat_gives_the_low_bit_model_the_student_trained_as(scheme, model, ids, tmp_path):
    student = prepare_qat(copy.deepcopy(model), QATConfig(scheme=scheme, group_size=32))
    assert qat_scheme(student) == (scheme, 32)
    fake = _logits(student, ids)
    real = convert_qat(student, scheme)
    assert qat_scheme(real) is None
    assert type(real.model.layers[0].mlp.up_proj.weight).__name__ == "IntxUnpackedToInt8Tensor"
    assert type(real.lm_head.weight) is torch.nn.Parameter  # prepare_qat leaves the head float
    out = _logits(real, ids)
    # same grid, same rounding: the converted model computes what the fake-quantized one did
    assert torch.allclose(out, fake, rtol=0, atol=1e-5)
    assert _rel(out, _logits(model, ids)) > 1e-3  # and that is not the float model
    folder = save_quantized(real, tmp_path / "qat")
    assert torch.equal(_logits(AutoModelForCausalLM.from_pretrained(folder), ids), out)


def test_convert_qat_refuses_a_mismatched_or_unprepared_model(model):
    student = prepare_qat(copy.deepcopy(model), QATConfig(scheme="int4_weight_only", group_size=32))
    with pytest.raises(ValueError, match="^scheme:"):
        convert_qat(student, "int8_dynamic_act_int4_weight")
    with pytest.raises(ValueError, match="^model:"):
        convert_qat(copy.deepcopy(model))


@pytest.mark.parametrize("kwargs, name", [
    ({"scheme": "int3"}, "scheme"), ({"scheme": "int8_dynamic", "backend": "tensorrt"}, "backend"),
    ({"scheme": "int4_weight_only", "backend": "torch_dynamic"}, "backend"),
    ({"scheme": "int4_weight_only", "group_size": 0}, "group_size"),
    ({"scheme": "int4_weight_only", "group_size": 48}, "group_size"),  # does not divide 64
])
def test_bad_requests_are_refused_naming_the_field(kwargs, name, model):
    with pytest.raises(QuantizeError, match=f"^{name}:"):
        quantize(copy.deepcopy(model), **kwargs)


def test_saving_an_unquantized_model_is_refused(model, tmp_path):
    with pytest.raises(QuantizeError, match="^model:"):
        save_quantized(copy.deepcopy(model), tmp_path / "x")
