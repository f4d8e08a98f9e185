"""The sampled-token (RS-KD) forward-KL estimator: unbiased in value and gradient against the dense
float64 reference, its fused chunk gradient equal to autograd through the plain definition, and the
divergences it cannot estimate refused by name."""

from __future__ import annotations

import pytest
import torch

from distillery.losses.divergences import KDOptions, per_token_divergence, token_kd_loss
from distillery.signals.base import Signal, TeacherIdentity
from distillery.signals.sampled import draw, example_generator, sampled_signal, unique_counts

V, ROWS, M = 40, 3, 6000
IDENT = TeacherIdentity("t", "fp", temperature=1.0, k=0)


def logits(seed: int, sharp: float) -> torch.Tensor:
    return torch.randn(ROWS, V, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * sharp


def dense_kl_and_grad(t: torch.Tensor, s: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    leaf = s.clone().requires_grad_(True)
    p = torch.softmax(t / temperature, -1)
    kl = (p * (p.log() - torch.log_softmax(leaf / temperature, -1))).sum(-1)
    (g,) = torch.autograd.grad(kl.sum(), leaf)
    return kl.detach(), g


@pytest.mark.parametrize("k, draws, temperature", [(0, 4, 1.0), (0, 12, 2.0), (4, 6, 1.0)])
def test_the_sampled_estimate_is_unbiased_in_value_and_gradient(k, draws, temperature):
    t, s = logits(0, 2.5), logits(1, 1.5)
    want_kl, want_g = dense_kl_and_grad(t, s, temperature)
    ident = TeacherIdentity("t", "fp", temperature=temperature, k=k)
    # M independent draws of every row at once: [M, ROWS, V]
    sig = sampled_signal(t.expand(M, ROWS, V), ident, k=k, draws=draws, generator=torch.Generator().manual_seed(2),
                         temperature=temperature)
    leaf = s.expand(M, ROWS, V).clone().requires_grad_(True)
    opts = KDOptions(divergence="forward_kl", temperature=temperature)
    slots = sig.sample_ids.shape[-1]
    flat = Signal(ident, sample_ids=sig.sample_ids.reshape(-1, slots), sample_weights=sig.sample_weights.reshape(-1, slots),
                  entropy=sig.entropy.reshape(-1))
    est = per_token_divergence(leaf.reshape(-1, V), flat, opts).reshape(M, ROWS)
    (g,) = torch.autograd.grad(est.sum(), leaf)  # per-draw gradient of each row's estimate
    # The mean of M draws is within 5 standard errors of the dense value (and the estimate is not
    # exact). A token too rare to be drawn in M * draws tries has an observed error of 0; the floor
    # 5 / (M * draws) covers it (its own standard error is about sqrt(p / (M * draws)) < that).
    floor = 5.0 / (M * draws)
    se = est.std(0) / M**0.5
    assert ((est.mean(0) - want_kl).abs() <= 5 * se + floor).all(), (est.mean(0), want_kl, se)
    assert (est.std(0) > 0).all()
    g_se = g.std(0) / M**0.5
    assert ((g.mean(0) - want_g).abs() <= 5 * g_se + floor).all()
    # the weights sum to one exactly (no proposal other than p): the gradient's q term is exact
    torch.testing.assert_close(sig.sample_weights.sum(-1), torch.ones(M, ROWS, dtype=torch.float64))


def test_a_biased_estimator_would_fail_this_test():
    """The same check catches the top-k bias the sampled encoding removes: top-4 renormalised is off."""
    t, s = logits(0, 2.5), logits(1, 1.5)
    want_kl, _ = dense_kl_and_grad(t, s, 1.0)
    logp = torch.log_softmax(t, -1)
    top, ids = logp.topk(4, -1)
    sig = Signal(IDENT, topk_ids=ids, topk_logprobs=top)
    got = per_token_divergence(s, sig, KDOptions(tail="renormalize"))
    assert ((got - want_kl).abs() > 1e-3).any()


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_the_fused_loss_and_gradient_equal_autograd_through_the_definition(temperature):
    t = torch.randn(2, 5, V, dtype=torch.float64, generator=torch.Generator().manual_seed(3)) * 2
    s = torch.randn(2, 5, V, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    ident = TeacherIdentity("t", "fp", temperature=temperature, k=3)
    sig = sampled_signal(t, ident, k=3, draws=8, generator=torch.Generator().manual_seed(5), temperature=temperature)
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1, 4] = False
    leaf = s.clone().requires_grad_(True)
    fused = token_kd_loss(leaf, sig, mask, temperature=temperature, chunk_size=3)
    (g_fused,) = torch.autograd.grad(fused, leaf)
    leaf2 = s.clone().requires_grad_(True)
    flat = Signal(ident, sample_ids=sig.sample_ids.reshape(10, -1), sample_weights=sig.sample_weights.reshape(10, -1),
                  entropy=sig.entropy.reshape(10))
    plain = per_token_divergence(leaf2.reshape(-1, V), flat, KDOptions(temperature=temperature)).reshape(2, 5)
    plain = (plain * mask).sum() / mask.sum() * temperature**2
    (g_plain,) = torch.autograd.grad(plain, leaf2)
    torch.testing.assert_close(fused, plain)
    torch.testing.assert_close(g_fused, g_plain)
    one = sig.select((slice(0, 1), slice(0, 2)))  # gradcheck's finite differences: a small input
    assert torch.autograd.gradcheck(lambda x: token_kd_loss(x, one, mask[:1, :2], temperature=temperature, chunk_size=1),
                                    (s[:1, :2].clone().requires_grad_(True),))


def test_other_divergences_are_refused_by_name():
    t = logits(0, 1.0)
    sig = sampled_signal(t, IDENT, k=0, draws=4, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="divergence 'reverse_kl'.*forward_kl only"):
        token_kd_loss(logits(1, 1.0), sig, torch.ones(ROWS, dtype=torch.bool), divergence="reverse_kl")


def test_draws_are_deterministic_per_example_and_counts_are_exact():
    logp = torch.log_softmax(logits(0, 2.0), -1)
    a = draw(logp, k=2, draws=16, generator=example_generator(7, 3))
    b = draw(logp, k=2, draws=16, generator=example_generator(7, 3))
    c = draw(logp, k=2, draws=16, generator=example_generator(7, 4))
    assert all(torch.equal(a[key], b[key]) for key in a)
    assert not torch.equal(a["sample_ids"], c["sample_ids"])
    assert (a["sample_counts"].sum(-1) == 16).all()
    # drawn ids are outside the top k
    live = a["sample_counts"] > 0
    assert not (a["sample_ids"].unsqueeze(-1) == a["topk_ids"].unsqueeze(1))[live].any()
    ids, counts = unique_counts(torch.tensor([[5, 1, 5, 5], [2, 2, 2, 2]]))
    assert ids.tolist() == [[1, 5, 0, 0], [2, 0, 0, 0]] and counts.tolist() == [[1, 3, 0, 0], [4, 0, 0, 0]]
