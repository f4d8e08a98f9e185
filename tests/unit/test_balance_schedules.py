"""Loss balancing and schedules: exact values, gradients, and errors that name the field."""

from __future__ import annotations

import math

import pytest
import torch

from distillery.losses.balance import LossBalancer
from distillery.losses.schedules import Ramp, constant, curriculum, temperature_annealing
from distillery.recipe import LossesConfig


def test_static_weights_sum_and_log_every_term():
    bal = LossBalancer({"ce": 0.5, "kd": 2.0, "hidden": 0.0})
    ce, kd, hid = torch.tensor(3.0), torch.tensor(0.25), torch.tensor(7.0)
    total, logs = bal({"ce": ce, "kd": kd, "hidden": hid})
    assert total.item() == pytest.approx(0.5 * 3 + 2 * 0.25)
    assert logs == {"loss/ce": 3.0, "loss/ce_weighted": 1.5, "loss/kd": 0.25, "loss/kd_weighted": 0.5,
                    "loss/hidden": 7.0, "loss/hidden_weighted": 0.0, "loss/total": 2.0}


def test_magnitude_balancing_rescales_to_the_reference_without_changing_gradient_direction():
    bal = LossBalancer({"ce": 1.0, "kd": 1.0, "hidden": 0.5}, mode="magnitude", reference="ce")
    x = torch.tensor([2.0, 3.0], requires_grad=True)
    ce, kd, hid = x.sum(), 100 * x[0] ** 2, 1e-3 * x[1]
    total, logs = bal({"ce": ce, "kd": kd, "hidden": hid})
    # every term enters at the reference's size, times its weight
    assert logs["loss/kd_weighted"] == pytest.approx(5.0)
    assert logs["loss/hidden_weighted"] == pytest.approx(2.5)
    assert total.item() == pytest.approx(5 + 5 + 2.5)
    (g,) = torch.autograd.grad(total, x)
    # d/dx of c * L with c held fixed: ce -> [1, 1]; kd -> (5/400) * [400, 0]; hidden -> 0.5*(5/0.003)*[0, 1e-3]
    assert g.tolist() == pytest.approx([1 + 5.0, 1 + 0.5 * 5 / 3])


def test_balancer_errors_name_the_field():
    with pytest.raises(ValueError, match="balance.mode"):
        LossBalancer({"kd": 1.0}, mode="auto")
    with pytest.raises(ValueError, match="balance.reference"):
        LossBalancer({"kd": 1.0}, mode="magnitude")
    with pytest.raises(ValueError, match=r"balance.weights.kd"):
        LossBalancer({"kd": -1.0})
    with pytest.raises(ValueError, match="no weight"):
        LossBalancer({"kd": 1.0})({"kd": torch.tensor(1.0), "ce": torch.tensor(1.0)})


def test_ramps():
    lin = Ramp(0.0, 1.0, "linear", steps=10, delay=5)
    assert [lin(s) for s in (0, 4, 5, 10, 15, 100)] == pytest.approx([0, 0, 0, 0.5, 1, 1])
    cos = Ramp(1.0, 0.0, "cosine", steps=4)
    assert [cos(s) for s in range(5)] == pytest.approx([1, 0.5 + 0.5 * math.cos(math.pi / 4), 0.5,
                                                         0.5 - 0.5 * math.cos(math.pi / 4), 0])
    assert [constant(0.3)(s) for s in (0, 10**6)] == [0.3, 0.3]
    cur = curriculum(2.0, start_step=3)
    assert [cur(s) for s in range(5)] == [0, 0, 0, 2.0, 2.0]
    assert curriculum(2.0, start_step=3, ramp_steps=2)(4) == pytest.approx(1.0)
    t = temperature_annealing(4.0, 1.0, steps=3)
    assert [t(s) for s in range(5)] == pytest.approx([4, 3, 2, 1, 1])
    with pytest.raises(ValueError, match="schedule.kind"):
        Ramp(0, 1, "exp")
    with pytest.raises(ValueError, match="temperature"):
        temperature_annealing(0.0, 1.0, 3)


def test_recipe_selects_representation_losses_and_schedules():
    cfg = LossesConfig.model_validate({
        "ce_weight": 1.0,
        "kd": {"divergence": "jsd", "beta": 0.5},
        "hidden": {"weight": 0.5, "kind": "cosine", "layer_map": [[1, 2], [2, 4]]},
        "attention": {"weight": 0.1, "head_mode": "grouped"},
        "balance": {"mode": "magnitude", "reference": "ce"},
        "schedules": {"beta": {"kind": "cosine", "start": 0.1, "end": 0.9, "steps": 100},
                      "temperature": {"start": 4.0, "end": 1.0, "steps": 50},
                      "representation_start_step": 20},
    })
    assert cfg.hidden.layer_map == [(1, 2), (2, 4)] and cfg.attention.head_mode == "grouped"
    sc = cfg.schedules.beta
    assert Ramp(sc.start, sc.end, sc.kind, sc.steps, sc.delay)(50) == pytest.approx(0.5)
    for bad, field in (({"hidden": {"kind": "l2"}}, "kind"), ({"schedules": {"beta": {"start": 0, "end": 2}}}, "beta"),
                       ({"attention": {"wieght": 1}}, "wieght")):
        with pytest.raises(ValueError, match=field):
            LossesConfig.model_validate(bad)
