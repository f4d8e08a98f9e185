"""Losses between distributions over *different* vocabularies (a teacher with another tokenizer).

- ``uld_loss``: Universal Logit Distillation (Boizard et al. 2024). With no correspondence between
  the two vocabularies, compare the distributions' *sorted* probability vectors:

      ULD(p, q) = sum_i | p_(i) - q_(i) |        p_(1) >= p_(2) >= ...,  q likewise

  the closed form of the Wasserstein-1 distance when every pair of tokens is one unit apart (the
  shorter vector is padded with zeros). Top-k on each side: the teacher's k largest probabilities
  against the student's k largest (k = V on both sides is the full distance, which is TRL's
  ``ULDLoss``; tested equal). The student's own cross-entropy goes beside it (``ce_weight``).
- hybrid (GOLD, Patiño et al. 2025): tokens whose bytes are identical in both vocabularies are mapped
  onto each other once (``signals/align.TokenizerBridge.id_map``); over those the teacher's signal
  is an ordinary top-k signal in the student's ids, compared by any divergence of
  ``divergences.py`` (the teacher's mass elsewhere is its tail); the *unmatched* rest of both
  distributions goes to ULD. Its weights are ``kd.weight`` and ``cross.uld_weight``. With identical
  tokenizers nothing is unmatched and the hybrid is exactly the ordinary KD loss (tested).
- ``span_kl_loss``: sequence-level, on aligned spans. Per span, each side's probability of the span's
  text is the product of its tokens' probabilities; the loss is the KL between the two Bernoulli
  distributions {this text, anything else}:

      KL(B(P_t) || B(P_s)) = P_t (log P_t - log P_s) + (1 - P_t) (log(1 - P_t) - log(1 - P_s))

  zero exactly when the two sides give the span the same probability. For one-token spans it is the
  ``bucket`` KL restricted to the observed token.

Every loss is summed over tokens (spans) and divided by ``num_tokens`` (default: the unmasked
tokens), like the token-level KD terms, so gradient accumulation does not change it. Math in float32
(float64 for float64 inputs). ULD and span KL keep the student's ``[tokens, V]`` probabilities for
backward; they run chunk by chunk only in the forward sense (``chunk_size`` rows at a time).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from distillery.losses.divergences import math_dtype


def _denominator(mask: torch.Tensor, num_tokens) -> torch.Tensor:
    denom = mask.sum() if num_tokens is None else num_tokens
    return torch.as_tensor(denom, dtype=torch.float64).clamp_min(1)


def sorted_l1(student_sorted: torch.Tensor, teacher_sorted: torch.Tensor) -> torch.Tensor:
    """Per-row L1 between two descending probability vectors, the shorter padded with zeros."""
    n = max(student_sorted.shape[-1], teacher_sorted.shape[-1])
    s = F.pad(student_sorted, (0, n - student_sorted.shape[-1]))
    t = F.pad(teacher_sorted.to(s.dtype), (0, n - teacher_sorted.shape[-1]))
    return (s - t).abs().sum(-1)


def uld_loss(student_logits: torch.Tensor, teacher_sorted_probs: torch.Tensor, mask: torch.Tensor, *,
             k: int | None = None, temperature: float = 1.0, student_subset: torch.Tensor | None = None,
             num_tokens: int | float | torch.Tensor | None = None, chunk_size: int = 1024) -> torch.Tensor:
    """ULD: sum over unmasked tokens of the L1 between sorted probabilities, / ``num_tokens``.

    ``student_logits [..., V]``; ``teacher_sorted_probs [..., kt]`` the teacher's largest probabilities
    at ``temperature``, descending (``kt`` = its vocabulary for the full distance); ``k``: how many of
    the student's largest probabilities take part (default ``kt``, capped at what there is).
    ``student_subset [V]`` bool: only these student ids take part (the hybrid's unmatched ids); the
    probabilities are those of the full softmax, not renormalised over the subset (GOLD's rule).
    """
    if mask.shape != student_logits.shape[:-1]:
        raise ValueError(f"mask: shape {tuple(mask.shape)} does not match the student's leading shape "
                         f"{tuple(student_logits.shape[:-1])}")
    if teacher_sorted_probs.shape[:-1] != mask.shape:
        raise ValueError(f"teacher_sorted_probs: leading shape {tuple(teacher_sorted_probs.shape[:-1])} does not "
                         f"match the student's {tuple(mask.shape)}")
    cd = math_dtype(student_logits)
    rows = mask.reshape(-1).bool().nonzero().squeeze(1).to(student_logits.device)
    x = student_logits.reshape(-1, student_logits.shape[-1])
    t_all = teacher_sorted_probs.reshape(mask.numel(), teacher_sorted_probs.shape[-1])
    if student_subset is not None:
        cols = student_subset.to(x.device).bool().nonzero().squeeze(1)
    total = student_logits.new_zeros((), dtype=cd)
    for r in rows.split(chunk_size):
        s = x[r].to(cd)
        q = torch.softmax(s / temperature if temperature != 1.0 else s, dim=-1)
        if student_subset is not None:
            q = q[:, cols]
        t = t_all[r.to(t_all.device)].to(q.device, cd)
        kk = min(k or t.shape[-1], q.shape[-1])
        if q.shape[-1] == 0:
            q_sorted = q
        elif kk >= q.shape[-1]:
            q_sorted = q.sort(dim=-1, descending=True).values
        else:
            q_sorted = q.topk(kk, dim=-1).values
        total = total + sorted_l1(q_sorted, t).sum()
    return total / _denominator(mask, num_tokens).to(total.device, cd)


def _log1mexp(logp: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(logp)) for logp <= 0, stable near 0 and near -inf."""
    # log1p(-exp) is accurate for small exp, log(-expm1) near 0 (Mächler 2012).
    return torch.where(logp > -0.6931, torch.log(-torch.expm1(logp)), torch.log1p(-torch.exp(logp)))


def bernoulli_kl(log_pt: torch.Tensor, log_ps: torch.Tensor) -> torch.Tensor:
    """KL(Bernoulli(exp(log_pt)) || Bernoulli(exp(log_ps))), elementwise, from log-probabilities.

    A probability of exactly 1 has no complement; both sides are kept at or below 1 - 2^-52 (a floor on
    the complement, which only a degenerate model reaches)."""
    cap = torch.tensor(-2.0**-52, dtype=log_ps.dtype, device=log_ps.device)
    log_pt, log_ps = log_pt.to(log_ps.dtype).minimum(cap), log_ps.minimum(cap)
    pt = log_pt.exp()
    return (pt * (log_pt - log_ps) + (1 - pt) * (_log1mexp(log_pt) - _log1mexp(log_ps))).clamp_min(0.0)


def span_kl_loss(student_logits: torch.Tensor, targets: torch.Tensor, span_ids: torch.Tensor,
                 teacher_span_logprob: torch.Tensor, mask: torch.Tensor, *,
                 num_tokens: int | float | torch.Tensor | None = None) -> torch.Tensor:
    """Span-level KL: sum over aligned spans of ``bernoulli_kl`` of the two sides' span log-probs.

    ``student_logits [B, T, V]`` (position t predicts ``targets[:, t]``); ``span_ids [B, T]`` the span
    each position's target belongs to (-1: none; unique within a row); ``teacher_span_logprob [B, T]``
    the teacher's log-probability of a span's text, read at each position of the span (one value per
    span). A span counts only when every one of its positions is in ``mask``.
    """
    if not (student_logits.shape[:-1] == targets.shape == span_ids.shape == mask.shape
            == teacher_span_logprob.shape):
        raise ValueError("span_kl_loss: student_logits [B, T, V], targets, span_ids, teacher_span_logprob and "
                         "mask [B, T] must agree in shape")
    cd = math_dtype(student_logits)
    B, T = targets.shape
    live = span_ids >= 0
    if not live.any():
        return student_logits.sum() * 0.0
    logq = torch.log_softmax(student_logits[live].to(cd), dim=-1)
    tok = logq.gather(-1, targets[live].unsqueeze(-1).long()).squeeze(-1)
    rows = torch.arange(B, device=span_ids.device).unsqueeze(1).expand(B, T)[live]
    key = rows * (int(span_ids.max()) + 1) + span_ids[live]
    uniq, inv = torch.unique(key, return_inverse=True)
    student_span = tok.new_zeros(len(uniq)).index_add(0, inv, tok)
    teacher_span = torch.zeros(len(uniq), dtype=cd, device=tok.device).scatter(
        0, inv, teacher_span_logprob[live].to(cd))
    ok = torch.ones(len(uniq), dtype=torch.bool, device=tok.device).scatter_reduce(
        0, inv, mask[live].bool(), reduce="amin")
    d = bernoulli_kl(teacher_span[ok], student_span[ok]).sum()
    return d / _denominator(mask, num_tokens).to(d.device, cd)
