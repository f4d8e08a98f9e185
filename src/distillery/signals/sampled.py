"""Sampled teacher signals (RS-KD, arXiv 2503.16870): tokens drawn from the teacher's distribution,
with weights, in place of (or next to) its top k.

Top-k caching is biased: the student is taught a distribution that is zero (or one lumped bucket)
outside the k ids. Drawing N tokens from ``p`` and giving each distinct id the weight count / N makes
the weights' expectation ``p`` itself, so a loss linear in ``p`` and its gradient are estimated
without bias. The forward KL is one: ``KL(p || q) = -H(p) - sum_i p_i log q_i``, so with ``H(p)``
kept per token (one number) the estimate ``-H(p) - sum_s w_s log q(id_s)`` is unbiased in value
and in gradient, ``sum_s w_s q - w`` (scattered onto the ids) for ``d / d logits``.

Encodings (``distillery.signals.store`` writes them; ``topk`` is the original top-k store):

- ``sampled``       N draws from ``p``; weight = count / N (exact in 8 bits: the count).
- ``topk_sampled``  the exact top k (weights ``p_i``) plus N draws from ``p`` restricted to the other
                    ids, weight = count * tail / N. The head of ``p`` costs no variance; the draws
                    only cover the long tail, whose mass is small.

The draws are the teacher's own distribution (no separate proposal): the weights are then counts,
one byte each, and sum to exactly 1, so the gradient's ``sum_s w_s q`` term is exactly ``q``.
Draws come from a generator seeded by (seed, example index), so a resumed or repaired capture
draws the same tokens for the same example.
"""

from __future__ import annotations

import torch

from distillery.signals.base import Signal, TeacherIdentity

ENCODINGS = ("topk", "sampled", "topk_sampled")
MAX_DRAWS = 255  # counts are stored in one byte


def example_generator(seed: int, example: int) -> torch.Generator:
    """The generator of one example's draws: the same (seed, example) gives the same tokens."""
    return torch.Generator().manual_seed((int(seed) * 1_000_003 + int(example)) % (1 << 62))


def unique_counts(draws: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``draws [R, N]`` token ids -> (distinct ids, their counts), both ``[R, N]``, ids ascending,
    padded at the end with id 0 and count 0."""
    s, _ = draws.sort(-1)
    first = torch.ones_like(s, dtype=torch.bool)
    first[:, 1:] = s[:, 1:] != s[:, :-1]
    group = first.long().cumsum(-1) - 1
    counts = torch.zeros_like(s).scatter_add_(1, group, torch.ones_like(s))
    ids = torch.zeros_like(s).scatter_(1, group, s)
    return ids, counts


def entropy(logp: torch.Tensor) -> torch.Tensor:
    """H(p) from log-probs over the last dim; zero-probability entries contribute 0."""
    return torch.special.entr(logp.exp()).sum(-1)


def draw(logp: torch.Tensor, *, k: int, draws: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """One example's sampled encoding from its log-probs ``logp [R, V]`` (at the capture temperature).

    Returns ``topk_ids [R, k]``, ``topk_logprobs [R, k]``, ``tail [R]`` (mass outside the top k),
    ``entropy [R]``, and ``sample_ids``/``sample_counts [R, draws]``: the distinct ids drawn from
    ``p`` outside the top k (from all of ``p`` when k = 0) and how often, padded with count 0."""
    if not 1 <= draws <= MAX_DRAWS:
        raise ValueError(f"draws: must be in 1..{MAX_DRAWS} (counts are stored in one byte), got {draws}")
    p = logp.exp()
    top_lp, top_ids = logp.topk(k, dim=-1) if k > 0 else (logp[:, :0], logp[:, :0].long())
    rest = p.scatter(-1, top_ids, 0.0) if k > 0 else p
    mass = rest.sum(-1)
    empty = mass <= 0  # the top k holds all the mass: draw anything, then count it as nothing
    if empty.any():
        rest = torch.where(empty.unsqueeze(-1), p, rest)
    sampled = torch.multinomial(rest.float() if rest.dtype == torch.float16 else rest, draws, replacement=True,
                                generator=generator)
    ids, counts = unique_counts(sampled)
    counts = counts.masked_fill(empty.unsqueeze(-1), 0)
    return {"topk_ids": top_ids, "topk_logprobs": top_lp, "tail": (1.0 - top_lp.exp().sum(-1)).clamp_min(0.0)
            if k > 0 else torch.ones_like(mass), "entropy": entropy(logp), "sample_ids": ids, "sample_counts": counts}


def weights(topk_logprobs: torch.Tensor, tail: torch.Tensor, counts: torch.Tensor, draws: int) -> torch.Tensor:
    """The importance weights of ``[top k ids, drawn ids]``: ``p_i`` for the top k, then
    count * tail / N for the draws (tail = 1 with no top k)."""
    w = counts.to(tail.dtype) * (tail / draws).unsqueeze(-1)
    return torch.cat([topk_logprobs.to(tail.dtype).exp(), w], -1)


def sampled_signal(logits: torch.Tensor, identity: TeacherIdentity, *, k: int, draws: int,
                   generator: torch.Generator, temperature: float = 1.0) -> Signal:
    """A sampled :class:`Signal` from dense teacher logits ``[..., V]`` (what a store in the
    ``sampled`` (k = 0) or ``topk_sampled`` encoding holds, before quantisation)."""
    lead, vocab = logits.shape[:-1], logits.shape[-1]
    logp = torch.log_softmax(logits.reshape(-1, vocab) / temperature, dim=-1)
    got = draw(logp, k=k, draws=draws, generator=generator)
    w = weights(got["topk_logprobs"], got["tail"], got["sample_counts"], draws)
    ids = torch.cat([got["topk_ids"], got["sample_ids"]], -1)
    return Signal(identity, sample_ids=ids.reshape(*lead, -1), sample_weights=w.reshape(*lead, -1),
                  entropy=got["entropy"].reshape(lead))
