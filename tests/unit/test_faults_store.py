"""The faults of the logit store, the model cache and file permissions that a run survives (the
sibling of test_faults.py): a shard damaged after capture is refused, by name and with the repair
command, before training reads it, and the repair restores the exact run; a store manifest of the
wrong shape or a run folder given for a store is a one-line error; a damaged cached conversion is
found and converted again; every artifact is as readable as the umask says."""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import stat
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from distillery.io import (atomic_folder, atomic_path, atomic_write_bytes, atomic_write_json, atomic_write_text,
                           current_umask, save_model_folder)
from distillery.models.load import (COMPLETE, BUILTINS, ModelLoadError, check_builtins, load_model, materialise_gguf,
                                    verify_materialised)
from distillery.recipe import DistillConfig
from distillery.signals.capture import capture
from distillery.signals.online import OnlineTeacher
from distillery.signals.store import LogitStore, StoredTeacher, StoreError, inspect
from distillery.train.loop import step_indices, train
from tests.helpers import tiny_llama

VOCAB = 300
K = 16


def teacher(seed: int = 0, model_id: str = "tiny-teacher") -> OnlineTeacher:
    return OnlineTeacher(tiny_llama(layers=2, seed=seed, vocab=VOCAB), model_id=model_id,
                         tokenizer_fingerprint="fp-tiny")


def token_blocks(n: int = 24, t: int = 16) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, t), generator=torch.Generator().manual_seed(1))


# every store encoding: the original top-k and the two sampled ones (format 2)
ENCODINGS = {"topk": dict(k=K), "sampled": dict(k=0, encoding="sampled", draws=12),
             "topk_sampled": dict(k=4, encoding="topk_sampled", draws=8)}


def capture_store(folder: Path, t: OnlineTeacher | None = None, blocks: torch.Tensor | None = None,
                  encoding: str = "topk", **kw) -> LogitStore:
    # 3 examples of 16 tokens per shard: 8 shards over 24 blocks
    return capture(t or teacher(), token_blocks() if blocks is None else blocks, folder, shard_tokens=48,
                   progress=False, **ENCODINGS[encoding], **kw)


def flip_byte(path: Path, where: float = 0.5) -> None:
    data = bytearray(path.read_bytes())
    data[int(len(data) * where)] ^= 0x01
    path.write_bytes(bytes(data))


CFG = dict(steps=8, batch_size=2, lr=3e-3, warmup_steps=1, eval_every=100, eval_blocks=1, checkpoint_every=1)


def distil(store: Path, out: Path, **cfg) -> list[dict]:
    student = tiny_llama(layers=1, seed=5, vocab=VOCAB)
    return train(student, StoredTeacher(LogitStore(store)), token_blocks(), DistillConfig(**{**CFG, **cfg}),
                 out_dir=out, progress=False, log=lambda _: None)


def losses(records: list[dict]) -> list[float]:
    return [r["loss"] for r in records]


# ---------------------------------------------------------------- class 1: a shard damaged after capture


def first_step_reading(shard: LogitStore, index: int, cfg: dict) -> int:
    """The first training step (0-based) whose batch holds an example of shard ``index``."""
    info = shard.shards[index]
    for step in range(cfg["steps"]):
        ids = step_indices(step, cfg["batch_size"], len(shard), 0)
        if ((ids >= info.first_example) & (ids < info.first_example + info.examples)).any():
            return step
    raise AssertionError("no step reads this shard; make the run longer")


@pytest.mark.parametrize("index, encoding", [(0, "topk"), (3, "topk"), (7, "topk"), (3, "sampled"),
                                             (7, "topk_sampled")])
