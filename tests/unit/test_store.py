"""The logit store: format, compression error, crash-safe resume, verification, readers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

from distillery.signals.capture import capture, id_dtype
from distillery.signals.online import OnlineTeacher
from distillery.signals.store import (LogitStore, StoreDataset, StoredTeacher, StoreError, StoreStream,
                                      dequantize_logprobs, inspect, quantize_logprobs)

VOCAB = 300


def tiny_teacher(seed: int = 0, k: int = 16, temperature: float = 1.0) -> OnlineTeacher:
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, intermediate_size=64)
    return OnlineTeacher(transformers.LlamaForCausalLM(cfg), model_id=f"tiny-{seed}", tokenizer_fingerprint="fp-tiny",
                         top_k=k, temperature=temperature)


def blocks(n: int = 10, t: int = 12, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, t), generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def store(tmp_path):
    teacher = tiny_teacher(k=16, temperature=2.0)
    x = blocks()
    return teacher, x, capture(teacher, x, tmp_path / "store", k=16, temperature=2.0, shard_tokens=36, progress=False)


def test_round_trip_matches_the_teacher_top_k(store):
    teacher, x, st = store
    st.verify()
    assert len(st) == 10 and st.complete and len(st.shards) == 4  # 3 + 3 + 3 + 1 examples
    ref = teacher(x)
    got = StoredTeacher(st)(x, example_ids=torch.arange(10))
    assert torch.equal(got.topk_ids, ref.topk_ids)
    assert torch.equal(got.tail_mass, ref.tail_mass)
    # 8-bit codes over each row's range: error at most half a step
    step = (ref.topk_logprobs[..., 0] - ref.topk_logprobs[..., -1]) / 255
    assert ((got.topk_logprobs - ref.topk_logprobs).abs() <= step.unsqueeze(-1) / 2 + 1e-5).all()
    assert torch.equal(got.topk_logprobs[..., 0], ref.topk_logprobs[..., 0])  # the top entry is exact


def sparse_forward_kl64(student_logits, ids, logprobs, tail):
    """float64 reference: KL(teacher top-k + tail bucket || student), per token."""
    s = torch.log_softmax(student_logits.double(), -1)
    sk = s.gather(-1, ids)
    s_tail = torch.log1p(-sk.exp().sum(-1).clamp_max(1 - 1e-12))
    lp = logprobs.double()
    t = tail.double()
    return (lp.exp() * (lp - sk)).sum(-1) + torch.where(t > 0, t * (t.clamp_min(1e-300).log() - s_tail), 0)


@pytest.mark.parametrize("sharpness", [1.0, 3.0, 6.0])
def test_quantisation_against_float64_reference(sharpness):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(256, 4000, generator=g, dtype=torch.float64) * sharpness
    student = logits + torch.randn(256, 4000, generator=g, dtype=torch.float64)
    exact, ids = torch.log_softmax(logits, -1).topk(64, -1)
    tail = 1 - exact.exp().sum(-1)
    codes, top, scale = quantize_logprobs(exact.float())
    back = dequantize_logprobs(codes, top, scale).double()
    step = (exact[:, 0] - exact[:, -1]) / 255
    assert ((back - exact).abs() <= step.unsqueeze(-1) / 2 + 1e-5).all()
    # the error the codec adds to a KD loss (forward KL, tail as a bucket) is far under 1%
    ref = sparse_forward_kl64(student, ids, exact, tail).mean()
    got = sparse_forward_kl64(student, ids, back, tail).mean()
    assert abs(got / ref - 1) < 2e-3


def test_quantisation_survives_minus_infinity():
    lp = torch.tensor([[-0.1, -2.0, float("-inf")]])
    codes, top, scale = quantize_logprobs(lp)
    back = dequantize_logprobs(codes, top, scale)
    assert torch.isfinite(back).all() and back[0, 2] < -50


def test_manifest_records_identity_dtypes_counts_and_error(store):
    _, _, st = store
    m = st.manifest
    assert m["format_version"] == 1 and m["k"] == 16 and m["temperature"] == 2.0
    assert m["teacher"] == {"model_id": "tiny-0", "tokenizer_fingerprint": "fp-tiny"}
    assert m["id_dtype"] == "uint16" and m["tokens"] == 120 and m["examples"] == 10
    assert all(len(s["sha256"]) == 64 for s in m["shards"])
    assert 0 < m["quantization_error"]["mean_abs_logprob"] < 1e-2
    text = inspect(st.path)
    assert "bytes/token" in text and "tiny-0" in text and "16 / 2.0" in text


def test_id_dtype_is_the_smallest_that_fits():
    assert id_dtype(65536) == np.uint16 and id_dtype(65537) == np.int32


def test_flipped_byte_is_named_by_verify(store):
    _, _, st = store
    f = st.path / "shard-00002.bin"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(StoreError, match="shard-00002.bin: sha256 mismatch"):
        LogitStore(st.path).verify()


def test_incompatible_student_or_recipe_is_refused_naming_the_field(store):
    _, _, st = store
    st.check_compatible(tokenizer_fingerprint="fp-tiny", k=16, temperature=2.0)
    with pytest.raises(ValueError, match="tokenizer_fingerprint differs"):
        st.check_compatible(tokenizer_fingerprint="other")
    with pytest.raises(ValueError, match="k differs"):
        st.check_compatible(k=32)
    with pytest.raises(ValueError, match="temperature differs"):
        st.check_compatible(temperature=1.0)


def test_resume_with_different_settings_is_refused(store, tmp_path):
    teacher, x, st = store
    with pytest.raises(StoreError, match="k differs"):
        capture(tiny_teacher(k=8, temperature=2.0), x, st.path, k=8, temperature=2.0, shard_tokens=36, progress=False)
    with pytest.raises(StoreError, match="blocks_sha256 differs"):
        capture(teacher, blocks(seed=9), st.path, k=16, temperature=2.0, shard_tokens=36, progress=False)


def test_capture_refuses_a_sparse_teacher_with_other_k(tmp_path):
    with pytest.raises(ValueError, match="k differs"):
        capture(tiny_teacher(k=8), blocks(), tmp_path / "s", k=16, progress=False)


@pytest.mark.parametrize("encoding, k, draws", [("sampled", 0, 12), ("topk_sampled", 4, 8)])
def test_a_sampled_store_holds_exactly_the_seeded_draws(encoding, k, draws, tmp_path):
    from distillery.signals.sampled import draw, example_generator, weights

    dense = tiny_teacher(k=None, temperature=2.0)
    x = blocks()
    st = capture(dense, x, tmp_path / "s", k=k, temperature=2.0, shard_tokens=36, progress=False, encoding=encoding,
                 draws=draws, seed=3)
    st.verify()
    m = st.manifest
    assert m["format_version"] == 2 and (m["encoding"], m["k"], m["draws"], m["seed"]) == (encoding, k, draws, 3)
    assert f"encoding         {encoding} ({draws} draws per token, seed 3)" in inspect(st.path)
    sig = StoredTeacher(st)(x, example_ids=torch.arange(10))
    assert sig.is_sampled and sig.sample_ids.shape == (10, 12, k + draws)
    logp = torch.log_softmax(dense.model(x).logits.float() / 2.0, -1)
    for i in (0, 4, 9):  # across shards: each example's draws come from its own seeded generator
        want = draw(logp[i], k=k, draws=draws, generator=example_generator(3, i))
        w = weights(want["topk_logprobs"], want["tail"], want["sample_counts"].float(), draws)
        live = w > 0
        got_ids, got_w = sig.sample_ids[i], sig.sample_weights[i]
        assert torch.equal(got_ids[live], torch.cat([want["topk_ids"], want["sample_ids"]], -1)[live])
        assert (got_w[~live] == 0).all()
        torch.testing.assert_close(got_w, w, rtol=2e-2 if k else 0, atol=1e-6 if k else 0)  # top k: 8-bit codes
        torch.testing.assert_close(sig.entropy[i], want["entropy"], rtol=1e-6, atol=1e-6)
    # only the distinct drawn ids are stored: 3 bytes each (uint16 id, uint8 count), no padding
    slots = int((sig.sample_weights[..., k:] > 0).sum())
    per_token = 2 + 3 * k + 1 + 4 * (4 if k else 1)  # input id, top k ids and codes, nsamp, row
    fixed = sum(32 + 8 * (sh.examples + 1) for sh in st.shards)
    assert sum(sh.bytes for sh in st.shards) == fixed + 120 * per_token + 3 * slots
    # a resume in another encoding, with other draws or seed, is refused by name
    for other, field in ((dict(encoding="topk", k=k or 4), "encoding"), (dict(draws=draws + 1), "draws"),
                         (dict(seed=4), "seed")):
        kw = {"k": k, "encoding": encoding, "draws": draws, "seed": 3, **other}
        with pytest.raises(StoreError, match=f"cannot resume: {field} differs"):
            capture(dense, x, st.path, temperature=2.0, shard_tokens=36, progress=False, **kw)


def test_capture_settings_for_the_sampled_encodings_are_checked_by_name(tmp_path):
    dense, x = tiny_teacher(k=None), blocks()
    with pytest.raises(ValueError, match="encoding must be one of topk, sampled, topk_sampled"):
        capture(dense, x, tmp_path / "s", k=4, encoding="rs", progress=False)
    with pytest.raises(ValueError, match="'sampled' keeps no top k; pass k=0"):
        capture(dense, x, tmp_path / "s", k=4, encoding="sampled", draws=8, progress=False)
    with pytest.raises(ValueError, match="draws must be in 1..255"):
        capture(dense, x, tmp_path / "s", k=4, encoding="topk_sampled", draws=0, progress=False)
    with pytest.raises(ValueError, match="needs a dense teacher signal"):
        capture(tiny_teacher(k=8), x, tmp_path / "t", k=8, encoding="topk_sampled", draws=8, progress=False)


def test_stored_teacher_refuses_misaligned_tokens(store):
    _, x, st = store
    with pytest.raises(StoreError, match=r"example\(s\) \[4\]"):
        StoredTeacher(st)(x[[3, 3]], example_ids=[3, 4])
    with pytest.raises(ValueError, match="example_ids"):
        StoredTeacher(st)(x[:2])


def test_stream_splits_ranks_and_workers_disjointly(store):
    _, _, st = store
    for shuffle in (False, True):
        seen = []
        for rank in range(3):
            s = StoreStream(st, rank=rank, world_size=3, shuffle=shuffle, seed=5)
            for worker in range(2):
                seen += s.indices(worker, 2)
        assert sorted(seen) == list(range(10))


def test_dataloader_with_workers_reads_every_example_once(store):
    teacher, x, st = store
    loader = torch.utils.data.DataLoader(StoreStream(st.path, rank=0, world_size=1), batch_size=4, num_workers=2)
    got = torch.cat([b["example_id"] for b in loader])
    assert sorted(got.tolist()) == list(range(10))
    dl = torch.utils.data.DataLoader(StoreDataset(st.path), batch_size=5, num_workers=2)
    batch = next(iter(dl))
    assert torch.equal(batch["input_ids"], x[:5])
    sig = st.signal(batch)
    assert sig.topk_ids.shape == (5, 12, 16) and not sig.is_dense


_CHILD = textwrap.dedent("""
    import sys, time, torch, transformers
    from distillery.signals.capture import capture
    from distillery.signals.online import OnlineTeacher
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=300, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, intermediate_size=64)
    encoding = sys.argv[3]
    k = {"topk": 8, "sampled": 0, "topk_sampled": 4}[encoding]
    inner = OnlineTeacher(transformers.LlamaForCausalLM(cfg), model_id="tiny", tokenizer_fingerprint="fp",
                          top_k=8 if encoding == "topk" else None)
    slow = float(sys.argv[2])
    class Slow:  # the real tiny model, slowed so the parent can kill it between shards
        identity, vocab_size = inner.identity, 300
        def __call__(self, x, am=None, **b):
            time.sleep(slow)
            return inner(x, am)
    x = torch.randint(0, 300, (40, 8), generator=torch.Generator().manual_seed(3))
    capture(Slow(), x, sys.argv[1], k=k, shard_tokens=16, batch_size=2, progress=False, encoding=encoding,
            draws=0 if encoding == "topk" else 6, seed=1)
