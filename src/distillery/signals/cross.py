"""A live teacher with another tokenizer, speaking in the student's positions and ids.

For each row of student ids the text they stand for is tokenized by the teacher (signals/align.py),
the teacher runs on its own ids, and its output is brought back to the student's positions:

- at each student position that starts an aligned span's prediction (``CrossParts.valid``), the
  teacher's next-token distribution given the same text: its top-k over the tokens that exist in both
  vocabularies (``TokenizerBridge.id_map``), as an ordinary sparse :class:`Signal` in *student ids*
  whose tail is everything else the teacher predicts, plus its largest probabilities over the tokens
  the student does not have (``unmatched_probs``, for ULD);
- per aligned span, the teacher's log-probability of the span's text (sum of its tokens' log-probs).

So the loop, ensembles of same-kind signals and on-policy distillation take it unchanged; the losses
of ``losses/cross_vocab.py`` read the extra parts. With identical tokenizers every position is valid,
nothing is unmatched, and the signal equals an :class:`OnlineTeacher`'s top-k (tested).
"""

from __future__ import annotations

import math

import torch

from distillery.signals.align import TokenizerBridge, model_positions
from distillery.signals.base import CrossParts, Signal, TeacherIdentity, tail_mass
from distillery.signals.online import place_teacher


class CrossTokenizerTeacher:
    cross_tokenizer = True

    def __init__(self, model: torch.nn.Module, teacher_tokenizer, student_tokenizer, *, model_id: str,
                 student_fingerprint: str, teacher_fingerprint: str, top_k: int = 64, unmatched_k: int = 64,
                 temperature: float = 1.0, special_map: dict | None = None, output_device=None, device=None,
                 dtype=None, bridge: TokenizerBridge | None = None):
        self.model = place_teacher(model, device, dtype).eval()
        self.bridge = bridge or TokenizerBridge(student_tokenizer, teacher_tokenizer, special_map)
        self.top_k, self.unmatched_k, self.temperature = top_k, unmatched_k, temperature
        self.output_device = output_device
        self.identity = TeacherIdentity(model_id, student_fingerprint, temperature, top_k,
                                        foreign_fingerprint=teacher_fingerprint)
        t_vocab = max(len(self.bridge.teacher_bytes), getattr(model.config, "vocab_size", 0) or 0)
        s_vocab = max(len(self.bridge.student_bytes), len(student_tokenizer))
        ids = sorted(self.bridge.id_map)
        self.teacher_matched = torch.tensor(ids, dtype=torch.long)
        self.student_of_matched = torch.tensor([self.bridge.id_map[i] for i in ids], dtype=torch.long)
        unmatched = torch.ones(t_vocab, dtype=torch.bool)
        unmatched[self.teacher_matched] = False
        unmatched[list(self.bridge.teacher_specials & set(range(t_vocab)))] = False  # never predicted as text
        self.teacher_unmatched = unmatched.nonzero().squeeze(1)
        self.student_unmatched = torch.ones(s_vocab, dtype=torch.bool)
        self.student_unmatched[self.student_of_matched] = False
        self.student_vocab = s_vocab
        self._map_rounds = self._rounds(ids)

    def _rounds(self, teacher_ids: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The id map as rounds of (teacher ids, student ids) in which each student id appears once, so
        each round is one vectorised logaddexp (one round when the map is one-to-one)."""
        rounds: list[tuple[list[int], list[int], set[int]]] = []
        for t in teacher_ids:
            s = self.bridge.id_map[t]
            for r_t, r_s, seen in rounds:
                if s not in seen:
                    r_t.append(t), r_s.append(s), seen.add(s)
                    break
            else:
                rounds.append(([t], [s], {s}))
        return [(torch.tensor(a), torch.tensor(b)) for a, b, _ in rounds]

    @property
    def device(self) -> torch.device:
        for p in self.model.parameters():
            return p.device
        return torch.device("cpu")

    @property
    def vocab_size(self) -> int:
        return self.student_vocab  # the signal is over the student's vocabulary

    def id_map_record(self) -> dict:
        """The id map as stored beside artifacts made from this teacher (teacher id -> student id)."""
        return {"teacher_fingerprint": self.identity.foreign_fingerprint,
                "student_fingerprint": self.identity.tokenizer_fingerprint,
                "id_map": [[int(t), int(s)] for t, s in sorted(self.bridge.id_map.items())]}

    @torch.no_grad()
    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **batch) -> Signal:
        out_dev = self.output_device or input_ids.device
        B, T = input_ids.shape
        rows = []
        for b in range(B):
            ids = input_ids[b].tolist()
            n = int(attention_mask[b].sum()) if attention_mask is not None else T
            if attention_mask is not None and not bool(attention_mask[b, :n].all()):
                raise ValueError("CrossTokenizerTeacher: rows must be right-padded (text first, padding after)")
            # Right padding (the loop's pairs and on-policy batches): only the first n tokens are text.
            t_ids, alignment = self.bridge.teacher_ids(ids[:n])
            model_ids, where = model_positions(t_ids)
            rows.append((n, alignment, model_ids, where))
        width = max(1, max(len(r[2]) for r in rows))
        dev = self.device
        pad = self.bridge.teacher_tok.pad_token_id or 0
        t_in = torch.full((B, width), pad, dtype=torch.long)
        t_mask = torch.zeros((B, width), dtype=torch.long)
        for b, (_, _, model_ids, _) in enumerate(rows):
            t_in[b, :len(model_ids)] = torch.tensor(model_ids, dtype=torch.long)
            t_mask[b, :len(model_ids)] = 1
        logits = self.model(input_ids=t_in.to(dev), attention_mask=t_mask.to(dev)).logits.float()
        lse = logits.logsumexp(-1)  # T = 1: for the sequence probability of each span's text

        valid = torch.zeros(B, T, dtype=torch.bool)
        src_b, src_q, dst_p = [], [], []
        span_ids = torch.full((B, T), -1, dtype=torch.long)
        span_lp = torch.zeros(B, T)
        for b, (n, alignment, model_ids, where) in enumerate(rows):
            for p, q in alignment.pairs:
                if where[q] >= 0:
                    valid[b, p] = True
                    src_b.append(b), src_q.append(where[q]), dst_p.append(p)
            tok_lp = self._token_logprobs(logits[b], lse[b], model_ids)
            for s_id, sp in enumerate(alignment.spans):
                got = self._span_logprob(tok_lp, sp, where)
                if got is None or sp.s_lo < 1:
                    continue
                span_ids[b, sp.s_lo - 1: sp.s_hi - 1] = s_id
                span_lp[b, sp.s_lo - 1: sp.s_hi - 1] = got
        # The teacher's distributions at the matched positions, at the loss's temperature, a chunk of
        # positions at a time (each is a row over the teacher's whole vocabulary).
        kk, kun = min(self.top_k, self.student_vocab), min(self.unmatched_k, len(self.teacher_unmatched))
        parts = []
        bi_all = torch.tensor(src_b, dtype=torch.long, device=dev)
        qi_all = torch.tensor(src_q, dtype=torch.long, device=dev)
        for lo in range(0, len(src_b), 256):
            sel = logits[bi_all[lo:lo + 256], qi_all[lo:lo + 256]]
            parts.append(self._split(torch.log_softmax(sel / self.temperature, -1), kk, kun))
        if parts:
            top, top_ids, un_top = (torch.cat(x) for x in zip(*parts))

        # Positions without a teacher distribution get a harmless filler (masked out by ``valid``).
        ids_out = torch.arange(kk).expand(B, T, kk).clone()
        lp_out = torch.full((B, T, kk), -math.log(kk))
        tail_out = torch.zeros(B, T)
        un_out = torch.zeros(B, T, kun)
        if dst_p:
            bi, pi = torch.tensor(src_b), torch.tensor(dst_p)
            ids_out[bi, pi] = top_ids.cpu()
            lp_out[bi, pi] = top.cpu()
            tail_out[bi, pi] = tail_mass(top.exp()).cpu()
            un_out[bi, pi] = un_top.cpu()
        cross = CrossParts(valid.to(out_dev), un_out.to(out_dev), span_ids.to(out_dev), span_lp.to(out_dev),
                           self.student_unmatched.to(out_dev))
        return Signal(self.identity, topk_ids=ids_out.to(out_dev), topk_logprobs=lp_out.to(out_dev),
                      tail_mass=tail_out.to(out_dev), cross=cross)

    def _split(self, logp: torch.Tensor, kk: int, kun: int):
        """(top-k log-probs over the matched tokens in student ids, their student ids, the largest
        probabilities over the unmatched tokens) for rows of teacher log-probs."""
        dev = logp.device
        matched = logp.new_full((len(logp), self.student_vocab), float("-inf"))
        for t_ids, s_ids in self._map_rounds:
            # Several teacher tokens with the same bytes add up (in probability) on one student id.
            cur = matched[:, s_ids.to(dev)]
            matched[:, s_ids.to(dev)] = torch.logaddexp(cur, logp[:, t_ids.to(dev)])
        top, top_ids = matched.topk(kk, -1)
        un = logp[:, self.teacher_unmatched.to(dev)]
        un_top = un.topk(kun, -1).values.exp() if kun else un[:, :0]
        return top, top_ids, un_top

    @staticmethod
    def _token_logprobs(logits: torch.Tensor, lse: torch.Tensor, model_ids: list[int]) -> list[float]:
        """log p(token i | tokens before it) for each model token of a row (the first has none: nan)."""
        if len(model_ids) < 2:
            return [float("nan")] * len(model_ids)
        nxt = torch.tensor(model_ids[1:], dtype=torch.long, device=logits.device)
        pos = torch.arange(len(model_ids) - 1, device=logits.device)
        return [float("nan")] + (logits[pos, nxt] - lse[pos]).tolist()

    @staticmethod
    def _span_logprob(tok_lp: list[float], sp, where: list[int]) -> float | None:
        """The teacher's log-probability of a span's tokens given what precedes them, or None when a token
        of it has no predicting position (the row's first token, an edge placeholder)."""
        if sp.t_hi <= sp.t_lo or sp.hi <= sp.lo:
            return None
        total = 0.0
        for j in range(sp.t_lo, sp.t_hi):
            if where[j] < 1:
                return None
            total += tok_lp[where[j]]
        return total
