"""GGUF export, verified by reading the file back with transformers' GGUF loader."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from distillery.compress.gguf_export import (
    ExportError,
    export_gguf,
    export_gguf_folder,
    load_gguf_back,
    permute_rope,
)
from distillery.compress.lowrank import factorize, save_lowrank
from distillery.compress.prune import prune
from tests.helpers import tiny_llama

TEMPLATE = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|endoftext|>{% endfor %}"
PROMPT = "The Prime Minister said on Monday that the"


@pytest.fixture
def tokenizer(tiny_tokenizer):
    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = TEMPLATE
    return tok


@torch.no_grad()
def _compare(source, back, ids):
    a, b = source(input_ids=ids).logits, back(input_ids=ids).logits
    return ((a - b).norm() / a.norm()).item()


@torch.no_grad()
def _greedy(model, ids, n=24):
    return model.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=0)[0, ids.shape[1]:].tolist()


# Relative logit error after the round trip: F16 rounds to 11 significant bits (~3e-4 measured),
# Q8_0 keeps 8 bits per 32-block with an f16 scale (~7e-3), Q4_0 4 bits (~2e-2): bounds ~4x those.
@pytest.mark.parametrize("out_type, bound", [("F16", 2e-3), ("Q8_0", 3e-2), ("Q4_0", 8e-2)])
def test_round_trip_through_transformers_gguf_loader(out_type, bound, trained_tiny_teacher, tokenizer, tmp_path):
    path = export_gguf(trained_tiny_teacher, tokenizer, tmp_path / f"tiny-{out_type}.gguf", out_type)
    model, tok = load_gguf_back(path)
    ids = tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    assert 0 < _compare(trained_tiny_teacher, model, ids) < bound
    text = "Sydney's bushfires: 1,200 firefighters, 3 helicopters."
    assert tok(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert tok.chat_template == TEMPLATE and tok.eos_token == "<|endoftext|>"
    if out_type in ("F16", "Q8_0"):
        assert _greedy(model, ids) == _greedy(trained_tiny_teacher, ids)


def test_sizes_fall_with_the_type(trained_tiny_teacher, tokenizer, tmp_path):
    sizes = {t: export_gguf(trained_tiny_teacher, tokenizer, tmp_path / f"{t}.gguf", t).stat().st_size
             for t in ("F32", "F16", "Q8_0", "Q4_0")}
    assert sizes["F32"] > sizes["F16"] > sizes["Q8_0"] > sizes["Q4_0"]
    assert sizes["Q8_0"] < 0.6 * sizes["F16"]


def test_pruned_model_with_explicit_head_dim_round_trips(tokenizer, tmp_path):
    model = tiny_llama(hidden=64, heads=4, kv_heads=2)
    blocks = torch.randint(0, 512, (4, 32), generator=torch.Generator().manual_seed(0))
    small = prune(model, blocks, heads=0.5, hidden=0.25, mlp_channels=0.25).model
    assert small.config.head_dim * small.config.num_attention_heads != small.config.hidden_size
    # hidden 48 is not a whole number of 32-blocks: those tensors fall back to F16
    back, _ = load_gguf_back(export_gguf(small, tokenizer, tmp_path / "p.gguf", "Q8_0"))
    assert back.config.head_dim == 16 and back.config.hidden_size == 48
    ids = tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    assert _compare(small, back, ids) < 3e-2
    assert _greedy(back, ids) == _greedy(small, ids)


def test_factored_folder_is_folded_on_export(trained_tiny_teacher, tokenizer, tmp_path):
    model = copy.deepcopy(trained_tiny_teacher)
    factorize(model, "model.layers.*.mlp.*", rank=12)
    folder = save_lowrank(model, tmp_path / "lr", tokenizer)
    back, _ = load_gguf_back(export_gguf_folder(folder, tmp_path / "lr.gguf", "F16"))
    ids = tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    assert _compare(model, back, ids) < 2e-3


def test_permutation_matches_llama_cpp_and_is_undone_by_transformers():
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    w = np.arange(32 * 3, dtype=np.float32).reshape(32, 3)
    q = permute_rope(w, 4)  # as q: 4 heads of 8 rows
    # rotate-half pairs (i, i + 4) of each head become neighbours (2i, 2i + 1)
    assert np.array_equal(q[1], w[4]) and np.array_equal(q[2], w[1]) and np.array_equal(q[9], w[12])
    k = permute_rope(w, 4, 2)  # as k: 2 key/value heads of 16 rows
    assert np.array_equal(k[1], w[8]) and not np.array_equal(k, q)
    undo = LlamaTensorProcessor(config={"num_attention_heads": 4, "num_key_value_heads": 2})
    assert np.array_equal(undo._reverse_permute_weights(q, 4, 4), w)
    assert np.array_equal(undo._reverse_permute_weights(k, 4, 2), w)


def test_bad_requests_are_refused(trained_tiny_teacher, tokenizer, tmp_path):
    with pytest.raises(ExportError, match="^out_type:"):
        export_gguf(trained_tiny_teacher, tokenizer, tmp_path / "x.gguf", "Q3_K")
    qwen = copy.deepcopy(trained_tiny_teacher)
    qwen.config.model_type = "qwen2"
    with pytest.raises(ExportError, match="^model_type:"):
        export_gguf(qwen, tokenizer, tmp_path / "x.gguf")
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".*.tmp"))


@pytest.mark.slow
def test_real_teacher_export_mirrors_llama_cpp_and_greedy_text_survives_q8(tmp_path):
    """The builtin teacher's own GGUF was written by llama.cpp: ours has the same tensor names,
    shapes and model keys, and the Q8_0 file generates the same greedy text."""
    from gguf import GGUFReader

    from distillery.models.load import builtin_gguf, load_model

    teacher = load_model("builtin:smollm2-135m-instruct", device="cpu")
    ours = GGUFReader(export_gguf(teacher.model, teacher.tokenizer, tmp_path / "t.gguf", "Q8_0"))
    theirs = GGUFReader(builtin_gguf("smollm2-135m-instruct"))
    assert {t.name: tuple(t.shape) for t in ours.tensors} == {t.name: tuple(t.shape) for t in theirs.tensors}
    keys = {k for k in theirs.fields if k.startswith("llama.") or k.startswith("tokenizer.ggml.")} - {
        "tokenizer.ggml.pre", "tokenizer.ggml.add_space_prefix", "tokenizer.ggml.add_bos_token"}
    for k in sorted(keys):
        assert np.array_equal(np.asarray(ours.fields[k].contents()), np.asarray(theirs.fields[k].contents())), k
    assert ours.fields["tokenizer.chat_template"].contents() == theirs.fields["tokenizer.chat_template"].contents()

    back, tok = load_gguf_back(tmp_path / "t.gguf")
    ids = teacher.tokenizer("It is a truth universally acknowledged, that", return_tensors="pt")["input_ids"]
    assert tok.decode(ids[0]) == teacher.tokenizer.decode(ids[0])
    assert _compare(teacher.model, back, ids) < 5e-2  # measured 0.013
    assert _greedy(back, ids, 32) == _greedy(teacher.model, ids, 32)
