"""Width and depth pruning: smaller dense models that reload with plain transformers."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from distillery.compress.prune import (
    PruneError,
    activation_importance,
    count_params,
    prune,
    prune_to_target,
)
from distillery.models.student import skip_loss_increase
from tests.helpers import tiny_llama


def _blocks(n: int = 8, t: int = 32, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 512, (n, t), generator=g)


@torch.no_grad()
def _logits(model, ids):
    return model(input_ids=ids, use_cache=False).logits


def test_no_pruning_gives_bitwise_equal_outputs():
    model = tiny_llama(hidden=64)
    ids = _blocks(2, 16, seed=7)
    # 0.001 of 128 MLP channels rounds to none removed: the same model, through the same copy path.
    for ratios in ({}, {"mlp_channels": 0.001}):
        out = prune(model, _blocks(), **ratios)
        assert out.report["params_after"] == out.report["params_before"] == count_params(model)
        assert torch.equal(_logits(out.model, ids), _logits(model, ids))


def test_pruned_model_is_smaller_dense_and_reloads_with_plain_transformers(tmp_path):
    model = tiny_llama(hidden=64, heads=4, kv_heads=2)
    out = prune(model, _blocks(), layers=0.25, mlp_channels=0.5, heads=0.5, hidden=0.25)
    cfg = out.model.config
    assert (cfg.num_hidden_layers, cfg.intermediate_size, cfg.num_attention_heads, cfg.num_key_value_heads,
            cfg.hidden_size, cfg.head_dim) == (3, 64, 2, 1, 48, 16)
    assert out.report["params_after"] == count_params(out.model) < 0.45 * count_params(model)
    out.model.save_pretrained(tmp_path / "pruned")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned")
    assert type(again) is type(model) and again.config.head_dim == 16
    ids = _blocks(2, 16, seed=7)
    assert torch.equal(_logits(again, ids), _logits(out.model, ids))
    assert again.lm_head.weight.data_ptr() == again.model.embed_tokens.weight.data_ptr()  # still tied


def _zero_some_units(model, mlp_zero=32, hidden_zero=16):
    """Channels that carry nothing: MLP channels with zero up_proj rows, the second key/value group
    (zero v_proj rows: its heads output zeros), hidden channels zero in the embeddings (tied to
    lm_head) and in every write to the residual stream (o_proj and down_proj rows)."""
    d_head = model.config.head_dim
    g = torch.Generator().manual_seed(3)
    hid = torch.randperm(model.config.hidden_size, generator=g)[:hidden_zero]
    with torch.no_grad():
        model.model.embed_tokens.weight[:, hid] = 0
        for layer in model.model.layers:
            mlp = torch.randperm(model.config.intermediate_size, generator=g)[:mlp_zero]
            layer.mlp.up_proj.weight[mlp] = 0
            layer.self_attn.v_proj.weight[d_head:2 * d_head] = 0
            layer.self_attn.o_proj.weight[hid] = 0
            layer.mlp.down_proj.weight[hid] = 0
    return model


def test_pruning_only_zero_importance_units_leaves_outputs_unchanged():
    model = _zero_some_units(tiny_llama(hidden=64, heads=4, kv_heads=2))
    blocks = _blocks()
    imp = activation_importance(model, blocks)
    assert (imp.mlp == 0).sum() == 32 * 4 and (imp.hidden == 0).sum() == 16
    assert torch.all(imp.kv_groups(2)[:, 1] == 0) and torch.all(imp.kv_groups(2)[:, 0] > 0)
    out = prune(model, blocks, mlp_channels=0.25, heads=0.5, hidden=0.25)
    assert (out.model.config.intermediate_size, out.model.config.num_key_value_heads,
            out.model.config.hidden_size) == (96, 1, 48)
    ids = _blocks(3, 24, seed=11)
    ref, got = _logits(model, ids), _logits(out.model, ids)
    assert (got - ref).abs().max().item() < 1e-5 * max(1.0, ref.abs().max().item())
    # Removing units that do carry something does change the outputs: the check above can fail.
    other = prune(tiny_llama(hidden=64), blocks, mlp_channels=0.25, hidden=0.25)
    assert (_logits(other.model, ids) - _logits(tiny_llama(hidden=64), ids)).abs().max() > 1e-2


def test_query_heads_within_groups_keep_groups_equal_sized(tmp_path):
    model = tiny_llama(hidden=64, heads=8, kv_heads=2)
    out = prune(model, _blocks(), heads=0.5, head_mode="queries")
    assert (out.model.config.num_attention_heads, out.model.config.num_key_value_heads) == (4, 2)
    out.model.save_pretrained(tmp_path / "q")
    ids = _blocks(2, 16, seed=5)
    assert torch.equal(_logits(AutoModelForCausalLM.from_pretrained(tmp_path / "q"), ids), _logits(out.model, ids))


@pytest.mark.parametrize("kwargs, name", [
    ({"mlp_channels": 1.0}, "mlp_channels"), ({"mlp_channels": -0.1}, "mlp_channels"),
    ({"hidden": 1.5}, "hidden"), ({"layers": "half"}, "layers"),
    ({"heads": 0.25}, "heads"),  # 3 of 4 query heads: not whole groups of 2
    ({"heads": 0.75, "head_mode": "queries"}, "heads"),  # 1 head cannot serve 2 groups
    ({"heads": 0.5, "head_mode": "sideways"}, "head_mode"),
])
def test_invalid_ratios_are_refused_naming_the_parameter(kwargs, name):
    model = tiny_llama(hidden=64, heads=4, kv_heads=2)
    with pytest.raises(ValueError, match=rf"^{name}:"):
        prune(model, _blocks(), **kwargs)


@pytest.mark.parametrize("target", [0.6, 0.45, 120_000])
def test_prune_to_target_lands_within_two_percent(target):
    model = tiny_llama(hidden=64)
    out = prune_to_target(model, _blocks(), target)
    goal = target * count_params(model) if target < 1 else target
    assert abs(count_params(out.model) - goal) / goal < 0.02
    assert out.report["params_after"] == count_params(out.model) == out.report["predicted_params"]
    assert out.report["param_error"] < 0.02


def test_depth_alone_that_cannot_reach_the_target_is_refused():
    model = tiny_llama(hidden=64)  # 4 layers of 37k parameters over a 33k embedding: 3 layers are
    # 0.80 of it, 2 layers 0.59; 0.7 is 13% from the nearest
    with pytest.raises(ValueError, match="^target:"):
        prune_to_target(model, _blocks(), 0.7, axes=("layers",))


def test_depth_by_loss_drops_the_layer_that_does_nothing():
    model = tiny_llama(hidden=64)
    with torch.no_grad():  # layer 1 writes nothing to the residual stream: skipping it costs nothing
        model.model.layers[1].self_attn.o_proj.weight.zero_()
        model.model.layers[1].mlp.down_proj.weight.zero_()
    blocks = _blocks()
    rises = skip_loss_increase(model, blocks)
    assert rises[1] == pytest.approx(0.0, abs=1e-6) and min(rises[0], rises[2], rises[3]) > 1e-3
    out = prune(model, blocks, layers=0.25, depth_method="skip_loss")
    assert out.report["kept_layers"] == [0, 2, 3]
    ids = _blocks(2, 16, seed=5)
    assert torch.allclose(_logits(out.model, ids), _logits(model, ids), atol=1e-5)
    with pytest.raises(PruneError, match="^depth_method: 'loss'"):
        prune(model, blocks, layers=0.25, depth_method="loss")


@pytest.mark.slow
def test_real_teacher_width_and_depth_to_half_reload_within_two_percent(tmp_path):
    from distillery.models.load import load_model

    teacher = load_model("builtin:smollm2-135m-instruct", device="cpu")
    ids = teacher.tokenizer("It is a truth universally acknowledged, that a single man in possession of a good "
                            "fortune, must be in want of a wife. " * 4, return_tensors="pt")["input_ids"][:, :64]
    blocks = ids.repeat(2, 1)
    before = count_params(teacher.model)
    for axes, fixed in ((("mlp_channels", "hidden"), {"heads": 1 / 3}), (("mlp_channels",), {"layers": 0.4})):
        out = prune_to_target(teacher.model, blocks, 0.5, axes=axes, **fixed)
        assert abs(count_params(out.model) / before - 0.5) < 0.01, out.report
        out.model.save_pretrained(tmp_path / "p")
        again = AutoModelForCausalLM.from_pretrained(tmp_path / "p")
        assert torch.equal(_logits(again, ids), _logits(out.model, ids))


def test_every_depth_method_a_recipe_accepts_is_one_prune_knows():
    from typing import get_args

    from distillery.recipe import PruneStep

    methods = get_args(PruneStep.model_fields["depth_method"].annotation)
    assert set(methods) == {"influence", "skip_loss"}
    model, blocks = tiny_llama(hidden=64), _blocks()
    for method in methods:  # the recipe's names reach prune unchanged (compress/chain.py)
        assert len(prune(model, blocks, layers=0.25, depth_method=method).report["kept_layers"]) == 3
