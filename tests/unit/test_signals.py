"""Teacher signals: online placement, ensembles, and a served teacher over real HTTP."""

from __future__ import annotations

import pytest
import torch
import transformers

from distillery.signals.ensemble import EnsembleTeacher
from distillery.signals.online import OnlineTeacher
from distillery.signals.served import ServedTeacher, ServedTeacherError
from tests.model_server import serve

VOCAB = 200


def tiny_model(seed: int) -> transformers.LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, intermediate_size=64)
    return transformers.LlamaForCausalLM(cfg).eval()


def online(seed: int, k: int | None = None, fp: str = "fp", temperature: float = 1.0) -> OnlineTeacher:
    return OnlineTeacher(tiny_model(seed), model_id=f"tiny-{seed}", tokenizer_fingerprint=fp, top_k=k,
                         temperature=temperature)


X = torch.randint(0, VOCAB, (4, 10), generator=torch.Generator().manual_seed(0))


# ---------------------------------------------------------------- online placement


def test_online_top_k_matches_float64_softmax():
    t = online(0, k=8, temperature=2.0)
    sig = t(X)
    with torch.no_grad():
        ref = torch.log_softmax(t.model(input_ids=X).logits.double() / 2.0, -1)
    vals, ids = ref.topk(8, -1)
    assert torch.equal(sig.topk_ids, ids)
    torch.testing.assert_close(sig.topk_logprobs.double(), vals, atol=1e-5, rtol=0)
    torch.testing.assert_close(sig.tail_mass.double(), 1 - vals.exp().sum(-1), atol=1e-5, rtol=0)


def test_online_teacher_in_bf16_and_int8_beside_fp32_input():
    ref = online(0, k=8)(X)
    for dtype in ("bfloat16", "int8"):
        t = OnlineTeacher(tiny_model(0), model_id="t", tokenizer_fingerprint="fp", top_k=8, dtype=dtype)
        sig = t(X)
        assert sig.topk_logprobs.dtype == torch.float32 and sig.topk_ids.device == X.device
        # a lower-precision teacher agrees on the top token almost everywhere
        assert (sig.topk_ids[..., 0] == ref.topk_ids[..., 0]).float().mean() > 0.8
    with pytest.raises(ValueError, match="dtype 'int4'"):
        OnlineTeacher(tiny_model(0), model_id="t", tokenizer_fingerprint="fp", dtype="int4")


# ---------------------------------------------------------------- ensembles


@pytest.mark.parametrize("k", [None, 8])
def test_ensemble_with_weight_one_reproduces_that_teacher_exactly(k):
    a, b = online(0, k), online(1, k)
    for weights, single in (([1.0, 0.0], a), ([0.0, 1.0], b)):
        got, ref = EnsembleTeacher([a, b], weights)(X), single(X)
        for name in ("logits", "topk_ids", "topk_logprobs", "tail_mass"):
            if getattr(ref, name) is not None:
                assert torch.equal(getattr(got, name), getattr(ref, name)), name


def test_dense_ensemble_mixes_probabilities_not_logits():
    a, b = online(0), online(1)
    got = EnsembleTeacher([a, b], [0.25, 0.75])(X)
    ref = 0.25 * torch.softmax(a(X).logits.double(), -1) + 0.75 * torch.softmax(b(X).logits.double(), -1)
    torch.testing.assert_close(torch.softmax(got.logits.double(), -1), ref, atol=1e-6, rtol=0)


