"""Compression-aware distillation: train the student under the perturbations it will meet once
compressed, so it learns to survive them.

- Noise: Gaussian noise on the student's logits (applied in the Distiller) and, relative to each
  decoder layer's output scale, on its hidden states (forward hooks, training only).
- QAT: torchao's fake quantization of the student's linear layers during distillation
  (``QATConfig(..., step="prepare")``), removed again before export by torchao's
  ``QATConfig(step="convert")`` so the student is saved as a plain float model whose weights now sit
  well on the quantization grid.
"""

from __future__ import annotations

import contextlib

import torch

from distillery.models.layers import decoder_layers


@contextlib.contextmanager
def hidden_noise(student: torch.nn.Module, noise):
    """Add N(0, (std * rms(h))^2) to every decoder layer's output while inside the block."""
    if noise is None or noise.hidden_std <= 0:
        yield
        return

    def hook(module, args, output):
        h = output[0] if isinstance(output, tuple) else output
        scale = h.detach().float().pow(2).mean(-1, keepdim=True).sqrt().to(h.dtype)
        noisy = h + torch.randn_like(h) * scale * noise.hidden_std
        return (noisy, *output[1:]) if isinstance(output, tuple) else noisy

    handles = [layer.register_forward_hook(hook) for layer in decoder_layers(student)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _fake_quant_configs(qat) -> dict:
    """torchao fake-quantization configs for a recipe scheme (explicit, so no torchao PTQ config
    name has to exist in the installed version)."""
    from torchao.quantization.qat import IntxFakeQuantizeConfig

    weight = IntxFakeQuantizeConfig(torch.int4, group_size=qat.group_size, is_symmetric=True)
    if qat.scheme == "int8_dynamic_act_int4_weight":
        return {"activation_config": IntxFakeQuantizeConfig(torch.int8, "per_token", is_symmetric=False),
                "weight_config": weight}
    return {"weight_config": weight}


def prepare_qat(student: torch.nn.Module, qat) -> torch.nn.Module:
    """Swap the student's linear layers (not its lm_head, which stays float) for fake-quantized ones."""
    try:
        from torchao.quantization import quantize_
        from torchao.quantization.qat import QATConfig
    except ImportError as e:
        raise RuntimeError(f"distill.qat needs torchao (pip install torchao): {e}") from None
    head = student.get_output_embeddings()
    quantize_(student, QATConfig(**_fake_quant_configs(qat), step="prepare"),
              filter_fn=lambda m, fqn: isinstance(m, torch.nn.Linear) and m is not head)
    return student


def strip_qat(student: torch.nn.Module) -> torch.nn.Module:
    """Replace fake-quantized linears by plain ``nn.Linear`` holding the trained weights (for export):
    torchao's own convert step without a PTQ config, which only swaps the modules back."""
    from torchao.quantization import quantize_
    from torchao.quantization.qat import QATConfig

    quantize_(student, QATConfig(step="convert"))
    return student


def has_qat(student: torch.nn.Module) -> bool:
    try:
        from torchao.quantization.qat import FakeQuantizedLinear
    except ImportError:
        return False
    return any(isinstance(m, FakeQuantizedLinear) for m in student.modules())
