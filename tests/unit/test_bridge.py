import json

import numpy as np
import pytest
import torch

from distillery.models.bridge import BridgeError, dropped_runs, fit_bridges
from distillery.models.layers import decoder_layers
from distillery.models.student import cut_from_teacher, cut_layers
from distillery.recipe import CutConfig
from tests.helpers import tiny_llama


def _states(model, blocks):
    with torch.no_grad():
        return model(input_ids=blocks, output_hidden_states=True).hidden_states


def test_runs_of_dropped_layers_follow_their_kept_layer():
    assert dropped_runs([0, 1, 4, 5], 8) == [(1, 3), (3, 7)]  # 2..3 after layer 1, 6..7 after layer 5
    assert dropped_runs([2, 3], 4) == []  # dropped before the first kept layer: nothing to fold into
    assert dropped_runs([0, 1, 2], 3) == []


def test_a_bridge_is_the_least_squares_map_folded_into_down_proj():
    teacher = tiny_llama(layers=6, hidden=32)
    blocks = torch.randint(0, 512, (8, 24))
    keep = [0, 1, 4]
    student = cut_layers(teacher, keep)
    layer = decoder_layers(student)[1]
    # The float64 reference, by numpy: MLP output M and residual Y = out - M of kept layer 1 (teacher layer 1),
    # target: the teacher's output of layer 3.
    got = {}
    h1 = layer.mlp.register_forward_hook(lambda m, a, o: got.__setitem__("m", o))
    h2 = layer.register_forward_hook(lambda m, a, o: got.__setitem__("out", o[0] if isinstance(o, tuple) else o))
    with torch.no_grad():
        student(input_ids=blocks)
    h1.remove(), h2.remove()
    m = got["m"].reshape(-1, 32).double().numpy()
    r = (_states(teacher, blocks)[4] - (got["out"] - got["m"])).reshape(-1, 32).double().numpy()
    t_ref = np.linalg.lstsq(m, r, rcond=None)[0]
    w_before = layer.mlp.down_proj.weight.detach().double().clone()

    report = fit_bridges(student, teacher, keep, blocks, ridge=0.0, batch_size=3)

    assert [(b["student_layer"], b["replaces"]) for b in report] == [(1, [2, 3]), (2, [5, 5])]
    np.testing.assert_allclose(layer.mlp.down_proj.weight.detach().double().numpy(), t_ref.T @ w_before.numpy(),
                               rtol=1e-3, atol=1e-4)
    # Folded, the block hands on what the map predicts: the least-squares residual, no worse than the cut.
    s_states, t_states = _states(student, blocks), _states(teacher, blocks)
    mse = ((s_states[2] - t_states[4]).double().square().mean()).item()
    assert mse == pytest.approx(report[0]["mse_after"], rel=1e-3)
    assert report[0]["mse_after"] < report[0]["mse_before"]
    # The last bridge stands in for teacher layer 5, up to the final norm.
    assert report[1]["mse_after"] < report[1]["mse_before"]


def test_bridges_bring_the_cut_student_closer_to_the_teacher(trained_tiny_teacher, tiny_tokenizer, lee_text):
    teacher = trained_tiny_teacher  # trained on Lee's news: real, peaked predictions
    ids = tiny_tokenizer(lee_text[120_000:160_000])["input_ids"]
    blocks = torch.tensor(ids[: len(ids) // 32 * 32]).view(-1, 32)
    fit, held = blocks[:48], blocks[48:64]
    keep = [0, 3]
    plain, bridged = cut_layers(teacher, keep), cut_layers(teacher, keep)
    fit_bridges(bridged, teacher, keep, fit)
    with torch.no_grad():
        t = teacher(input_ids=held).logits.log_softmax(-1)

        def kl(model):
            s = model(input_ids=held).logits.log_softmax(-1)
            return (t.exp() * (t - s)).sum(-1).mean().item()
        assert kl(bridged) < 0.25 * kl(plain)


def test_a_huge_ridge_leaves_the_plain_cut():
    teacher = tiny_llama(layers=4)
    student = cut_layers(teacher, [0, 3])
    w = decoder_layers(student)[0].mlp.down_proj.weight.detach().clone()
    fit_bridges(student, teacher, [0, 3], torch.randint(0, 512, (4, 16)), ridge=1e9)
    torch.testing.assert_close(decoder_layers(student)[0].mlp.down_proj.weight, w, rtol=1e-6, atol=1e-7)


def test_blocks_that_normalise_the_mlp_output_are_refused_by_name():
    teacher = tiny_llama(layers=4)
    student = cut_layers(teacher, [0, 3])
    decoder_layers(student)[0].post_feedforward_layernorm = torch.nn.Identity()  # Gemma's shape of block
    with pytest.raises(BridgeError, match="student.from_teacher.bridge"):
        fit_bridges(student, teacher, [0, 3], torch.randint(0, 512, (2, 8)))


def test_the_recipe_section_asks_for_bridges_and_records_them():
    teacher = tiny_llama(layers=6)
    blocks = torch.randint(0, 512, (16, 16))
    asked = []

    def rows(n):
        asked.append(n)
        return blocks[:n]
    student, meta = cut_from_teacher(CutConfig(keep_layers=[0, 1, 5], bridge="linear", bridge_blocks=12),
                                     teacher, rows)
    assert meta["kept_layers"] == [0, 1, 5] and len(meta["bridges"]) == 1 and 12 in asked
    _, plain = cut_from_teacher(CutConfig(keep_layers=[0, 1, 5]), teacher, rows)
    assert "bridges" not in plain
    with pytest.raises(ValueError, match="bridge"):
        CutConfig(num_layers=3, bridge="affine")


def test_the_pipeline_bridges_the_cut_it_saves(tmp_path, tiny_teacher_dir, lee_file):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from distillery.evaluate.quality import evaluate_models
    from distillery.pipeline import run_stages
    from distillery.recipe import parse_recipe
    from tests.helpers import tiny_recipe

    teacher = AutoModelForCausalLM.from_pretrained(tiny_teacher_dir)
    kl = {}
    for bridge in ("none", "linear"):
        recipe = parse_recipe(tiny_recipe(tmp_path, tiny_teacher_dir, lee_file, name=bridge, student={
            "from_teacher": {"keep_layers": [0, 3], "bridge": bridge, "bridge_blocks": 32}}))
        run_stages(recipe, ["data", "student_init"], progress=False, log=lambda m: None)
        meta = json.loads((recipe.run_path / "student_init" / "distillery.json").read_text())
        assert ("bridges" in meta) == (bridge == "linear")
        held = load_file(recipe.run_path / "data" / "blocks.safetensors")["heldout.input_ids"][:16]
        student = AutoModelForCausalLM.from_pretrained(recipe.run_path / "student_init")
        kl[bridge] = evaluate_models({"s": student}, held, teacher=teacher)["s"]["kl_to_teacher"]
    (fit,) = meta["bridges"]
    assert fit["replaces"] == [1, 2] and fit["mse_after"] < fit["mse_before"]
    assert kl["linear"] < 0.1 * kl["none"], kl  # on held-out text the fit never saw