def test_a_flipped_byte_in_any_shard_stops_training_before_a_step_reads_it(index, encoding, tmp_path):
    store = capture_store(tmp_path / "logits", encoding=encoding)
    bad = tmp_path / "logits" / store.shards[index].file
    flip_byte(bad)
    first = first_step_reading(store, index, CFG)
    with pytest.raises(StoreError) as err:
        distil(tmp_path / "logits", tmp_path / "run")
    message = str(err.value)
    assert str(bad) in message and "distillery capture RECIPE --repair" in message
    assert "\n" not in message
    # exactly the steps before the first one that needed the damaged shard ran; nothing of it was used
    logged = (tmp_path / "run" / "train.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in logged] == list(range(1, first + 1))
    with pytest.raises(StoreError, match=bad.name):
        LogitStore(tmp_path / "logits").verify()


def test_a_missing_or_truncated_shard_is_named_with_the_repair_command(tmp_path):
    store = capture_store(tmp_path / "logits")
    (tmp_path / "logits" / store.shards[1].file).unlink()
    short = tmp_path / "logits" / store.shards[2].file
    short.write_bytes(short.read_bytes()[:-10])
    with pytest.raises(StoreError) as err:
        LogitStore(tmp_path / "logits").verify()
    assert f"{store.shards[1].file}: missing" in str(err.value) and f"{short}:" in str(err.value)
    assert "--repair" in str(err.value)
    with pytest.raises(StoreError, match="missing.*--repair"):
        LogitStore(tmp_path / "logits").example(store.shards[1].first_example)


def test_repair_recaptures_only_the_damaged_shards_and_the_run_continues_as_if_undamaged(tmp_path):
    clean = capture_store(tmp_path / "clean")
    shutil.copytree(tmp_path / "clean", tmp_path / "logits")
    damaged = tmp_path / "logits"
    # damage the two shards training reaches last, so the run stops part-way, with checkpoints
    order = sorted(range(len(clean.shards)), key=lambda i: first_step_reading(clean, i, CFG))
    flipped, deleted = clean.shards[order[-1]].file, clean.shards[order[-2]].file
    flip_byte(damaged / flipped)
    (damaged / deleted).unlink()
    intact = {clean.shards[i].file: (damaged / clean.shards[i].file).stat().st_mtime_ns for i in order[:-2]}
    manifest_before = (damaged / "manifest.json").read_bytes()

    with pytest.raises(StoreError, match="--repair"):
        distil(damaged, tmp_path / "run")
    stopped_at = len((tmp_path / "run" / "train.jsonl").read_text().splitlines())
    assert stopped_at == first_step_reading(clean, order[-2], CFG) > 0

    said = []
    repaired = capture_store(damaged, repair=True, log=said.append)
    repaired.verify()
    for s in clean.shards:  # the same teacher on the same blocks writes the same bytes
        assert (damaged / s.file).read_bytes() == (tmp_path / "clean" / s.file).read_bytes(), s.file
    assert {f: (damaged / f).stat().st_mtime_ns for f in intact} == intact  # intact shards were not rewritten
    assert (damaged / "manifest.json").read_bytes() == manifest_before  # nothing downstream goes stale
    assert sorted(line.split()[2] for line in said) == sorted([str(damaged / deleted), str(damaged / flipped)])
    capture_store(damaged, repair=True, log=said.append)
    assert "nothing to repair" in said[-1]

    resumed = distil(damaged, tmp_path / "run")  # resumes from the last checkpoint before the refusal
    reference = distil(tmp_path / "clean", tmp_path / "run-clean")
    assert losses(resumed) == losses(reference) and len(reference) == CFG["steps"]


@pytest.mark.parametrize("encoding", ["sampled", "topk_sampled"])
def test_a_sampled_store_is_repaired_to_the_same_bytes_and_trains_as_before(encoding, tmp_path):
    clean = capture_store(tmp_path / "clean", encoding=encoding)
    shutil.copytree(tmp_path / "clean", tmp_path / "logits")
    damaged = tmp_path / "logits"
    flip_byte(damaged / clean.shards[2].file, where=0.95)  # in the packed drawn ids and counts
    (damaged / clean.shards[5].file).unlink()
    with pytest.raises(StoreError, match="--repair"):
        LogitStore(damaged).verify()
    with pytest.raises(StoreError, match="cannot repair: the teacher tiny-teacher no longer gives the outputs"):
        capture_store(damaged, t=teacher(seed=7), repair=True, encoding=encoding)
    capture_store(damaged, repair=True, encoding=encoding).verify()
    for s in clean.shards:  # the same teacher, blocks and seed draw the same tokens
        assert (damaged / s.file).read_bytes() == (tmp_path / "clean" / s.file).read_bytes(), s.file
    cfg = {**CFG, "steps": 3}
    assert losses(distil(damaged, tmp_path / "run", **cfg)) == losses(distil(tmp_path / "clean", tmp_path / "ref", **cfg))


def test_repair_refuses_another_teacher_or_other_blocks(tmp_path):
    store = capture_store(tmp_path / "logits")
    flip_byte(tmp_path / "logits" / store.shards[1].file)
    # a folder whose weights changed keeps its name: the intact shards tell the teachers apart
    with pytest.raises(StoreError, match="cannot repair: the teacher tiny-teacher no longer gives the outputs"):
        capture_store(tmp_path / "logits", t=teacher(seed=7), repair=True)
    with pytest.raises(StoreError, match="cannot repair: blocks_sha256 differs"):
        capture_store(tmp_path / "logits", blocks=token_blocks().flip(0), repair=True)
    with pytest.raises(StoreError, match="cannot repair: teacher differs"):
        capture_store(tmp_path / "logits", t=teacher(model_id="another"), repair=True)
    with pytest.raises(StoreError, match=store.shards[1].file):  # nothing was written by the refusals
        LogitStore(tmp_path / "logits").verify()


def test_a_store_whose_every_shard_is_damaged_is_repaired_from_the_recorded_identity(tmp_path):
    store = capture_store(tmp_path / "clean")
    shutil.copytree(tmp_path / "clean", tmp_path / "logits")
    for s in store.shards:
        flip_byte(tmp_path / "logits" / s.file, where=0.9)
    capture_store(tmp_path / "logits", repair=True).verify()
    for s in store.shards:
        assert (tmp_path / "logits" / s.file).read_bytes() == (tmp_path / "clean" / s.file).read_bytes()


# ---------------------------------------------------------------- classes 7 and 9: manifests and run folders


def test_a_store_manifest_missing_keys_is_refused_naming_them(tmp_path):
    capture_store(tmp_path / "logits")
    mpath = tmp_path / "logits" / "manifest.json"
    m = json.loads(mpath.read_text())
    del m["k"], m["teacher"]["tokenizer_fingerprint"], m["shards"][1]["sha256"]
    mpath.write_text(json.dumps(m))
    with pytest.raises(StoreError) as err:
        LogitStore(tmp_path / "logits")
    message = str(err.value)
    assert message.startswith(f"{mpath}: the manifest is damaged, missing k, teacher.tokenizer_fingerprint, "
                               "shards[1].sha256;") and "capture" in message
    result = CliRunner().invoke(_cli(), ["logits", "inspect", str(tmp_path / "logits")])
    assert result.exit_code == 2 and "Traceback" not in result.output and "missing k" in result.output


@pytest.mark.parametrize("content, words", [
    ("[1, 2]", "not a logit store manifest"),
    ("{not json", "not readable JSON"),
    (json.dumps({"format_version": 7}), "format_version 7 is not supported"),
])
def test_a_store_manifest_of_the_wrong_shape_is_one_store_error(content, words, tmp_path):
    capture_store(tmp_path / "logits")
    (tmp_path / "logits" / "manifest.json").write_text(content)
    with pytest.raises(StoreError, match=words):
        LogitStore(tmp_path / "logits")
    with pytest.raises(StoreError, match=words):  # capture neither resumes nor repairs over it
        capture_store(tmp_path / "logits", repair=True)


def test_a_manifest_cannot_name_a_file_outside_the_store(tmp_path):
    capture_store(tmp_path / "logits")
    mpath = tmp_path / "logits" / "manifest.json"
    m = json.loads(mpath.read_text())
    m["shards"][0]["file"] = "../elsewhere.bin"
    mpath.write_text(json.dumps(m))
    with pytest.raises(StoreError, match=r"shards\[0\].file '../elsewhere.bin' is not a file name in the store"):
        LogitStore(tmp_path / "logits")


def _cli():
    from distillery.cli import app

    return app


def test_logits_verify_and_inspect_follow_a_run_folder_to_its_store(tmp_path):
    run = tmp_path / "runs" / "x"
    capture_store(run / "logits")
    (run / "recipe.yaml").write_text(yaml.safe_dump({"name": "x"}))
    (run / "manifest.json").write_text(json.dumps({"format_version": 1, "stages": {}}))
    assert LogitStore(run).path == run / "logits"
    assert inspect(run).splitlines()[0].endswith(str(run / "logits"))
    result = CliRunner().invoke(_cli(), ["logits", "verify", str(run)])
    assert result.exit_code == 0, result.output
    shutil.rmtree(run / "logits")
    for command in ("verify", "inspect"):
        result = CliRunner().invoke(_cli(), ["logits", command, str(run)])
        assert result.exit_code == 2 and "Traceback" not in result.output, result.output
        assert f"{run} is a run folder, not a logit store" in result.output
        assert "format_version None" not in result.output


# ---------------------------------------------------------------- class 7: a damaged cached conversion


@pytest.fixture
def tiny_gguf(tiny_tokenizer, tmp_path) -> Path:
    from distillery.compress.gguf_export import export_gguf

    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}<|endoftext|>{% endfor %}"
    return export_gguf(tiny_llama(layers=2, seed=3), tok, tmp_path / "tiny.gguf", "F32")


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {k: v.clone() for k, v in load_file(folder / "model.safetensors").items()}  # not views of the file


