"""The logit store and ensembles on the real SmolLM2-135M teacher (vocab 49152)."""

from __future__ import annotations

import copy

import pytest
import torch

from distillery.data.sources import read_austen, to_blocks
from distillery.models.load import load_model
from distillery.signals.capture import capture
from distillery.signals.ensemble import EnsembleTeacher
from distillery.signals.online import OnlineTeacher
from distillery.signals.store import LogitStore, StoredTeacher, inspect

pytestmark = pytest.mark.slow
TEACHER = "builtin:smollm2-135m-instruct"


@pytest.fixture(scope="module")
def real():
    loaded = load_model(TEACHER, device="cpu", dtype="float32")
    train, _ = to_blocks(read_austen(["persuasion"]), loaded.tokenizer, 64, 0.1)
    return loaded, train[:4]


def seeded_cut(model: torch.nn.Module, n_keep: int, seed: int) -> torch.nn.Module:
    """A copy of the teacher keeping ``n_keep`` decoder layers chosen at random by ``seed``."""
    keep = sorted(torch.randperm(len(model.model.layers), generator=torch.Generator().manual_seed(seed))[:n_keep].tolist())
    cut = copy.deepcopy(model)
    cut.model.layers = torch.nn.ModuleList([cut.model.layers[i] for i in keep])
    for new, layer in enumerate(cut.model.layers):
        layer.self_attn.layer_idx = new
    cut.config.num_hidden_layers = n_keep
    if getattr(cut.config, "layer_types", None):
        cut.config.layer_types = [cut.config.layer_types[i] for i in keep]
    return cut.eval()


def test_store_on_the_real_teacher_fits_256_bytes_per_token(real, tmp_path):
    loaded, x = real
    teacher = OnlineTeacher(loaded.model, model_id=TEACHER, tokenizer_fingerprint=loaded.fingerprint, top_k=64)
    store = capture(teacher, x, tmp_path / "logits", k=64, shard_tokens=128, progress=False)
    store.verify()
    assert store.manifest["id_dtype"] == "uint16" and store.manifest["vocab_size"] == 49152
    assert store.bytes_on_disk() / x.numel() <= 256
    assert "bytes/token" in inspect(store.path)
    ref = teacher(x)
    got = StoredTeacher(LogitStore(store.path))(x, example_ids=range(len(x)))
    assert torch.equal(got.topk_ids, ref.topk_ids)
    assert (got.topk_logprobs - ref.topk_logprobs).abs().max() < 0.05
    store.check_compatible(tokenizer_fingerprint=loaded.fingerprint, k=64, temperature=1.0)
    with pytest.raises(ValueError, match="temperature differs"):
        store.check_compatible(temperature=2.0)


def test_ensemble_of_the_teacher_and_a_seeded_cut(real, tmp_path):
    loaded, x = real
    fp = loaded.fingerprint
    a = OnlineTeacher(loaded.model, model_id=TEACHER, tokenizer_fingerprint=fp, top_k=64)
    b = OnlineTeacher(seeded_cut(loaded.model, 20, seed=1), model_id="cut-20-seed1", tokenizer_fingerprint=fp,
                      top_k=64)
    ref = a(x)
    solo = EnsembleTeacher([a, b], [1.0, 0.0])(x)
    assert torch.equal(solo.topk_ids, ref.topk_ids) and torch.equal(solo.topk_logprobs, ref.topk_logprobs)
    assert torch.equal(solo.tail_mass, ref.tail_mass)
    both = EnsembleTeacher([a, b], [0.5, 0.5])
    store = capture(both, x, tmp_path / "ens", k=64, progress=False)
    store.verify()
    mixed = StoredTeacher(store)(x, example_ids=range(len(x)))
    assert store.manifest["teacher"]["model_id"] == f"ensemble({TEACHER},cut-20-seed1)"
    assert (mixed.topk_ids[..., 0] != ref.topk_ids[..., 0]).any()  # the cut really moves the mixture
    assert ((mixed.topk_logprobs.exp().sum(-1) + mixed.tail_mass - 1).abs() < 0.02).all()
