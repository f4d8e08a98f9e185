"""Distillation as one line in anyone's loop (the ModelOpt pattern)::

    kd = Distiller(student, teacher_signal, losses=recipe.distill.losses)
    loss = kd.loss(batch)          # task CE + alpha * T^2 * KL + beta * hidden ... as configured
    loss.backward()

``kd.last_terms`` holds every term of the last call, as floats, for logging. Projection heads for
hidden-state matching live here (``kd.extra_parameters()``), never in the student, so the exported
student is the plain model.
"""

from __future__ import annotations

import contextlib
import dataclasses

import torch
import torch.nn.functional as F

from distillery.losses.attention import attention_maps_loss, eager_attention, even_attention_pairs
from distillery.losses.balance import LossBalancer
from distillery.losses.cross_vocab import span_kl_loss, uld_loss
from distillery.losses.divergences import KDOptions, token_kd_loss, token_kd_loss_from_hidden
from distillery.losses.hidden import ProjectionHeads, check_layer_map, even_layer_map, hidden_states_loss
from distillery.losses.schedules import Ramp
from distillery.recipe import LossesConfig
from distillery.signals.base import Signal, TeacherSignal
from distillery.train.distributed import is_sharded

_BATCH_KEYS = ("input_ids", "attention_mask", "labels", "loss_mask")


