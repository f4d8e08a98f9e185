"""A live teacher model: no grad, eval mode, on its own device and dtype."""

from __future__ import annotations

import torch

from distillery.models.load import DTYPES
from distillery.signals.base import Signal, TeacherIdentity, tail_mass


def place_teacher(model: torch.nn.Module, device: torch.device | str | None = None,
                  dtype: torch.dtype | str | None = None) -> torch.nn.Module:
    """Move a teacher to its own device and dtype. ``dtype="int8"`` quantises its Linear layers
    dynamically (weights int8, activations quantised on the fly; CPU only), which halves to quarters
    its memory beside an fp32 student."""
    if device is not None:
        model = model.to(device)
    if dtype is None:
        return model
    if dtype == "int8":
        dev = next(model.parameters()).device
        if dev.type != "cpu":
            raise ValueError(f"teacher dtype int8: dynamic int8 runs on CPU only (teacher is on {dev})")
        from torch.ao.quantization import quantize_dynamic

        return quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"teacher dtype {dtype!r}: use one of {', '.join([*DTYPES, 'int8'])}")
        dtype = DTYPES[dtype]
    return model.to(dtype)


class OnlineTeacher:
    """Runs the teacher on each batch. With ``top_k`` the top-k is taken on the teacher's device, so
    only k values per token cross to the student's device; otherwise dense logits are returned.

    ``device``/``dtype`` place the teacher apart from the student (e.g. a bf16 teacher on a second
    GPU, or an int8 one on CPU); outputs go to ``output_device`` or the input's device.
    """

    def __init__(self, model: torch.nn.Module, *, model_id: str, tokenizer_fingerprint: str,
                 top_k: int | None = None, temperature: float = 1.0, output_device: torch.device | str | None = None,
                 device: torch.device | str | None = None, dtype: torch.dtype | str | None = None):
        self.model = place_teacher(model, device, dtype).eval()
        self.top_k = top_k
        self.temperature = temperature
        self.output_device = output_device
        self.identity = TeacherIdentity(model_id, tokenizer_fingerprint, temperature if top_k else 1.0, top_k)

    @property
    def device(self) -> torch.device:
        for p in self.model.parameters():
            return p.device
        return torch.device("cpu")  # dynamically quantised models keep their weights in packed params

    @property
    def vocab_size(self) -> int | None:
        return getattr(getattr(self.model, "config", None), "vocab_size", None)

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
        return Signal(self.identity, topk_ids=ids.to(out_dev), topk_logprobs=vals.to(out_dev),
                      tail_mass=tail_mass(vals.exp()).to(out_dev))
