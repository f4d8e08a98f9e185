"""Compression-aware training's QAT: the fake-quantized student is stripped back to the plain float
model with its trained weights, which is what gets exported."""

import copy
from types import SimpleNamespace

import pytest
import torch

from distillery.train.perturb import has_qat, prepare_qat, strip_qat
from tests.helpers import tiny_llama


@pytest.mark.parametrize("scheme", ["int8_dynamic_act_int4_weight", "int4_weight_only"])
def test_strip_qat_gives_the_plain_float_model_with_the_trained_weights(scheme):
    student = prepare_qat(tiny_llama(layers=2), SimpleNamespace(scheme=scheme, group_size=16))
    assert has_qat(student)
    with torch.no_grad():  # training moved the weights
        for p in student.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    reference = tiny_llama(layers=2)
    reference.load_state_dict(student.state_dict())
    x = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        fake = student(x).logits
        want = reference(x).logits
        assert (fake - want).abs().max() > 1e-3  # fake quantization was on
        stripped = strip_qat(copy.deepcopy(student))
        got = stripped(x).logits
    assert not has_qat(stripped)
    assert {type(m) for m in stripped.modules() if isinstance(m, torch.nn.Linear)} == {torch.nn.Linear}
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    for k, v in reference.state_dict().items():
        assert torch.equal(stripped.state_dict()[k], v), k
