import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from distillery.recipe import RecipeError, load_recipe

ROOT = Path(__file__).resolve().parents[2]


def write(tmp_path, data) -> Path:
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


def quickstart() -> dict:
    return yaml.safe_load((ROOT / "recipes" / "quickstart.yaml").read_text())


def test_every_shipped_recipe_validates():
    for path in sorted((ROOT / "recipes").glob("*.yaml")):
        assert load_recipe(path).name


def test_typo_in_key_names_the_field(tmp_path):
    data = quickstart()
    data["distill"]["stpes"] = data["distill"].pop("steps")
    with pytest.raises(RecipeError) as e:
        load_recipe(write(tmp_path, data))
    assert "distill.stpes" in str(e.value) and "unknown key" in str(e.value)


def test_impossible_value_names_the_field(tmp_path):
    data = quickstart()
    data["distill"]["losses"]["kd"]["temperature"] = -1
    with pytest.raises(RecipeError) as e:
        load_recipe(write(tmp_path, data))
    assert str(e.value).count("\n") == 0
    assert "distill.losses.kd.temperature" in str(e.value) and "greater than 0" in str(e.value)


def test_missing_file_and_wrong_type(tmp_path):
    data = quickstart()
    data["data"]["source"] = {"kind": "text", "path": str(tmp_path / "nope.txt")}
    data["distill"]["batch_size"] = "four"
    with pytest.raises(RecipeError) as e:
        load_recipe(write(tmp_path, data))
    msg = str(e.value)
    assert "data.source.path" in msg and "file not found" in msg
    assert "distill.batch_size" in msg


def test_on_policy_needs_a_teacher_that_can_score_new_text(tmp_path):
    data = quickstart()
    data["capture"] = {"k": 16}
    data["distill"].update(teacher_source="store", on_policy={"lam": 0.5})
    with pytest.raises(RecipeError, match="distill.on_policy: the student's samples are new text"):
        load_recipe(write(tmp_path, data))
    data["distill"]["on_policy"] = {"generator": "server"}
    data["distill"]["teacher_source"] = "online"
    with pytest.raises(RecipeError, match="generator 'server' needs a server block"):
        load_recipe(write(tmp_path, data))


def test_overrides_are_validated(tmp_path):
    r = load_recipe(ROOT / "recipes" / "quickstart.yaml", ["distill.steps=17", "distill.losses.kd.temperature=2.0"])
    assert r.distill.steps == 17 and r.distill.losses.kd.temperature == 2.0
    with pytest.raises(RecipeError, match="distill.steps"):
        load_recipe(ROOT / "recipes" / "quickstart.yaml", ["distill.steps=-3"])


@pytest.mark.parametrize("change", [("distill", "stpes", 5), ("temperature", None, -1)])
def test_cli_validate_exits_nonzero_with_one_line(tmp_path, change):
    data = quickstart()
    if change[0] == "distill":
        data["distill"]["stpes"] = 5
        field = "distill.stpes"
    else:
        data["distill"]["losses"]["kd"]["temperature"] = -1
        field = "distill.losses.kd.temperature"
    proc = subprocess.run([sys.executable, "-m", "distillery.cli", "validate", str(write(tmp_path, data))],
                          capture_output=True, text=True)
    assert proc.returncode != 0
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and field in lines[0], proc.stderr


def test_the_capture_encoding_is_validated_by_name(tmp_path):
    data = quickstart()
    data["capture"] = {"encoding": "rs-kd"}
    data["distill"]["teacher_source"] = "store"
    with pytest.raises(RecipeError) as e:
        load_recipe(write(tmp_path, data))
    assert "capture.encoding" in str(e.value) and "'topk', 'sampled' or 'topk_sampled'" in str(e.value)
    data["capture"] = {"encoding": "sampled", "draws": 300}
    with pytest.raises(RecipeError, match="capture.draws"):
        load_recipe(write(tmp_path, data))
    data["capture"] = {"encoding": "topk_sampled", "k": 8, "draws": 16}
    data["distill"]["losses"]["kd"]["divergence"] = "reverse_kl"
    with pytest.raises(RecipeError, match="capture.encoding 'topk_sampled' stores sampled tokens.*forward KL only"):
        load_recipe(write(tmp_path, data))
    data["distill"]["losses"]["kd"]["divergence"] = "forward_kl"
    r = load_recipe(write(tmp_path, data))
    assert (r.capture.encoding, r.capture.stored_k, r.capture.draws) == ("topk_sampled", 8, 16)
    data["capture"] = {"encoding": "sampled"}
    assert load_recipe(write(tmp_path, data)).capture.stored_k == 0
