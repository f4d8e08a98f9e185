"""Attention-map matching: KL between the teacher's and the student's attention distributions.

An attention map ``[batch, heads, query, key]`` holds one distribution over keys per query. The
loss is ``KL(a_T || a_S)`` per (head, query), summed over keys, averaged over heads, summed over
the unmasked queries and divided by their number (or a global count). When head counts differ,
``head_mode="average"`` compares head-averaged maps and ``"grouped"`` averages the teacher's heads in
contiguous groups, one per student head (needs teacher heads % student heads == 0).

Fast attention kernels (sdpa, flash) do not return weights. :func:`capture_representations` runs
the forward with the eager implementation switched on for that call (and restored after), and
:func:`attention_probs_from_qk` computes the maps from queries and keys for code that has them.
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch import nn

from distillery.losses.divergences import kl, math_dtype

HEAD_MODES = ("average", "grouped")


def attention_probs_from_qk(q: torch.Tensor, k: torch.Tensor, key_mask: torch.Tensor | None = None, *,
                            causal: bool = True, scaling: float | None = None) -> torch.Tensor:
    """Causal softmax attention weights in float32 from ``q [B, Hq, T, d]`` and ``k [B, Hk, T, d]``.

    Grouped-query keys (``Hk`` divides ``Hq``) are repeated like the model does; ``key_mask [B, T]``
    is True for real (non-padding) keys. Rows with no visible key are all zeros.
    """
    b, hq, t, d = q.shape
    if hq % k.shape[1]:
        raise ValueError(f"attention: query heads {hq} not a multiple of key heads {k.shape[1]}")
    k = k.repeat_interleave(hq // k.shape[1], dim=1)
    scores = (q.float() @ k.float().transpose(-1, -2)) * (scaling if scaling is not None else d**-0.5)
    allowed = torch.ones(t, t, dtype=torch.bool, device=q.device)
    if causal:
        allowed = allowed.tril()
    allowed = allowed.expand(b, 1, t, t)
    if key_mask is not None:
        allowed = allowed & key_mask.bool()[:, None, None, :]
    probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
    return probs.nan_to_num(0.0)  # fully masked rows: softmax of all -inf


def _heads_to(attn: torch.Tensor, n: int, mode: str) -> torch.Tensor:
    h = attn.shape[1]
    if mode == "average" or n == 1:
        return attn.mean(1, keepdim=True)
    if h % n:
        raise ValueError(f"attention.head_mode 'grouped': teacher heads {h} not a multiple of student heads {n}")
    return attn.unflatten(1, (n, h // n)).mean(2)


def attention_map_loss(student_attn: torch.Tensor, teacher_attn: torch.Tensor, mask: torch.Tensor | None = None,
                       *, head_mode: str = "average", num_tokens: int | float | torch.Tensor | None = None
                       ) -> torch.Tensor:
    """KL(teacher || student) between attention maps ``[B, H, T, T]``; see the module docstring."""
    if head_mode not in HEAD_MODES:
        raise ValueError(f"attention.head_mode: unknown {head_mode!r}; expected one of {', '.join(HEAD_MODES)}")
    if student_attn.shape[-2:] != teacher_attn.shape[-2:] or student_attn.shape[0] != teacher_attn.shape[0]:
        raise ValueError(f"attention maps: student {tuple(student_attn.shape)} vs teacher {tuple(teacher_attn.shape)}")
    cd = math_dtype(student_attn)
    hs, ht = student_attn.shape[1], teacher_attn.shape[1]
    s, t = student_attn.to(cd), teacher_attn.detach().to(cd).to(student_attn.device)
    if hs != ht or head_mode == "average":
        n = 1 if head_mode == "average" else hs
        s, t = _heads_to(s, n, head_mode), _heads_to(t, n, head_mode)
    # Probabilities -> log-probs; zeros (masked keys) become -inf and are skipped by `kl`.
    tiny = torch.finfo(cd).tiny
    logs = s.clamp_min(tiny).log()
    logt = t.log()
    per_query = kl(logt, logs).clamp_min(0.0).mean(1)  # [B, T]: mean over heads
    if mask is None:
        mask = torch.ones(per_query.shape, dtype=torch.bool, device=per_query.device)
    mask = mask.bool().to(per_query.device)
    denom = mask.sum() if num_tokens is None else num_tokens
    return per_query[mask].sum() / torch.as_tensor(denom, dtype=cd).clamp_min(1)


def attention_maps_loss(student_attns, teacher_attns, pairs, mask=None, *, head_mode: str = "average",
                        num_tokens=None) -> torch.Tensor:
    """Mean of :func:`attention_map_loss` over ``(student_layer, teacher_layer)`` pairs (0-based layers)."""
    total = 0.0
    for s, t in pairs:
        total = total + attention_map_loss(student_attns[s], teacher_attns[t], mask, head_mode=head_mode,
                                           num_tokens=num_tokens)
    return total / len(pairs)


@contextlib.contextmanager
def eager_attention(model: nn.Module):
    """Run ``model`` with eager attention (which returns weights) inside the block, then restore."""
    before = getattr(model.config, "_attn_implementation", None)
    if before in (None, "eager"):
        yield model
        return
    model.set_attn_implementation("eager")
    try:
        yield model
    finally:
        model.set_attn_implementation(before)


def capture_representations(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                            *, attentions: bool = True, **kwargs) -> dict:
    """One forward returning ``logits``, ``hidden_states`` (embeddings + every layer) and, if asked,
    ``attentions`` (one ``[B, H, T, T]`` map per layer). Call it for the student (with grad) and the
    teacher (under ``torch.no_grad()``)."""
    ctx = eager_attention(model) if attentions else contextlib.nullcontext()
    with ctx:
        out = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True,
                    output_attentions=attentions, **kwargs)
    got = {"logits": out.logits, "hidden_states": out.hidden_states}
    if attentions:
        if not out.attentions or any(a is None for a in out.attentions):
            raise RuntimeError(f"{type(model).__name__}: the forward returned no attention weights")
        got["attentions"] = out.attentions
    return got


def even_attention_pairs(num_student_layers: int, num_teacher_layers: int) -> list[tuple[int, int]]:
    """Student layer i (0-based) <-> the teacher layer at the same relative depth, last with last."""
    return [(i, math.floor((i + 1) * num_teacher_layers / num_student_layers) - 1) for i in range(num_student_layers)]
