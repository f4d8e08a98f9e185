"""The faults a run survives, one test each: damaged or replaced inputs, missing outputs, unreadable
checkpoints, unsafe names, bad recipes and flags. Each either re-runs what is stale, correctly, or is
refused with exit code 2 and one line naming the file, field or flag at fault, never a traceback."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from distillery.cli import app
from tests.helpers import tiny_llama, tiny_recipe

FAST = {"steps": 4, "eval_every": 4, "eval_blocks": 2, "checkpoint_every": 2, "warmup_steps": 1}


def write_recipe(tmp_path: Path, teacher_dir: Path, text: Path, **sections) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    recipe = tiny_recipe(tmp_path, teacher_dir, text, distill={**FAST, **sections.pop("distill", {})},
                         evaluate={"eval_blocks": 2}, **sections)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def cli(*args: str):
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert "Traceback" not in result.output, result.output
    return result


def refused(result, *words: str) -> str:
    """Exit 2 with one error line containing every word."""
    assert result.exit_code == 2, (result.exit_code, result.output)
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.output
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


def stage_lines(result, name: str) -> list[str]:
    """The stage's own messages (progress bars share lines with them in captured output)."""
    return [line[line.index(f"{name}: "):] for line in result.output.splitlines() if f"{name}: " in line]


def skipped(result, name: str) -> bool:
    return any("skipped" in line for line in stage_lines(result, name))


# ---------------------------------------------------------------- stale results


