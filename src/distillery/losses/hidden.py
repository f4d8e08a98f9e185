"""Hidden-state matching: which student layer learns from which teacher layer, projection heads
when widths differ, and the per-token losses (MSE, cosine, InfoNCE).

Layer indices follow Hugging Face ``output_hidden_states``: 0 is the embedding output, ``L`` the
last layer's output. The projection heads belong to the training run, not to the student: the
loop keeps them in its own module (saved in checkpoints) and never exports them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from distillery.losses.divergences import math_dtype

HIDDEN_KINDS = ("mse", "cosine", "infonce")


def even_layer_map(num_student_layers: int, num_teacher_layers: int, num_pairs: int | None = None
                   ) -> list[tuple[int, int]]:
    """Evenly spaced (student, teacher) hidden-state pairs, ending with last layer vs last layer.

    With ``num_pairs = n``, student outputs ``round(i * Ls / n)`` for ``i = 1..n`` are matched to
    teacher outputs at the same relative depth ``round(i * Lt / n)``.
    """
    if num_student_layers < 1 or num_teacher_layers < 1:
        raise ValueError("layer_map: both models need at least one layer")
    n = num_student_layers if num_pairs is None else num_pairs
    if not 1 <= n <= num_student_layers:
        raise ValueError(f"layer_map.num_pairs: must be in [1, {num_student_layers}], got {n}")
    return [(round(i * num_student_layers / n), round(i * num_teacher_layers / n)) for i in range(1, n + 1)]


def check_layer_map(pairs: Sequence[tuple[int, int]], num_student_layers: int, num_teacher_layers: int
                    ) -> list[tuple[int, int]]:
    """Validate explicit pairs against both depths (0..L inclusive, as in ``hidden_states``)."""
    out = []
    for i, pair in enumerate(pairs):
        if len(pair) != 2:
            raise ValueError(f"layer_map[{i}]: expected [student_layer, teacher_layer], got {pair!r}")
        s, t = int(pair[0]), int(pair[1])
        if not 0 <= s <= num_student_layers:
            raise ValueError(f"layer_map[{i}]: student layer {s} outside 0..{num_student_layers}")
        if not 0 <= t <= num_teacher_layers:
            raise ValueError(f"layer_map[{i}]: teacher layer {t} outside 0..{num_teacher_layers}")
        out.append((s, t))
    if not out:
        raise ValueError("layer_map: empty")
    return out


class ProjectionHeads(nn.Module):
    """One linear map student width -> teacher width per layer pair (identity when widths agree).

    Initialised near a (truncated) identity so that matching starts from the student's own features.
    """

    def __init__(self, pairs: Sequence[tuple[int, int]], student_width: int, teacher_width: int):
        super().__init__()
        self.pairs = [tuple(p) for p in pairs]
        self.heads = nn.ModuleDict()
        if student_width != teacher_width:
            for s, t in self.pairs:
                lin = nn.Linear(student_width, teacher_width, bias=False)
                with torch.no_grad():
                    lin.weight.zero_()
                    d = min(student_width, teacher_width)
                    lin.weight[:d, :d] = torch.eye(d)
                self.heads[f"{s}_{t}"] = lin

    def forward(self, h: torch.Tensor, pair: tuple[int, int]) -> torch.Tensor:
        key = f"{pair[0]}_{pair[1]}"
        if key not in self.heads:
            return h
        lin = self.heads[key]
        return lin(h.to(lin.weight.dtype))


def _masked_rows(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    x = x.reshape(-1, x.shape[-1])
    return x if mask is None else x[mask.reshape(-1).bool().to(x.device)]


def infonce(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """Mean InfoNCE over rows: each student token must pick its own teacher token among all rows.

    ``student, teacher [n, d]``; cosine similarities / ``temperature``, cross-entropy on the diagonal.
    """
    cd = math_dtype(student)
    s = F.normalize(student.to(cd), dim=-1)
    t = F.normalize(teacher.to(cd), dim=-1)
    logits = s @ t.T / temperature
    return F.cross_entropy(logits, torch.arange(len(s), device=s.device))


def hidden_state_loss(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None = None, *,
                      kind: str = "mse", temperature: float = 0.1,
                      num_tokens: int | float | torch.Tensor | None = None) -> torch.Tensor:
    """One layer pair: ``student, teacher [..., d]`` (already projected to the same width).

    ``mse``: mean over d of the squared difference, summed over tokens / ``num_tokens``.
    ``cosine``: ``1 - cos``, summed over tokens / ``num_tokens``. ``infonce``: see :func:`infonce`
    (a batch-level loss: ``num_tokens`` does not apply). Math in float32 (float64 kept).
    """
    if student.shape != teacher.shape:
        raise ValueError(f"hidden states: student {tuple(student.shape)} vs teacher {tuple(teacher.shape)}; "
                         "use ProjectionHeads when widths differ")
    cd = math_dtype(student)
    s, t = _masked_rows(student, mask).to(cd), _masked_rows(teacher, mask).to(cd)
    if kind == "infonce":
        return infonce(s, t, temperature) if len(s) else s.sum()
    if kind == "mse":
        per_token = (s - t).square().mean(-1)
    elif kind == "cosine":
        per_token = 1.0 - F.cosine_similarity(s, t, dim=-1)
    else:
        raise ValueError(f"hidden.kind: unknown {kind!r}; expected one of {', '.join(HIDDEN_KINDS)}")
    denom = len(s) if num_tokens is None else num_tokens
    return per_token.sum() / torch.as_tensor(denom, dtype=cd).clamp_min(1)


def hidden_states_loss(student_states: Sequence[torch.Tensor], teacher_states: Sequence[torch.Tensor],
                       pairs: Sequence[tuple[int, int]], mask: torch.Tensor | None = None, *,
                       projector: ProjectionHeads | None = None, kind: str = "mse", temperature: float = 0.1,
                       num_tokens: int | float | torch.Tensor | None = None) -> torch.Tensor:
    """Mean over layer pairs of :func:`hidden_state_loss`; the teacher side carries no gradient."""
    total = 0.0
    for pair in pairs:
        s = student_states[pair[0]]
        t = teacher_states[pair[1]].detach().to(s.device)
        if projector is not None:
            s = projector(s, pair)
        total = total + hidden_state_loss(s, t, mask, kind=kind, temperature=temperature, num_tokens=num_tokens)
    return total / len(pairs)