class Distiller:
    def __init__(self, student: torch.nn.Module, teacher: TeacherSignal, losses: LossesConfig | None = None,
                 noise=None):
        self.student = student
        self.teacher = teacher
        self.losses = losses or LossesConfig()
        self.noise = noise
        self.last_terms: dict[str, float] = {}
        self.projector: ProjectionHeads | None = None
        self.hidden_pairs: list[tuple[int, int]] = []
        self.attention_pairs: list[tuple[int, int]] = []
        L = self.losses
        self.representations = L.hidden.weight > 0 or L.attention.weight > 0 or \
            L.schedules.hidden_weight is not None or L.schedules.attention_weight is not None
        if self.representations:
            self._setup_representations()
        kd = L.kd
        self.kd_options = KDOptions(kd.divergence, kd.temperature, kd.beta, kd.skew, kd.tail)
        self.kd_options.check()
        sc = L.schedules
        self.ramps = {key: Ramp(r.start, r.end, r.kind, r.steps, r.delay)
                      for key, r in (("kd", sc.alpha), ("beta", sc.beta), ("hidden", sc.hidden_weight),
                                     ("attention", sc.attention_weight), ("temperature", sc.temperature))
                      if r is not None}
        reference = L.balance.reference or ("ce" if L.ce_weight > 0 else "kd")
        # A teacher with another tokenizer (signals/cross.py) adds the cross-vocabulary terms.
        self.cross = bool(getattr(teacher, "cross_tokenizer", False))
        self.balancer = LossBalancer({"ce": L.ce_weight, "kd": L.kd.weight, "hidden": L.hidden.weight,
                                      "attention": L.attention.weight, "uld": L.cross.uld_weight,
                                      "span": L.cross.span_weight}, L.balance.mode, reference)

    # ---------------------------------------------------------------- set-up

    @property
    def teacher_model(self) -> torch.nn.Module:
        model = getattr(self.teacher, "model", None)
        if model is None:
            raise ValueError("distill.losses.hidden/attention: representation matching needs a live teacher "
                             "(teacher_source: online), not stored or served logits")
        return model

    def _setup_representations(self) -> None:
        student = getattr(self.student, "module", self.student)
        s_cfg, t_cfg = student.config, self.teacher_model.config
        ls, lt = s_cfg.num_hidden_layers, t_cfg.num_hidden_layers
        h = self.losses.hidden
        self.hidden_pairs = (even_layer_map(ls, lt, h.num_pairs) if h.layer_map == "even"
                             else check_layer_map(h.layer_map, ls, lt))
        a = self.losses.attention
        self.attention_pairs = (even_attention_pairs(ls, lt) if a.layer_map == "even"
                                else [tuple(p) for p in a.layer_map])
        for s, t in self.attention_pairs:
            if not (0 <= s < ls and 0 <= t < lt):
                raise ValueError(f"distill.losses.attention.layer_map: pair {[s, t]} outside the models' "
                                 f"{ls} and {lt} layers")
        device = next(student.parameters()).device
        self.projector = ProjectionHeads(self.hidden_pairs, s_cfg.hidden_size, t_cfg.hidden_size).to(device)

    def extra_parameters(self) -> list[torch.nn.Parameter]:
        """Trainable parameters that are not the student's (projection heads); never exported."""
        return list(self.projector.parameters()) if self.projector is not None else []

    def state_dict(self) -> dict:
        return {"projector": self.projector.state_dict()} if self.projector is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if self.projector is not None and "projector" in state:
            self.projector.load_state_dict(state["projector"])

    # ---------------------------------------------------------------- schedules

    def weights_at(self, step: int | None) -> dict[str, float]:
        """Every scheduled value at an optimiser step (the configured constants when step is None)."""
        L = self.losses
        out = {"ce": L.ce_weight, "kd": L.kd.weight, "hidden": L.hidden.weight, "attention": L.attention.weight,
               "temperature": L.kd.temperature, "beta": L.kd.beta, "uld": 0.0, "span": 0.0}
        if self.cross:
            out.update(uld=L.cross.uld_weight, span=L.cross.span_weight)
            if L.cross.mode == "uld":
                out["kd"] = 0.0
        if step is None:
            return out
        out.update({key: ramp(step) for key, ramp in self.ramps.items()})
        if step < L.schedules.representation_start_step:
            out["hidden"] = out["attention"] = 0.0
        return out

    # ---------------------------------------------------------------- the loss

    def loss(self, batch: dict, num_tokens: float | torch.Tensor | None = None,
             step: int | None = None) -> torch.Tensor:
        """The training loss of one (micro-)batch.

        ``batch``: ``input_ids [B,T]``, optional ``attention_mask``, ``labels`` (-100 = ignore; default:
        the input ids where the mask is set) and ``loss_mask`` (positions to distil; default: all
        predicted positions); other keys (e.g. ``example_ids``) go to the teacher signal.
        ``num_tokens``: the predicted tokens of the whole optimiser step (all micro-batches and ranks),
        so accumulation and data parallelism do not change the loss. ``step`` evaluates the recipe's
        schedules.
        """
        input_ids = batch["input_ids"]
        attn = batch.get("attention_mask")
        if attn is None:
            attn = torch.ones_like(input_ids)
        labels = batch.get("labels")
        if labels is None:
            labels = input_ids.masked_fill(attn == 0, -100)
        # Position t predicts token t+1: every term uses positions 0..T-2.
        predict = labels[:, 1:] != -100
        mask = batch.get("loss_mask", predict.new_ones(predict.shape))[:, : predict.shape[1]].bool() & predict
        n = num_tokens if num_tokens is not None else predict.sum()
        w = self.weights_at(step)
        need_hidden = self.representations and w["hidden"] > 0
        need_attn = self.representations and w["attention"] > 0
        head = self._fusable_head(w, need_hidden or need_attn or w["uld"] > 0 or w["span"] > 0,
                                  self.losses.kd.fused_lm_head)
        logits, hidden, out = self._student_forward(input_ids, attn, head, need_hidden, need_attn)

        terms: dict[str, torch.Tensor] = {}
        if w["ce"] > 0:
            terms["ce"] = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                          ignore_index=-100, reduction="sum") / torch.as_tensor(n, dtype=torch.float32)
        if w["kd"] > 0 or need_hidden or need_attn or w["uld"] > 0 or w["span"] > 0:
            extra = {k: v for k, v in batch.items() if k not in _BATCH_KEYS}
            signal, t_out = self._teacher(input_ids, attn, extra, need_hidden, need_attn)
            if signal.cross is not None:
                signal = signal.select((slice(None), slice(0, input_ids.shape[1] - 1)))
                terms.update(self._cross_terms(logits, input_ids, signal, mask, w, n))
                mask = mask & signal.cross.valid  # the matched part: only where the teacher has a distribution
            if w["kd"] > 0:
                if signal.cross is None:
                    signal = signal.select((slice(None), slice(0, input_ids.shape[1] - 1)))
                opts = self._kd_options_at(w)
                kw = dict(opts=opts, scale_t2=self.losses.kd.scale_t2, num_tokens=n,
                          chunk_size=self.losses.kd.chunk_size)
                terms["kd"] = (token_kd_loss_from_hidden(hidden, head.weight, signal, mask, lm_head_bias=head.bias, **kw)
                               if head is not None else token_kd_loss(logits, signal, mask, **kw))
            if need_hidden:
                h = self.losses.hidden
                terms["hidden"] = hidden_states_loss([s[:, :-1] for s in out.hidden_states],
                                                     [t[:, :-1] for t in t_out.hidden_states], self.hidden_pairs, mask,
                                                     projector=self.projector, kind=h.kind,
                                                     temperature=h.infonce_temperature, num_tokens=n)
            if need_attn:
                terms["attention"] = attention_maps_loss([a[:, :, :-1] for a in out.attentions],
                                                         [a[:, :, :-1] for a in t_out.attentions], self.attention_pairs,
                                                         mask, head_mode=self.losses.attention.head_mode, num_tokens=n)
        if not terms:
            raise ValueError("distill.losses: every loss weight is 0 at this step; nothing to train on")
        total, logs = self.balancer(terms, {k: w[k] for k in terms})
        self.last_terms = {**{k.removeprefix("loss/"): v for k, v in logs.items() if k != "loss/total"},
                           "loss": logs["loss/total"]}
        return total

    def _cross_terms(self, logits, input_ids, signal: Signal, mask, w: dict, n) -> dict[str, torch.Tensor]:
        """ULD and span-level KL against a teacher with another tokenizer (losses/cross_vocab.py)."""
        cross, c, out = signal.cross, self.losses.cross, {}
        valid = mask & cross.valid
        if w["uld"] > 0:
            if c.mode == "hybrid":  # the unmatched rest of both distributions
                teacher_sorted, subset = cross.unmatched_probs, cross.student_unmatched
            else:  # all of them: the teacher's largest probabilities, shared tokens or not
                both = torch.cat([signal.topk_logprobs.float().exp(), cross.unmatched_probs.float()], -1)
                teacher_sorted, subset = both.topk(min(signal.topk_ids.shape[-1], both.shape[-1]), -1).values, None
            out["uld"] = uld_loss(logits, teacher_sorted, valid, k=c.uld_k, temperature=w["temperature"],
                                  student_subset=subset, num_tokens=n, chunk_size=self.losses.kd.chunk_size)
        if w["span"] > 0:
            out["span"] = span_kl_loss(logits, input_ids[:, 1:], cross.span_ids, cross.span_logprob, mask,
                                       num_tokens=n)
        return out

    def _kd_options_at(self, w: dict) -> KDOptions:
        """The KD options, with the scheduled temperature and beta of this step when they are scheduled."""
        o = self.kd_options
        if (w["temperature"], w["beta"]) == (o.temperature, o.beta):
            return o
        return dataclasses.replace(o, temperature=w["temperature"], beta=w["beta"])

    def _student_forward(self, input_ids, attn, head, hidden_states: bool, attentions: bool):
        """(logits [B, T-1, V] or None, last hidden state [B, T-1, H] or None, model output or None). With a
        fusable ``head`` only the backbone runs: the KD loss builds the logits chunk by chunk."""
        student = getattr(self.student, "module", self.student)
        if head is not None:
            return None, student.base_model(input_ids=input_ids, attention_mask=attn).last_hidden_state[:, :-1], None
        with eager_attention(student) if attentions else contextlib.nullcontext():
            out = self.student(input_ids=input_ids, attention_mask=attn, output_hidden_states=hidden_states,
                               output_attentions=attentions)
        logits = out.logits[:, :-1]
        if self.noise is not None and self.noise.logits_std > 0 and student.training:
            logits = logits + torch.randn_like(logits) * self.noise.logits_std
        return logits, None, out

    def _fusable_head(self, w: dict, representations: bool, enabled: bool) -> torch.nn.Linear | None:
        """The student's lm_head when the KD loss can be fused with it: KD is the only logit loss, there
        is no logit noise, the model's logits are a plain linear map of its last hidden state, and the
        student is not wrapped by DDP/FSDP (whose hooks run only through the wrapper's forward)."""
        if not enabled or w["ce"] > 0 or w["kd"] <= 0 or representations or self.student is not \
                getattr(self.student, "module", self.student) or (self.noise is not None and self.noise.logits_std > 0):
            return None
        if is_sharded(self.student):
            return None
        cfg = self.student.config
        if getattr(cfg, "final_logit_softcapping", None) or getattr(cfg, "logit_scale", None) not in (None, 1, 1.0):
            return None  # Gemma-style soft-capping or Cohere-style scaling sit between head and logits
        head = self.student.get_output_embeddings()
        base = getattr(self.student, "base_model", None)
        if not isinstance(head, torch.nn.Linear) or base is None or base is self.student:
            return None
        return head

    def _teacher(self, input_ids, attn, extra: dict, hidden: bool, attentions: bool):
        """The teacher's signal, plus its hidden states / attention maps when representations are matched."""
        if not (hidden or attentions):
            return self.teacher(input_ids, attn, **extra), None
        model = self.teacher_model
        dev = next(model.parameters()).device
        with torch.no_grad(), eager_attention(model) if attentions else contextlib.nullcontext():
            t_out = model(input_ids=input_ids.to(dev), attention_mask=attn.to(dev), output_hidden_states=hidden,
                          output_attentions=attentions)
        return Signal(self.teacher.identity, logits=t_out.logits.to(input_ids.device)), t_out
