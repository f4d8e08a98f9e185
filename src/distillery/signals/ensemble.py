"""Several teachers as one: mixed by fixed weights, by per-example weights, or routed by a data field.

Teachers are mixed in probability space, ``p = sum_i w_i p_i``, never by averaging logits. Every
teacher must share the tokenizer. A teacher is run only on the examples where its weight is
non-zero, and an example whose whole weight sits on one teacher gets that teacher's signal
unchanged, so an ensemble with weight 1.0 on one teacher reproduces it exactly.

Sparse teachers (top-k) are mixed over the union of their top-k ids; a teacher's probability of an
id outside its own top-k is unknown and counted as 0, so that mass stays in the mixture's tail.

A member with another tokenizer (signals/cross.py) has a distribution only at the positions where
its tokenization and the student's share a boundary: there it is mixed like any sparse teacher;
elsewhere its weight goes to the others (weights renormalised per position). Its mass on tokens the
student lacks (ULD's part) enters the mixture's ``cross`` parts scaled by its weight.
"""

from __future__ import annotations

from typing import Sequence

import torch

from distillery.signals.base import Signal, TeacherIdentity, TeacherSignal, tail_mass


def _take(value, rows: torch.Tensor, batch_size: int):
    """The rows of a per-example batch field; other values pass through."""
    if torch.is_tensor(value) and value.dim() > 0 and value.shape[0] == batch_size:
        return value[rows.to(value.device)]
    if isinstance(value, (list, tuple)) and len(value) == batch_size:
        return [value[i] for i in rows.tolist()]
    return value