def test_a_damaged_cached_conversion_is_found_and_converted_again(tiny_gguf, tmp_path, caplog):
    target = tmp_path / "cache" / "models" / "tiny"
    materialise_gguf(tiny_gguf, target)
    record = json.loads((target / COMPLETE).read_text())
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(record["files"])
    assert verify_materialised(target, full=True) == []
    good = _weights(target)

    weights = target / "model.safetensors"
    flip_byte(weights, where=0.7)  # in the tensor data: it would load, as garbage
    problems = verify_materialised(target)
    assert problems == [f"{weights}: sha256 mismatch (damaged since the conversion)"]
    with caplog.at_level(logging.WARNING, logger="distillery.models.load"):
        assert materialise_gguf(tiny_gguf, target) == target
    assert "converting it again" in caplog.text and str(weights) in caplog.text
    assert verify_materialised(target, full=True) == []
    assert all(torch.equal(good[k], v) for k, v in _weights(target).items())

    weights.write_bytes(weights.read_bytes()[:100])
    assert "100 bytes, the conversion wrote" in verify_materialised(target)[0]
    (target / COMPLETE).write_text(json.dumps({"source": str(tiny_gguf)}))  # an older distillery's marker
    assert "records no file checksums" in verify_materialised(target)[0]
    materialise_gguf(tiny_gguf, target)
    assert verify_materialised(target, full=True) == []