def test_sparse_ensemble_matches_a_float64_mixture_of_the_top_k():
    a, b = online(0, 8), online(1, 8)
    got = EnsembleTeacher([a, b], [0.5, 0.5])(X)
    # reference: each teacher's top-k as a sparse vector over the vocabulary, mixed, top-k again
    dense = torch.zeros(*X.shape, VOCAB, dtype=torch.float64)
    for w, t in ((0.5, a), (0.5, b)):
        s = t(X)
        dense.scatter_add_(-1, s.topk_ids, w * s.topk_logprobs.double().exp())
    vals, ids = dense.topk(8, -1)
    torch.testing.assert_close(got.topk_logprobs.double().exp(), vals, atol=1e-6, rtol=0)
    # ids agree wherever the reference has no ties at the k-th place
    assert (got.topk_ids.sort(-1).values == ids.sort(-1).values).float().mean() > 0.99
    torch.testing.assert_close(got.tail_mass.double(), 1 - vals.sum(-1), atol=1e-6, rtol=0)


def test_routing_by_a_field_and_per_example_weights():
    a, b = online(0, 8), online(1, 8)
    routed = EnsembleTeacher([a, b], route_by="domain", routes={"law": 0, "news": 1})
    got = routed(X, domain=["law", "news", "news", "law"])
    ra, rb = a(X), b(X)
    for row, ref in ((0, ra), (1, rb), (2, rb), (3, ra)):
        assert torch.equal(got.topk_ids[row], ref.topk_ids[row])
        assert torch.equal(got.topk_logprobs[row], ref.topk_logprobs[row])
    with pytest.raises(ValueError, match="domain='sport' has no route"):
        routed(X, domain=["law", "sport", "news", "law"])
    per = EnsembleTeacher([a, b], per_example_weights="w")
    w = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5], [1.0, 0.0]])
    got = per(X, w=w)
    assert torch.equal(got.topk_ids[1], rb.topk_ids[1]) and torch.equal(got.topk_ids[3], ra.topk_ids[3])
    mixed = EnsembleTeacher([a, b], [0.5, 0.5])(X)
    torch.testing.assert_close(got.topk_logprobs[2], mixed.topk_logprobs[2])


def test_ensemble_refuses_teachers_with_different_tokenizers_or_kinds():
    with pytest.raises(ValueError, match="teacher 1 \\(tiny-1\\) has a different tokenizer"):
        EnsembleTeacher([online(0), online(1, fp="other")])
    with pytest.raises(ValueError, match="k differs"):
        EnsembleTeacher([online(0, 8), online(1, 4)])
    with pytest.raises(ValueError, match="dense"):
        EnsembleTeacher([online(0, 8), online(1)])
    with pytest.raises(ValueError, match="weights"):
        EnsembleTeacher([online(0), online(1)], [0.0, 0.0])


# ---------------------------------------------------------------- served teacher over HTTP


@pytest.fixture
def server():
    with serve(tiny_model(0)) as state:
        yield state.url


def test_served_teacher_matches_the_online_teacher(server):
    served = ServedTeacher(server, "tiny", tokenizer_fingerprint="fp", top_k=8)
    got, ref = served(X), online(0, 8)(X)
    assert torch.equal(got.topk_ids, ref.topk_ids)
    torch.testing.assert_close(got.topk_logprobs, ref.topk_logprobs, atol=1e-6, rtol=0)
    torch.testing.assert_close(got.tail_mass, ref.tail_mass, atol=1e-5, rtol=0)


def test_served_teacher_with_padding_sends_only_real_tokens(server):
    served = ServedTeacher(server, "tiny", tokenizer_fingerprint="fp", top_k=8)
    mask = torch.ones_like(X)
    mask[1, 6:] = 0  # right padding
    got = served(X, mask)
    ref = online(0, 8)(X[1:2, :6])
    assert torch.equal(got.topk_ids[1, :6], ref.topk_ids[0])


def test_served_teacher_errors_name_the_url(server):
    with pytest.raises(ServedTeacherError, match=r"/v1/completions: HTTP 404"):
        ServedTeacher(server, "other", tokenizer_fingerprint="fp", top_k=8)(X)
    with pytest.raises(ServedTeacherError, match="cannot reach"):
        ServedTeacher("http://127.0.0.1:9", "tiny", tokenizer_fingerprint="fp", top_k=8, timeout=5)(X)
