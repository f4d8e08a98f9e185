"""Atomic writes: a file or model folder is either the old one or the whole new one, never half."""

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from distillery.io import atomic_path, atomic_write_bytes, save_model_folder
from tests.helpers import tiny_llama


def test_atomic_path_renames_on_success_and_leaves_the_old_file_on_failure(tmp_path):
    out = tmp_path / "sub" / "blocks.safetensors"
    with atomic_path(out) as tmp:
        assert tmp.parent == out.parent and tmp.name.startswith(".blocks.safetensors.") and tmp.suffix == ".tmp"
        save_file({"x": torch.arange(3)}, str(tmp))
        assert not out.exists()  # nothing at the real name until the block ends
    assert torch.equal(load_file(out)["x"], torch.arange(3))
    with pytest.raises(RuntimeError, match="killed"), atomic_path(out) as tmp:
        save_file({"x": torch.zeros(3)}, str(tmp))
        raise RuntimeError("killed")
    assert torch.equal(load_file(out)["x"], torch.arange(3))
    assert sorted(p.name for p in out.parent.iterdir()) == ["blocks.safetensors"]


def test_atomic_write_bytes_replaces_the_file(tmp_path):
    atomic_write_bytes(tmp_path / "a.bin", b"one")
    atomic_write_bytes(tmp_path / "a.bin", b"two")
    assert (tmp_path / "a.bin").read_bytes() == b"two" and not list(tmp_path.glob(".*.tmp"))


def _same_weights(folder, model):
    loaded = AutoModelForCausalLM.from_pretrained(folder)
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k


def test_a_folder_swap_replaces_the_whole_folder(tmp_path, tiny_tokenizer):
    folder = tmp_path / "student"
    folder.mkdir()
    (folder / "stale.txt").write_text("from an older save")
    model = tiny_llama(layers=1)
    save_model_folder(model, folder, tiny_tokenizer)
    assert not (folder / "stale.txt").exists() and (folder / "tokenizer.json").is_file()
    _same_weights(folder, model)
    assert [p.name for p in tmp_path.iterdir()] == ["student"]  # no temporary folder left beside it


def test_a_files_swap_keeps_the_folder_and_its_other_files(tmp_path):
    folder = tmp_path / "policy"
    folder.mkdir()
    (folder / "tokenizer.json").write_text("{}")  # written by the first sync only
    inode = folder.stat().st_ino
    model = tiny_llama(layers=1, seed=1)
    moved = tiny_llama(layers=1, seed=2)  # training moved the weights; a gathered state_dict holds them
    save_model_folder(model, folder, state_dict=dict(moved.state_dict()), swap="files")
    assert folder.stat().st_ino == inode and (folder / "tokenizer.json").read_text() == "{}"
    _same_weights(folder, moved)  # the state_dict given, not the model's own weights
    assert [p.name for p in tmp_path.iterdir()] == ["policy"]


def test_an_unknown_swap_is_refused_before_writing(tmp_path):
    with pytest.raises(ValueError, match="swap must be"):
        save_model_folder(tiny_llama(layers=1), tmp_path / "m", swap="dir")
    assert not list(tmp_path.iterdir())
