"""compress -> evaluate -> gate through the pipeline on the tiny teacher: variants made from the distilled
student and from each other, scored in the format they ship in, judged by the recipe's rules."""

from __future__ import annotations

import json

import pytest
import yaml
from typer.testing import CliRunner

from distillery.cli import app
from tests.helpers import tiny_recipe

COMPRESS = [
    {"name": "pruned", "steps": [{"prune": {"mlp_channels": 0.5, "calibration_blocks": 4}},
                                 {"redistill": {"steps": 3}}]},
    {"name": "pruned-int8", "from": "pruned", "steps": [{"quantize": {"scheme": "int8_dynamic",
                                                                       "backend": "torch_dynamic"}}]},
]
RULES = ["kl_to_teacher <= 5", "ece <= teacher.ece + 0.5", "accuracy >= 0.0", "latency_p50 <= 100.0",
         "accuracy not worse than student_init (paired, p < 0.05)"]


def recipe_file(tmp_path, teacher_dir, text, **changes):
    recipe = tiny_recipe(tmp_path, teacher_dir, text, distill={"steps": 6, "eval_every": 6, "eval_blocks": 2,
                                                               "checkpoint_every": 6, "warmup_steps": 1},
                         evaluate={"eval_blocks": 4, "tasks": [{"name": "sentiment", "limit": 12}],
                                   "speed": {"requests": 2, "new_tokens": 2, "concurrency": [1, 2],
                                             "cold_start": False}},
                         compress=COMPRESS, gate={"rules": RULES})
    recipe.update(changes)
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_compress_evaluate_gate(tiny_teacher_dir, lee_file, tmp_path):
    path = recipe_file(tmp_path, tiny_teacher_dir, lee_file)
    result = CliRunner().invoke(app, ["run", str(path)])
    assert result.exit_code == 0, result.output
    run = tmp_path / "runs" / "v"
    pruned = json.loads((run / "compressed" / "pruned" / "compress.json").read_text())
    assert [s["step"] for s in pruned["steps"]] == ["prune", "redistill"]
    assert pruned["after"]["parameters"] < pruned["before"]["parameters"]
    assert pruned["steps"][1]["steps_trained"] == 3
    assert pruned["steps"][1]["kl_after"] < pruned["steps"][1]["kl_before"]  # the teacher recovered some quality
    int8 = json.loads((run / "compressed" / "pruned-int8" / "compress.json").read_text())
    assert int8["after"]["format"] == "int8_dynamic"
    # int8 linears hold a quarter of their float bytes; the tiny model's float embeddings dominate the rest
    assert int8["after"]["weight_bytes"] < 0.8 * int8["before"]["weight_bytes"]
    table = json.loads((run / "eval" / "metrics.json").read_text())
    for variant in ("teacher", "student_init", "student", "pruned", "pruned-int8"):
        m = table["metrics"][variant]
        assert {"perplexity", "kl_to_teacher", "ece", "accuracy", "latency_p50", "tokens_per_s_c2_greedy"} <= set(m)
        assert len(table["per_example"][variant]["accuracy"]) == 12
    paired = json.loads((run / "eval" / "paired.json").read_text())
    row = next(r for r in paired if r["variant"] == "student" and r["against"] == "student_init"
               and r["metric"] == "accuracy")
    assert row["test"] == "mcnemar" and row["n"] == 12 and 0 <= row["p_value"] <= 1
    gate = json.loads((run / "gate.json").read_text())
    assert gate["passed"] and [r["variant"] for r in gate["rules"]] == ["pruned-int8"] * len(RULES)
    # The same rules with an impossible bar fail, naming the rule, with exit code 1; a bad rule is exit 2.
    failing = CliRunner().invoke(app, ["gate", str(path), "--variant", "student_init",
                                       "--set", "gate.rules=['kl_to_teacher <= 0.0']"])
    assert failing.exit_code == 1, failing.output
    assert "FAIL" in failing.output and "kl_to_teacher <= 0.0" in failing.output
    again = CliRunner().invoke(app, ["run", str(path)])
    assert again.exit_code == 0 and "compress: already complete" in again.output, again.output


@pytest.mark.parametrize("change, words", [
    ({"compress": [{"name": "a", "from": "b", "steps": [{"quantize": {}}]}]}, ["compress[0].from", "'b'"]),
    ({"compress": [{"name": "a", "from": "b", "steps": [{"quantize": {}}]},
                   {"name": "b", "from": "a", "steps": [{"quantize": {}}]}]}, ["cycle"]),
    ({"compress": [{"name": "a", "steps": [{"prune": {"mlp_channels": 1.0}}]}]}, ["mlp_channels"]),
    ({"compress": [{"name": "a", "steps": [{"quantize": {}}, {"redistill": {}}]}]}, ["quantize must be the last"]),
    ({"compress": [{"name": "student", "steps": [{"quantize": {}}]}]}, ["is taken"]),
    ({"gate": {"rules": ["perplxity <= 3"]}}, ["gate.rules[0]", "perplxity"]),
    ({"gate": {"rules": ["accuracy[label:maybe] >= 0.5"]}}, ["gate.rules[0]", "label:maybe"]),
])
def test_bad_compress_and_gate_sections_are_refused_by_validate(tiny_teacher_dir, lee_file, tmp_path, change,
                                                                 words):
    path = recipe_file(tmp_path, tiny_teacher_dir, lee_file, **change)
    result = CliRunner().invoke(app, ["validate", str(path)])
    assert result.exit_code == 2, result.output
    for w in words:
        assert w in result.output, (w, result.output)


def test_bits_per_byte_and_word_perplexity_from_the_model_loss(trained_tiny_teacher, tiny_tokenizer, lee_text):
    """Against transformers' own loss: the summed NLL of every predicted token over the bytes and words of
    the text those tokens spell."""
    import math

    import torch

    from distillery.evaluate.quality import evaluate_models
    from distillery.evaluate.suite import per_text_unit, text_units

    ids = tiny_tokenizer(lee_text[:4000])["input_ids"]
    blocks = torch.tensor(ids[: len(ids) // 32 * 32]).view(-1, 32)[:6]
    scores = evaluate_models({"m": trained_tiny_teacher}, blocks)["m"]
    with torch.no_grad():
        total = sum(float(trained_tiny_teacher(input_ids=b[None], labels=b[None]).loss) * (len(b) - 1) for b in blocks)
    text = "".join(tiny_tokenizer.decode(b[1:].tolist()) for b in blocks)
    units = text_units(tiny_tokenizer, {"input_ids": blocks})
    assert units["bytes"] == len(text.encode("utf-8"))
    got = per_text_unit(scores, units)
    assert abs(got["bits_per_byte"] - total / (len(text.encode()) * math.log(2))) < 1e-5
    words = sum(len(tiny_tokenizer.decode(b[1:].tolist()).split()) for b in blocks)
    assert abs(math.log(got["word_perplexity"]) - total / words) < 1e-5