def test_replaced_data_file_reruns_data_and_everything_downstream(tiny_teacher_dir, lee_file, tmp_path):
    recipe = write_recipe(tmp_path, tiny_teacher_dir, lee_file)
    first = cli("run", recipe)
    assert first.exit_code == 0, first.output
    again = cli("run", recipe)
    assert all(skipped(again, s) for s in ("data", "student_init", "distill", "evaluate")), again.output
    before = json.loads((tmp_path / "runs" / "v" / "eval" / "summary.json").read_text())
    text = lee_file.read_text()
    lee_file.write_text(text[len(text) // 2:] + text[: len(text) // 2])  # same path, other contents
    changed = cli("run", recipe)
    assert changed.exit_code == 0, changed.output
    assert not any(skipped(changed, s) for s in ("data", "student_init", "distill", "evaluate")), changed.output
    after = json.loads((tmp_path / "runs" / "v" / "eval" / "summary.json").read_text())
    assert after["student"]["perplexity"] != before["student"]["perplexity"]


def test_a_run_cut_by_another_heldout_rule_is_cut_again(tiny_teacher_dir, lee_file, tmp_path, monkeypatch):
    from distillery.data import sources

    recipe = write_recipe(tmp_path, tiny_teacher_dir, lee_file)
    assert cli("run", recipe).exit_code == 0
    monkeypatch.setattr(sources, "HELDOUT_SPLIT", "every document's last fraction")  # the rule before 34d369f
    again = cli("run", recipe)
    assert again.exit_code == 0, again.output
    assert not skipped(again, "data"), again.output
    # one long document splits the same under either rule: the same blocks, so nothing after data re-runs
    assert all(skipped(again, s) for s in ("student_init", "distill", "evaluate")), again.output


def test_replaced_teacher_weights_rerun_every_stage_that_reads_the_teacher(tiny_teacher_dir, lee_file, tmp_path):
    recipe = write_recipe(tmp_path, tiny_teacher_dir, lee_file)
    assert cli("run", recipe).exit_code == 0
    tiny_llama(seed=7).save_pretrained(tiny_teacher_dir)  # same folder, other weights
    again = cli("run", recipe)
    assert again.exit_code == 0, again.output
    assert not any(skipped(again, s) for s in ("data", "student_init", "distill", "evaluate")), again.output


def test_force_on_one_stage_makes_every_later_stage_out_of_date(tiny_teacher_dir, lee_file, tmp_path):
    recipe = write_recipe(tmp_path, tiny_teacher_dir, lee_file)
    assert cli("run", recipe).exit_code == 0
    forced = cli("distill", recipe, "--force")
    assert forced.exit_code == 0, forced.output
    after = cli("run", recipe)
    assert skipped(after, "data") and skipped(after, "distill"), after.output
    assert not skipped(after, "evaluate"), after.output


# ---------------------------------------------------------------- missing outputs, checkpoints


def test_deleted_student_weights_are_restored_from_the_final_checkpoint_without_retraining(
        tiny_teacher_dir, lee_file, tmp_path):
    recipe = write_recipe(tmp_path, tiny_teacher_dir, lee_file)
    assert cli("run", recipe).exit_code == 0
    run = tmp_path / "runs" / "v"
    log_before = (run / "train.jsonl").read_text()
    weights = run / "student" / "model.safetensors"
    expected = weights.read_bytes()
    weights.unlink()
    again = cli("run", recipe)
    assert again.exit_code == 0, again.output
    assert any("student/model.safetensors is missing" in line for line in stage_lines(again, "distill"))
    assert "distill: resuming from step 4" in again.output, again.output
    assert (run / "train.jsonl").read_text() == log_before  # no step was trained again
    assert weights.read_bytes() == expected


def test_a_changed_output_is_noticed(tiny_teacher_dir, lee_file, tmp_path):
    recipe = write_recipe(tmp_path, tiny_teacher_dir, lee_file)
    assert cli("run", recipe).exit_code == 0
    summary = tmp_path / "runs" / "v" / "eval" / "summary.json"
    summary.write_text(summary.read_text().replace('"perplexity"', '"perplexity" ', 1))
    again = cli("run", recipe)
    assert any("eval/summary.json changed" in line for line in stage_lines(again, "evaluate")), again.output


def test_unreadable_checkpoints_refuse_a_silent_restart(tiny_teacher_dir, lee_file, tmp_path):
    recipe = write_recipe(tmp_path, tiny_teacher_dir, lee_file)
    assert cli("run", recipe).exit_code == 0
    run = tmp_path / "runs" / "v"
    for ckpt in (run / "checkpoints").glob("step-*.pt"):
        ckpt.write_bytes(b"not a checkpoint")
    (run / "student" / "model.safetensors").unlink()
    refused(cli("run", recipe), "no checkpoint can be read", "step-000004.pt", "--force")
    forced = cli("run", recipe, "--force")
    assert forced.exit_code == 0, forced.output
    assert len((run / "train.jsonl").read_text().splitlines()) == FAST["steps"]


# ---------------------------------------------------------------- non-finite training


def test_a_nan_teacher_stops_training_naming_the_step_and_terms(tiny_teacher_dir, lee_file, tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_teacher_dir)
    with torch.no_grad():
        model.model.norm.weight.fill_(float("nan"))  # every logit of the teacher is NaN
    model.save_pretrained(tiny_teacher_dir)
    recipe = write_recipe(tmp_path, tiny_teacher_dir, lee_file, student={"config": {"num_hidden_layers": 2}})
    line = refused(cli("run", recipe), "step 1", "kd=nan", "on_nonfinite")
    assert "not finite" in line
    run = tmp_path / "runs" / "v"
    assert not (run / "student").exists() and not list((run / "checkpoints").glob("step-*.pt"))
    # (evaluation of a NaN teacher's calibration is itself refused, so it is left out here)
    skip = cli("run", recipe, "--set", "distill.on_nonfinite=skip", "--set", "evaluate.calibration=false")
    assert skip.exit_code == 0, skip.output
    assert sum("update skipped" in line for line in skip.output.splitlines()) == FAST["steps"]
    from safetensors.torch import load_file

    assert all(torch.isfinite(t).all() for t in load_file(run / "student" / "model.safetensors").values())


# ---------------------------------------------------------------- names, paths, permissions


@pytest.mark.parametrize("name", ["..", "."])
def test_run_names_that_escape_the_run_folder_are_refused(tiny_teacher_dir, lee_file, tmp_path, name):
    recipe = write_recipe(tmp_path, tiny_teacher_dir, lee_file)
    refused(cli("validate", recipe, "--set", f"name={name}"), "name", "not a folder of its own")
    refused(cli("run", recipe, "--set", f"name={name}"), "name")
    assert not (tmp_path / "manifest.json").exists() and not (tmp_path / "runs" / "manifest.json").exists()


def test_a_run_touches_nothing_outside_its_run_folder(tiny_teacher_dir, lee_file, tmp_path):
    recipe = write_recipe(tmp_path, tiny_teacher_dir, lee_file)

    def outside():
        return {str(p.relative_to(tmp_path)): p.stat().st_mtime_ns for p in tmp_path.rglob("*")
                if not p.is_relative_to(tmp_path / "runs" / "v") and not p.is_relative_to(tmp_path / "cache")}

    before = outside()
    assert cli("run", recipe).exit_code == 0
    assert outside() == {**before, "runs": outside()["runs"]}  # only runs/ itself was created


def test_relative_paths_are_taken_from_the_recipe_folder(tiny_teacher_dir, lee_file, tmp_path, monkeypatch):
    folder = tmp_path / "project"
    folder.mkdir()
    (folder / "corpus.txt").write_text(lee_file.read_text())
    recipe = tiny_recipe(tmp_path, tiny_teacher_dir, lee_file)
    recipe["data"]["source"]["path"] = "corpus.txt"
    recipe["run_dir"] = "out"
    (folder / "r.yaml").write_text(yaml.safe_dump(recipe))
    monkeypatch.chdir(tmp_path)  # not the recipe's folder
    ok = cli("validate", folder / "r.yaml")
    assert ok.exit_code == 0 and str(folder / "out" / "v") in ok.output, ok.output
    recipe["teacher"]["model"] = "./no-such-teacher"
    (folder / "r.yaml").write_text(yaml.safe_dump(recipe))
    refused(cli("validate", folder / "r.yaml"), "teacher.model", "no-such-teacher")


def test_finished_run_is_readable_by_group_and_others_under_umask_022(tiny_teacher_dir, lee_file, tmp_path):
    old = os.umask(0o022)
    try:
        recipe = write_recipe(tmp_path, tiny_teacher_dir, lee_file)
        assert cli("run", recipe).exit_code == 0
    finally:
        os.umask(old)
    private = [str(p) for p in (tmp_path / "runs" / "v").rglob("*")
               if stat.S_IMODE(p.stat().st_mode) & 0o044 != 0o044]
    assert not private


# ---------------------------------------------------------------- bad recipes, flags and files


def test_bad_recipe_files_and_flags_are_one_line_errors(tiny_teacher_dir, lee_file, tmp_path):
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes("name: caf\xe9\n".encode("latin-1"))
    refused(cli("validate", latin1), "latin1.yaml", "UTF-8")
    recipe = write_recipe(tmp_path, tiny_teacher_dir, lee_file)
    refused(cli("validate", recipe, "--set", "distill.lr=[1,"), "--set", "distill.lr=[1,")
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    refused(cli("validate", empty, "--set", "distill.steps=3"), "empty.yaml", "Field required")
    refused(cli("validate", recipe, "--set", "distill.steps=true"), "distill.steps")
    refused(cli("validate", recipe, "--set", "distill.steps=0"), "distill.steps")
    refused(cli("validate", recipe, "--set", "distill.warmup_steps=9"), "warmup_steps")


def test_a_manifest_of_the_wrong_shape_is_refused_by_name(tiny_teacher_dir, lee_file, tmp_path):
    recipe = write_recipe(tmp_path, tiny_teacher_dir, lee_file)
    run = tmp_path / "runs" / "v"
    run.mkdir(parents=True)
    (run / "manifest.json").write_text(json.dumps(["not", "a", "manifest"]))
    refused(cli("run", recipe), "manifest.json", "not a Distillery manifest")


def test_an_unwritable_run_folder_is_a_one_line_error(tiny_teacher_dir, lee_file, tmp_path):
    recipe = write_recipe(tmp_path, tiny_teacher_dir, lee_file)
    (tmp_path / "runs").write_text("a file where the run folder should go")
    refused(cli("run", recipe), "runs")


# ---------------------------------------------------------------- the logit store


def test_a_flipped_byte_in_the_store_is_refused_by_distill_and_repaired(tiny_teacher_dir, lee_file, tmp_path):
    recipe = write_recipe(tmp_path, tiny_teacher_dir, lee_file, capture={"k": 16, "temperature": 1.0},
                          distill={"teacher_source": "store"})
    run = tmp_path / "runs" / "v"
    assert cli("prepare", recipe).exit_code == 0 and cli("capture", recipe).exit_code == 0
    shard = sorted((run / "logits").glob("shard-*"))[0]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    line = refused(cli("distill", recipe), shard.name)
    assert "capture" in line
    assert not (run / "train.jsonl").exists()  # not one step ran on the damaged store
    assert cli("capture", recipe, "--repair").exit_code == 0
    assert cli("run", recipe).exit_code == 0
    damaged_then_repaired = [json.loads(x)["loss"] for x in (run / "train.jsonl").read_text().splitlines()]
    clean = write_recipe(tmp_path / "clean", tiny_teacher_dir, lee_file, capture={"k": 16, "temperature": 1.0},
                         distill={"teacher_source": "store"})
    assert cli("run", clean).exit_code == 0
    undamaged = [json.loads(x)["loss"] for x in (tmp_path / "clean" / "runs" / "v" / "train.jsonl")
                 .read_text().splitlines()]
    assert damaged_then_repaired == undamaged
