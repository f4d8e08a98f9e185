"""Token-level divergences between teacher and student distributions.

First version (forward KL, dense teacher); the loss-library issue extends this file while keeping
``token_kd_loss``'s signature, which is the seam the training loop uses.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from distillery.signals.base import Signal


def forward_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """KL(p_T || p_S) per token, summed over the vocabulary, in float32."""
    s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    return (t.exp() * (t - s)).sum(-1).clamp_min(0.0)


def token_kd_loss(student_logits: torch.Tensor, signal: Signal, mask: torch.Tensor, *,
                  divergence: str = "forward_kl", temperature: float = 1.0, scale_t2: bool = True,
                  beta: float = 0.5, skew: float = 0.1, tail: str = "bucket",
                  num_tokens: int | float | torch.Tensor | None = None, chunk_size: int = 1024) -> torch.Tensor:
    """Mean divergence over the unmasked tokens, times T^2 (unless ``scale_t2`` is off).

    ``student_logits [..., V]``, ``signal`` aligned to it, ``mask [...]`` True where a token counts.
    ``num_tokens``: the denominator; pass the global count of unmasked tokens so that gradient
    accumulation and data parallelism give the same loss as one big batch.
    """
    if divergence != "forward_kl" or not signal.is_dense:
        raise NotImplementedError(f"divergence {divergence!r} with a {'dense' if signal.is_dense else 'sparse'} signal")
    mask = mask.bool()
    s = student_logits[mask]
    t = signal.logits[mask]
    total = s.new_zeros((), dtype=torch.float32)
    for i in range(0, s.shape[0], chunk_size):
        total = total + forward_kl(s[i:i + chunk_size], t[i:i + chunk_size], temperature).sum()
    denom = mask.sum() if num_tokens is None else num_tokens
    loss = total / torch.as_tensor(denom, dtype=torch.float32).clamp_min(1)
    return loss * temperature**2 if scale_t2 else loss