""")


@pytest.mark.parametrize("encoding", ["topk", "sampled", "topk_sampled"])
def test_sigkill_mid_capture_then_resume_holds_every_example_once(encoding, tmp_path):
    out = tmp_path / "store"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2] / "src")}
    child = subprocess.Popen([sys.executable, "-c", _CHILD, str(out), "0.05", encoding], env=env)
    deadline = time.time() + 60
    try:
        while time.time() < deadline:
            m = out / "manifest.json"
            if m.is_file() and len(json.loads(m.read_text())["shards"]) >= 2:
                break
            assert child.poll() is None, "capture finished before it could be killed"
            time.sleep(0.01)
        child.send_signal(signal.SIGKILL)
    finally:
        child.wait(30)
    partial = LogitStore(out)
    assert not partial.complete and 0 < len(partial) < 40
    subprocess.run([sys.executable, "-c", _CHILD, str(out), "0", encoding], env=env, check=True, timeout=120)
    st = LogitStore(out)
    st.verify()
    assert st.complete and len(st) == 40 and not list(out.glob(".*.tmp"))
    firsts = [s.first_example for s in st.shards]
    assert firsts == list(range(0, 40, 2))  # contiguous, no gap, no overlap
    x = torch.randint(0, 300, (40, 8), generator=torch.Generator().manual_seed(3))
    assert torch.equal(st.batch(range(40))["input_ids"], x)
    if encoding != "topk":  # the sampled signal reads back whole across the resumed shards
        sig = StoredTeacher(st)(x, example_ids=torch.arange(40))
        torch.testing.assert_close(sig.sample_weights.sum(-1), torch.ones(40, 8), rtol=0, atol=2e-2)