class EnsembleTeacher:
    def __init__(self, teachers: Sequence[TeacherSignal], weights: Sequence[float] | None = None, *,
                 per_example_weights: str | None = None, route_by: str | None = None,
                 routes: dict | None = None):
        if not teachers:
            raise ValueError("EnsembleTeacher: give at least one teacher")
        self.teachers = list(teachers)
        self._check_alike()
        modes = [m for m, on in (("weights", weights is not None), ("per_example_weights", per_example_weights),
                                 ("route_by", route_by)) if on]
        if len(modes) > 1:
            raise ValueError(f"EnsembleTeacher: give one of weights, per_example_weights, route_by (got {modes})")
        n = len(self.teachers)
        w = torch.full((n,), 1.0 / n) if weights is None else torch.as_tensor(list(weights), dtype=torch.float64)
        if w.shape != (n,) or (w < 0).any() or w.sum() <= 0:
            raise ValueError(f"EnsembleTeacher: weights must be {n} non-negative numbers with a positive sum, got {weights}")
        self.weights = (w / w.sum()).float()
        self.per_example_weights = per_example_weights
        self.route_by = route_by
        if route_by and not routes:
            raise ValueError("EnsembleTeacher: route_by needs routes, a mapping from field value to teacher index")
        self.routes = dict(routes or {})
        for label, idx in self.routes.items():
            if not 0 <= int(idx) < n:
                raise ValueError(f"EnsembleTeacher: routes[{label!r}] = {idx} is not a teacher index (0..{n - 1})")
        first = self.teachers[0].identity
        self.cross_tokenizer = any(getattr(t, "cross_tokenizer", False) for t in self.teachers)
        self.identity = TeacherIdentity("ensemble(" + ",".join(t.identity.model_id for t in self.teachers) + ")",
                                        first.tokenizer_fingerprint, first.temperature, first.k)

    def _check_alike(self) -> None:
        first = self.teachers[0].identity
        for i, t in enumerate(self.teachers[1:], 1):
            other = t.identity
            if other.tokenizer_fingerprint != first.tokenizer_fingerprint:
                raise ValueError(f"EnsembleTeacher: teacher {i} ({other.model_id}) has a different tokenizer "
                                 f"(tokenizer_fingerprint {other.tokenizer_fingerprint[:12]} vs "
                                 f"{first.tokenizer_fingerprint[:12]} of teacher 0 ({first.model_id}))")
            if (other.k is None) != (first.k is None):
                raise ValueError(f"EnsembleTeacher: teacher {i} ({other.model_id}) is "
                                 f"{'dense' if other.k is None else 'sparse'} but teacher 0 is not; use one kind")
            if other.k is not None:
                first.check_compatible(k=other.k, temperature=other.temperature,
                                       what=f"EnsembleTeacher: teacher {i} ({other.model_id})")

    @property
    def vocab_size(self) -> int | None:
        from distillery.signals.capture import teacher_vocab_size

        return teacher_vocab_size(self.teachers[0])

    def batch_weights(self, batch_size: int, batch: dict) -> torch.Tensor:
        """``[B, n]`` mixing weights, each row summing to 1."""
        n = len(self.teachers)
        if self.per_example_weights:
            if self.per_example_weights not in batch:
                raise ValueError(f"EnsembleTeacher: the batch has no field {self.per_example_weights!r}")
            w = torch.as_tensor(batch[self.per_example_weights], dtype=torch.float32).cpu()
            if w.shape != (batch_size, n) or (w < 0).any() or (w.sum(-1) <= 0).any():
                raise ValueError(f"EnsembleTeacher: {self.per_example_weights} must be [{batch_size}, {n}] "
                                 f"non-negative with positive rows, got {tuple(w.shape)}")
            return w / w.sum(-1, keepdim=True)
        if self.route_by:
            if self.route_by not in batch:
                raise ValueError(f"EnsembleTeacher: the batch has no field {self.route_by!r} to route by")
            labels = batch[self.route_by]
            labels = labels.tolist() if torch.is_tensor(labels) else list(labels)
            w = torch.zeros(batch_size, n)
            for b, label in enumerate(labels):
                if label not in self.routes:
                    raise ValueError(f"EnsembleTeacher: {self.route_by}={label!r} has no route "
                                     f"(known: {sorted(map(str, self.routes))})")
                w[b, int(self.routes[label])] = 1.0
            return w
        return self.weights.expand(batch_size, n).clone()

    @torch.no_grad()
    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **batch) -> Signal:
        bsz = input_ids.shape[0]
        w = self.batch_weights(bsz, batch)
        signals = {}
        for i, teacher in enumerate(self.teachers):
            rows = (w[:, i] > 0).nonzero().flatten()
            if len(rows):
                sub = {key: _take(v, rows, bsz) for key, v in batch.items()}
                am = None if attention_mask is None else _take(attention_mask, rows, bsz)
                signals[i] = (rows, teacher(_take(input_ids, rows, bsz), am, **sub))
        if len(signals) == 1 and bool((w.max(-1).values == 1).all()):
            return self._relabel(next(iter(signals.values()))[1])  # one teacher has it all: its signal, unchanged
        if any(sig.cross is not None for _, sig in signals.values()):
            return self._mix_cross(signals, w, bsz)
        mixed = self._mix_dense(signals, w, bsz) if self.identity.k is None else self._mix_sparse(signals, w, bsz)
        return self._keep_single(mixed, signals, w)

    def _relabel(self, sig: Signal) -> Signal:
        if sig.is_dense:
            return Signal(self.identity, logits=sig.logits, cross=sig.cross)
        return Signal(self.identity, topk_ids=sig.topk_ids, topk_logprobs=sig.topk_logprobs, tail_mass=sig.tail_mass,
                      cross=sig.cross)

    def _mix_cross(self, signals: dict, w: torch.Tensor, bsz: int) -> Signal:
        """Per-position weights: a cross-tokenizer member counts only where it has a distribution."""
        from distillery.signals.base import CrossParts

        if self.identity.k is None:
            raise ValueError("EnsembleTeacher: a member with another tokenizer gives top-k; give every member top_k")
        any_sig = next(iter(signals.values()))[1]
        T = any_sig.topk_ids.shape[1]
        dev = any_sig.topk_ids.device
        wp = torch.zeros(bsz, T, len(self.teachers), device=dev)
        for i, (rows, sig) in signals.items():
            ok = sig.cross.valid.float() if sig.cross is not None else torch.ones(len(rows), T, device=dev)
            wp[rows.to(dev), :, i] = w[rows, i].to(dev).unsqueeze(-1) * ok
        total = wp.sum(-1, keepdim=True)
        live = total.squeeze(-1) > 0
        wp = torch.where(total > 0, wp / total.clamp_min(1e-30), wp)
        mixed = self._mix_sparse(signals, wp, bsz)
        crossed = [(i, rows, sig) for i, (rows, sig) in signals.items() if sig.cross is not None]
        i0, rows0, sig0 = crossed[0]
        parts = sig0.cross
        un = [self._full(rows, sig.cross.unmatched_probs.float(), bsz, 0.0) * wp[..., i].unsqueeze(-1)
              for i, rows, sig in crossed]
        un = torch.cat(un, -1)
        un = un.topk(parts.unmatched_probs.shape[-1], -1).values if un.shape[-1] else un
        student_unmatched = parts.student_unmatched.clone()
        for _, _, sig in crossed[1:]:
            student_unmatched |= sig.cross.student_unmatched
        mixed.cross = CrossParts(live, un, self._full(rows0, parts.span_ids, bsz, -1),
                                 self._full(rows0, parts.span_logprob, bsz, 0.0), student_unmatched)
        return mixed

    @staticmethod
    def _weight(w: torch.Tensor, i: int, like: torch.Tensor) -> torch.Tensor:
        """Teacher i's weight broadcast against ``like [B, ..., k]``: per example ``w [B, n]`` or per
        position ``w [B, T, n]``."""
        col = w[..., i].to(like.device)
        return col.view(*col.shape, *[1] * (like.dim() - col.dim()))

    @staticmethod
    def _full(rows: torch.Tensor, part: torch.Tensor, bsz: int, fill) -> torch.Tensor:
        out = part.new_full((bsz, *part.shape[1:]), fill)
        out[rows.to(part.device)] = part
        return out

    def _mix_dense(self, signals: dict, w: torch.Tensor, bsz: int) -> Signal:
        terms = []
        for i, (rows, sig) in signals.items():
            logp = self._full(rows, torch.log_softmax(sig.logits.float(), -1), bsz, 0.0)
            logw = w[:, i].to(logp.device).log().view(bsz, *[1] * (logp.dim() - 1))
            terms.append(logp + logw)  # log(w_i p_i); -inf where w_i = 0
        return Signal(self.identity, logits=torch.logsumexp(torch.stack(terms), 0))

    def _mix_sparse(self, signals: dict, w: torch.Tensor, bsz: int) -> Signal:
        k = self.identity.k
        ids, probs, valid = [], [], []
        for i, (rows, sig) in signals.items():
            ids.append(self._full(rows, sig.topk_ids, bsz, 0))
            probs.append(self._full(rows, sig.topk_logprobs.float().exp(), bsz, 0.0))
            v = torch.zeros(bsz, dtype=torch.bool, device=ids[-1].device)
            v[rows.to(v.device)] = True
            valid.append(v.view(bsz, *[1] * (ids[-1].dim() - 1)).expand(ids[-1].shape))
        order = list(signals)
        cand = torch.cat(ids, -1)
        mixed = torch.zeros(cand.shape, device=cand.device)
        for j, i in enumerate(order):
            match = cand.unsqueeze(-1) == ids[j].unsqueeze(-2)  # [..., n*k, k]
            pj = (match * (probs[j] * valid[j]).unsqueeze(-2)).sum(-1)
            mixed = mixed + self._weight(w, i, cand) * pj
        keep = torch.cat(valid, -1) & ~self._duplicates(ids, valid)
        mixed = torch.where(keep, mixed, torch.full_like(mixed, -1.0))
        top, pos = mixed.topk(k, dim=-1)
        top = top.clamp_min(0.0)
        return Signal(self.identity, topk_ids=cand.gather(-1, pos), topk_logprobs=top.log(),
                      tail_mass=tail_mass(top))

    @staticmethod
    def _duplicates(ids: list, valid: list) -> torch.Tensor:
        """True for a candidate already listed by an earlier teacher (that covers the row)."""
        dups = [torch.zeros_like(valid[0])]
        for j in range(1, len(ids)):
            seen = torch.zeros_like(valid[j])
            for e in range(j):
                seen |= ((ids[j].unsqueeze(-1) == ids[e].unsqueeze(-2)) & valid[e].unsqueeze(-2)).any(-1)
            dups.append(seen)
        return torch.cat(dups, -1)

    def _keep_single(self, mixed: Signal, signals: dict, w: torch.Tensor) -> Signal:
        """Rows whose whole weight is on one teacher take that teacher's output unchanged."""
        for i, (rows, sig) in signals.items():
            solo = (w[rows, i] == 1).nonzero().flatten()
            if not len(solo):
                continue
            dst, src = rows[solo], solo
            if mixed.is_dense:
                mixed.logits[dst.to(mixed.logits.device)] = sig.logits[src.to(sig.logits.device)].float()
            else:
                d = dst.to(mixed.topk_ids.device)
                s = src.to(sig.topk_ids.device)
                mixed.topk_ids[d] = sig.topk_ids[s]
                mixed.topk_logprobs[d] = sig.topk_logprobs[s].float()
                mixed.tail_mass[d] = sig.tail_mass[s].float()
        return mixed
