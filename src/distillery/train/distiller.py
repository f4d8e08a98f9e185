"""Distillation as one line in anyone's loop (the ModelOpt pattern)::

    kd = Distiller(student, teacher_signal, losses=recipe.distill.losses)
    loss = kd.loss(batch)          # task CE + alpha * T^2 * KL, as configured
    loss.backward()

``kd.last_terms`` holds every term of the last call, as floats, for logging.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from distillery.losses.divergences import token_kd_loss
from distillery.recipe import LossesConfig
from distillery.signals.base import TeacherSignal


class Distiller:
    def __init__(self, student: torch.nn.Module, teacher: TeacherSignal, losses: LossesConfig | None = None,
                 noise=None):
        self.student = student
        self.teacher = teacher
        self.losses = losses or LossesConfig()
        self.noise = noise
        self.last_terms: dict[str, float] = {}

    def extra_parameters(self) -> list[torch.nn.Parameter]:
        """Trainable parameters that are not the student's (projection heads); never exported."""
        return []

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def loss(self, batch: dict, num_tokens: float | torch.Tensor | None = None, step: int | None = None,
             **overrides) -> torch.Tensor:
        """The training loss of one (micro-)batch.

        ``batch``: ``input_ids [B,T]``, optional ``attention_mask``, ``labels`` (-100 = ignore; default:
        the input ids where the mask is set) and ``loss_mask`` (positions to distil; default: the
        attention mask). ``num_tokens``: the global number of predicted tokens of the whole optimiser
        step (all micro-batches and ranks), so accumulation and data parallelism do not change the loss.
        ``overrides`` (e.g. ``temperature=``, ``weight=``) replace the configured KD values for this call,
        for schedules.
        """
        input_ids = batch["input_ids"]
        attn = batch.get("attention_mask")
        if attn is None:
            attn = torch.ones_like(input_ids)
        labels = batch.get("labels")
        if labels is None:
            labels = input_ids.masked_fill(attn == 0, -100)
        # Position t predicts token t+1: both the task loss and KD use the logits of positions 0..T-2.
        predict = labels[:, 1:] != -100
        kd_mask = batch.get("loss_mask", predict.new_ones(predict.shape))
        kd_mask = kd_mask[:, : predict.shape[1]].bool() & predict

        out = self.student(input_ids=input_ids, attention_mask=attn)
        logits = out.logits[:, :-1]
        if self.noise is not None and self.noise.logits_std > 0 and self.student.training:
            logits = logits + torch.randn_like(logits) * self.noise.logits_std
        kd = self.losses.kd.model_copy(update=overrides)
        n = num_tokens if num_tokens is not None else predict.sum()
        total = logits.new_zeros((), dtype=torch.float32)
        terms = {}
        if self.losses.ce_weight > 0:
            ce = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                 ignore_index=-100, reduction="sum") / torch.as_tensor(n, dtype=torch.float32)
            total = total + self.losses.ce_weight * ce
            terms["ce"] = ce.item()
        if kd.weight > 0:
            signal = self.teacher(input_ids, attn, **{k: v for k, v in batch.items()
                                                      if k not in ("input_ids", "attention_mask", "labels", "loss_mask")})
            signal = signal.select((slice(None), slice(0, logits.shape[1])))
            kl = token_kd_loss(logits, signal, kd_mask, divergence=kd.divergence, temperature=kd.temperature,
                               scale_t2=kd.scale_t2, beta=kd.beta, skew=kd.skew, tail=kd.tail,
                               num_tokens=n, chunk_size=kd.chunk_size)
            total = total + kd.weight * kl
            terms["kd"] = kl.item()
        terms["loss"] = total.item()
        self.last_terms = terms
        return total
