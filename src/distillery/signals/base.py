"""What a teacher says about a batch: the one signal abstraction every loss consumes.

A :class:`Signal` is dense logits, sparse top-k output ``(ids, log-probs, tail mass)``, or weighted
tokens ``(ids, weights, entropy)``: an unbiased sample of the teacher's distribution (RS-KD).
Where it came from (a live model, the logit store, a server, an ensemble) is recorded in its
:class:`TeacherIdentity` but never matters to the losses.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch


@dataclass(frozen=True)
class TeacherIdentity:
    model_id: str
    tokenizer_fingerprint: str
    temperature: float = 1.0  # the temperature sparse log-probs were taken at (dense: 1.0, raw logits)
    k: int | None = None  # None for dense
    # A teacher with another tokenizer (signals/cross.py): its own tokenizer's fingerprint; the signal
    # itself is in the student's ids, so ``tokenizer_fingerprint`` is the student's.
    foreign_fingerprint: str | None = None

    def check_compatible(self, *, tokenizer_fingerprint: str | None = None, k: int | None = None,
                         temperature: float | None = None, what: str = "teacher signal") -> None:
        """Refuse to mix artifacts made under different settings, naming the field that differs."""
        if tokenizer_fingerprint is not None and tokenizer_fingerprint != self.tokenizer_fingerprint:
            raise ValueError(f"{what}: tokenizer_fingerprint differs "
                             f"({self.tokenizer_fingerprint[:12]} vs {tokenizer_fingerprint[:12]})")
        if k is not None and self.k is not None and k != self.k:
            raise ValueError(f"{what}: k differs ({self.k} vs {k})")
        if temperature is not None and self.k is not None and abs(temperature - self.temperature) > 1e-9:
            raise ValueError(f"{what}: temperature differs ({self.temperature} vs {temperature})")


def tail_mass(topk_probs: torch.Tensor) -> torch.Tensor:
    """The probability outside the top k, ``1 - sum(top-k probabilities)``, never below 0 (rounding)."""
    return (1.0 - topk_probs.sum(-1)).clamp_min(0.0)


@dataclass
class CrossParts:
    """What a teacher with another tokenizer adds to its signal (signals/cross.py), in the student's
    positions ``[...]``: ``valid`` where the teacher has a distribution over the same continuation
    (aligned span starts); ``unmatched_probs [..., k]`` the teacher's largest probabilities of tokens
    with no counterpart in the student's vocabulary, descending; ``span_ids``/``span_logprob`` the
    aligned span each position's target belongs to (-1: none) and the teacher's log-probability of
    that span's text; ``student_unmatched [V]`` the student ids with no counterpart."""

    valid: torch.Tensor
    unmatched_probs: torch.Tensor
    span_ids: torch.Tensor
    span_logprob: torch.Tensor
    student_unmatched: torch.Tensor

    def select(self, index) -> "CrossParts":
        return CrossParts(self.valid[index], self.unmatched_probs[index], self.span_ids[index],
                          self.span_logprob[index], self.student_unmatched)


@dataclass
class Signal:
    """Teacher output aligned with the student's logits (same leading shape ``[..., T]``).

    Dense: ``logits [..., V]`` raw logits (temperature is applied by the loss).
    Sparse: ``topk_ids [..., k]`` int, ``topk_logprobs [..., k]`` log-probs at ``identity.temperature``,
    ``tail_mass [...]`` = 1 - sum(exp(topk_logprobs)), the probability outside the top k.
    Sampled: ``sample_ids [..., S]`` int and ``sample_weights [..., S]`` (0 on padding slots) such that
    ``E[sum_s w_s f(id_s)] = sum_i p_i f(i)`` for every ``f``, and ``entropy [...]`` = H(p), all at
    ``identity.temperature`` (``signals/sampled.py``); only the forward KL can be estimated from it
    without bias, since that is the one divergence linear in ``p`` (docs/losses.md).
    """

    identity: TeacherIdentity
    logits: torch.Tensor | None = None
    topk_ids: torch.Tensor | None = None
    topk_logprobs: torch.Tensor | None = None
    tail_mass: torch.Tensor | None = None
    sample_ids: torch.Tensor | None = None
    sample_weights: torch.Tensor | None = None
    entropy: torch.Tensor | None = None
    cross: CrossParts | None = None  # set only by a teacher with another tokenizer

    def __post_init__(self) -> None:
        dense = self.logits is not None
        sparse = self.topk_ids is not None and self.topk_logprobs is not None
        sampled = self.sample_ids is not None and self.sample_weights is not None and self.entropy is not None
        if dense + sparse + sampled != 1:
            raise ValueError("Signal: give exactly one of dense logits, sparse topk_ids + topk_logprobs, or "
                             "sampled sample_ids + sample_weights + entropy")
        if sparse and self.tail_mass is None:
            self.tail_mass = tail_mass(self.topk_logprobs.float().exp())

    @property
    def is_dense(self) -> bool:
        return self.logits is not None

    @property
    def is_sampled(self) -> bool:
        return self.sample_ids is not None

    @property
    def device(self) -> torch.device:
        return (self.logits if self.is_dense else self.sample_ids if self.is_sampled else self.topk_ids).device

    def select(self, index) -> "Signal":
        """The signal at some positions (any tensor index applied to the leading dims)."""
        cross = None if self.cross is None else self.cross.select(index)
        if self.is_dense:
            return Signal(self.identity, logits=self.logits[index], cross=cross)
        if self.is_sampled:
            return Signal(self.identity, sample_ids=self.sample_ids[index], sample_weights=self.sample_weights[index],
                          entropy=self.entropy[index], cross=cross)
        return Signal(self.identity, topk_ids=self.topk_ids[index], topk_logprobs=self.topk_logprobs[index],
                      tail_mass=self.tail_mass[index], cross=cross)


@runtime_checkable
class TeacherSignal(Protocol):
    """Anything that turns a batch into a :class:`Signal`."""

    identity: TeacherIdentity

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 **batch) -> Signal: ...
