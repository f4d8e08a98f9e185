"""A teacher whose decoder layers stay in CPU memory and are copied to the device for their forward
(models/offload.py). Here the device is the CPU, which checks the plumbing: same outputs, weights
back in CPU memory after each forward, and copies that stay independent. The GPU run is in
benchmarks/teacher_placement.py."""

import torch

from distillery.models.offload import is_offloaded, offload_layers
from distillery.models.layers import decoder_layers
from distillery.models.student import cut_layers
from tests.helpers import assert_kl_lowered, run, tiny_llama, tiny_recipe

X = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(0))


def test_an_offloaded_model_computes_the_same_logits():
    plain, offloaded = tiny_llama(layers=3), offload_layers(tiny_llama(layers=3), "cpu")
    assert is_offloaded(offloaded) and not is_offloaded(plain)
    masters = [[p.data for p in layer.parameters()] for layer in decoder_layers(offloaded)]
    with torch.no_grad():
        torch.testing.assert_close(offloaded(input_ids=X).logits, plain(input_ids=X).logits, atol=0, rtol=0)
    for layer, kept in zip(decoder_layers(offloaded), masters):  # the layer's weights are its CPU tensors again
        assert all(p.data_ptr() == m.data_ptr() for p, m in zip(layer.parameters(), kept))
        assert not any(p.requires_grad for p in layer.parameters())


def test_a_student_cut_from_an_offloaded_teacher_is_its_own_model():
    teacher = offload_layers(tiny_llama(layers=4), "cpu")
    with torch.no_grad():
        before = teacher(input_ids=X).logits.clone()
    student = cut_layers(teacher, [0, 3])
    assert is_offloaded(student)  # a cut streams the way its source does
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.1)
        moved = student(input_ids=X).logits
        torch.testing.assert_close(teacher(input_ids=X).logits, before, atol=0, rtol=0)
    assert not torch.allclose(moved, before)


def test_distillation_from_an_offloaded_teacher(tiny_teacher_dir, lee_file, tmp_path):
    summary = run(tiny_recipe(tmp_path, tiny_teacher_dir, lee_file, teacher={"model": str(tiny_teacher_dir),
                                                                              "offload": True}))
    assert_kl_lowered(summary)