def test_the_cheap_check_trusts_an_unchanged_mtime_and_the_full_one_does_not(tiny_gguf, tmp_path):
    target = materialise_gguf(tiny_gguf, tmp_path / "models" / "tiny")
    weights = target / "model.safetensors"
    before = weights.stat()
    flip_byte(weights, where=0.7)
    os.utime(weights, ns=(before.st_atime_ns, before.st_mtime_ns))  # damage that leaves the mtime: bit rot
    assert verify_materialised(target) == []
    assert verify_materialised(target, full=True) == [f"{weights}: sha256 mismatch (damaged since the conversion)"]


def test_a_copied_cache_is_hashed_once_then_trusted(tiny_gguf, tmp_path):
    target = materialise_gguf(tiny_gguf, tmp_path / "models" / "tiny")
    copied = tmp_path / "copy" / "tiny"
    shutil.copytree(target, copied)  # new mtimes, same bytes
    assert verify_materialised(copied) == []
    recorded = json.loads((copied / COMPLETE).read_text())["files"]
    assert all(rec["mtime_ns"] == (copied / name).stat().st_mtime_ns for name, rec in recorded.items())


def test_doctor_check_fails_on_a_damaged_builtin_cache(tiny_gguf, tmp_path):
    name = next(iter(BUILTINS))
    cache = tmp_path / "cache"
    ok, lines = check_builtins(cache)
    assert ok and len(lines) == len(BUILTINS)
    # the check reads only the conversion's record, so a tiny conversion stands in for the builtin's
    target = materialise_gguf(tiny_gguf, cache / "models" / name)
    flip_byte(target / "config.json", where=0.5)
    ok, lines = check_builtins(cache)
    assert not ok
    assert f"{target / 'config.json'}: " in lines[0] and f"delete {target}" in lines[0]


def test_a_damaged_model_folder_is_a_model_load_error_naming_it(tiny_tokenizer, tmp_path):
    folder = tmp_path / "teacher"
    save_model_folder(tiny_llama(layers=1), folder, tiny_tokenizer)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:64])
    with pytest.raises(ModelLoadError, match=f"{folder}.*damaged or incomplete"):
        load_model(str(folder), device="cpu")


# ---------------------------------------------------------------- class 8: permissions


def _modes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): stat.S_IMODE(p.stat().st_mode) for p in [root, *root.rglob("*")]}


@pytest.fixture
def umask():
    old = os.umask(0o022)
    os.umask(old)

    def set_to(value: int) -> None:
        os.umask(value)

    yield set_to
    os.umask(old)


@pytest.mark.parametrize("mask, file_mode, dir_mode", [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700),
                                                      (0o002, 0o664, 0o775)])
def test_every_artifact_follows_the_umask(mask, file_mode, dir_mode, umask, tiny_tokenizer, tmp_path):
    umask(mask)
    assert current_umask() == mask
    out = tmp_path / "run"
    atomic_write_bytes(out / "a.bin", b"x")
    atomic_write_text(out / "report.html", "<html></html>")
    atomic_write_json(out / "eval" / "summary.json", {"ppl": 1.0})
    with atomic_path(out / "blocks.safetensors") as tmp:
        tmp.write_bytes(b"y")
    model = tiny_llama(layers=1)
    save_model_folder(model, out / "student", tiny_tokenizer)
    save_model_folder(model, out / "policy", swap="files")
    save_model_folder(model, out / "policy", tiny_tokenizer, swap="files")  # into an existing folder
    with atomic_folder(out / "compressed" / "q") as tmp:
        (tmp / "sub").mkdir()
        (tmp / "sub" / "w.bin").write_bytes(b"z")
    capture_store(out / "logits")
    modes = _modes(out)
    assert len(modes) > 20
    for name, mode in modes.items():
        is_dir = (out / name).is_dir()
        assert mode == (dir_mode if is_dir else file_mode), (name, oct(mode))
