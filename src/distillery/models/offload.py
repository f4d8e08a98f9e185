"""A frozen model (the teacher) larger than the GPU: its decoder layers' weights stay in CPU memory,
pinned, and each layer is copied to the GPU just for its own forward. Everything else (embeddings,
final norm, head, rotary tables) lives on the GPU, so the model's device is still where it computes.

Between forwards a layer's parameters *are* the CPU tensors, so copies of the model (a student cut
from it) hold real weights. The hooks are module-level functions that act only on the layers
registered here: a deep copy of an offloaded layer carries hooks that do nothing until it is
registered too (``offload_like``, which ``cut_layers`` applies, so a cut of an offloaded model
streams the same way).

Kept rather than accelerate's ``cpu_offload``: ours is measured on an H200
(``benchmarks/teacher_placement.py``: identical logits and losses to the resident teacher,
0.98x-1.23x its step time over two runs), accelerate's has not been run side by side with it on a
GPU here, so there is no figure showing it does the same job as well.
"""

from __future__ import annotations

import weakref

import torch

from distillery.models.layers import replace_decoder_layers

# layer -> (execution device, its parameters' CPU tensors, in ``parameters()`` order)
_MASTERS: "weakref.WeakKeyDictionary[torch.nn.Module, tuple[torch.device, list[torch.Tensor]]]" = \
    weakref.WeakKeyDictionary()


def offload_layers(model: torch.nn.Module, device: torch.device | str) -> torch.nn.Module:
    """Keep ``model``'s decoder layers in (pinned) CPU memory and run each on ``device``; the rest of
    the model moves to ``device``. For inference only: the layers no longer take gradients."""
    device = torch.device(device)
    layers = replace_decoder_layers(model, torch.nn.ModuleList())  # move everything but the layers
    model.to(device)
    replace_decoder_layers(model, layers)
    for layer in layers:
        layer.to("cpu").requires_grad_(False)
        for module in layer.modules():  # buffers are small: they live on the device
            for key, buf in module._buffers.items():
                if buf is not None:
                    module._buffers[key] = buf.to(device)
        masters = []
        for p in layer.parameters():
            if device.type == "cuda":
                p.data = p.data.pin_memory()  # pinned: the copy to the GPU is asynchronous and faster
            masters.append(p.data)
        _MASTERS[layer] = (device, masters)
        layer.register_forward_pre_hook(_stream_in)
        layer.register_forward_hook(_stream_out)
    return model


def offload_like(source: torch.nn.Module, copy: torch.nn.Module) -> None:
    """A copy of an offloaded layer (deep copies hold the CPU weights) streams to the same device."""
    entry = _MASTERS.get(source)
    if entry is not None:
        _MASTERS[copy] = (entry[0], [p.data for p in copy.parameters()])


def is_offloaded(model: torch.nn.Module) -> bool:
    return any(m in _MASTERS for m in model.modules())


def _stream_in(module: torch.nn.Module, args) -> None:
    entry = _MASTERS.get(module)
    if entry is not None:
        device, masters = entry
        for p, cpu in zip(module.parameters(), masters):
            p.data = cpu.to(device, non_blocking=True)


def _stream_out(module: torch.nn.Module, args, output) -> None:
    entry = _MASTERS.get(module)
    if entry is not None:  # drop the device copy: the next layer reuses the memory
        for p, cpu in zip(module.parameters(), entry[1]):
            p.data = cpu
