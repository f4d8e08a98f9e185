"""A live teacher model: no grad, eval mode, on its own device and dtype."""

from __future__ import annotations

import torch

from distillery.signals.base import Signal, TeacherIdentity


class OnlineTeacher:
    """Runs the teacher on each batch. With ``top_k`` the top-k is taken on the teacher's device, so
    only k values per token cross to the student's device; otherwise dense logits are returned."""

    def __init__(self, model: torch.nn.Module, *, model_id: str, tokenizer_fingerprint: str,
                 top_k: int | None = None, temperature: float = 1.0, output_device: torch.device | str | None = None):
        self.model = model.eval()
        self.top_k = top_k
        self.temperature = temperature
        self.output_device = output_device
        self.identity = TeacherIdentity(model_id, tokenizer_fingerprint, temperature if top_k else 1.0, top_k)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **batch) -> Signal:
        dev = self.device
        out_dev = self.output_device or input_ids.device
        am = attention_mask.to(dev) if attention_mask is not None else None
        logits = self.model(input_ids=input_ids.to(dev), attention_mask=am).logits
        if self.top_k is None:
            return Signal(self.identity, logits=logits.to(out_dev))
        logp = torch.log_softmax(logits.float() / self.temperature, dim=-1)
        vals, ids = logp.topk(self.top_k, dim=-1)
        tail = (1.0 - vals.exp().sum(-1)).clamp_min(0.0)
        return Signal(self.identity, topk_ids=ids.to(out_dev), topk_logprobs=vals.to(out_dev),
                      tail_mass=tail.to(out_dev))
