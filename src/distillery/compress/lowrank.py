"""Low-rank factorization: replace chosen ``nn.Linear`` layers by two thinner ones from a
truncated SVD, plain or activation-aware.

- Plain: W ~ U_r S_r V_r^T, the best rank-r fit to the weights.
- Activation-aware (SVD-LLM's truncation-aware whitening, the idea of ASVD): with the input
  activations' second moment C = E[x x^T] = L L^T (Cholesky), W ~ trunc_r(W L) L^-1, the rank-r
  weight that minimises the error on the *outputs* E||W x - W' x||^2 over the calibration inputs,
  not on the weights.

A factored layer is a ``LowRankLinear``: ``Sequential(Linear(in, r, bias=False), Linear(r, out))``,
so its state-dict keys are ``<name>.0.weight`` and ``<name>.1.weight`` (``.1.bias``).

Saving: ``save_lowrank`` writes an ordinary ``save_pretrained`` folder whose config.json carries
``"distillery_lowrank": {"format": 1, "layers": {name: rank}}``; ``load_lowrank`` rebuilds the
model from the config, swaps those layers for factored shells and loads the weights (plain
``from_pretrained`` would not know the factored keys and leave those layers at random init).
For a plain folder any transformers reads, ``fold_lowrank`` multiplies the factors back into dense
layers (same outputs, no size saving).
"""

from __future__ import annotations

import fnmatch
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

CONFIG_KEY = "distillery_lowrank"
FORMAT = 1


class LowRankError(ValueError):
    """A factorization request that cannot be met; the message names the parameter at fault."""


class LowRankLinear(torch.nn.Sequential):
    """x -> second(first(x)): ``first`` maps in -> rank (no bias), ``second`` rank -> out."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True, *,
                 dtype: torch.dtype | None = None, device=None):
        super().__init__(torch.nn.Linear(in_features, rank, bias=False, dtype=dtype, device=device),
                         torch.nn.Linear(rank, out_features, bias=bias, dtype=dtype, device=device))
        self.in_features, self.out_features, self.rank = in_features, out_features, rank

    def dense_weight(self) -> torch.Tensor:
        return self[1].weight @ self[0].weight

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


# ---------------------------------------------------------------------------------- choosing layers


def select_linears(model: torch.nn.Module, patterns: list[str] | str,
                   exclude: tuple[str, ...] = ("lm_head",)) -> dict[str, torch.nn.Linear]:
    """The ``nn.Linear`` modules whose names match any glob in ``patterns`` (e.g.
    ``model.layers.*.mlp.*``), minus ``exclude`` (the tied output head by default)."""
    patterns = [patterns] if isinstance(patterns, str) else list(patterns)
    found = {name: m for name, m in model.named_modules()
             if type(m) is torch.nn.Linear and any(fnmatch.fnmatchcase(name, p) for p in patterns)
             and not any(fnmatch.fnmatchcase(name, e) for e in exclude)}
    if not found:
        example = next((n for n, m in model.named_modules() if type(m) is torch.nn.Linear), "none")
        raise LowRankError(f"layers: {patterns} match no nn.Linear of the model (names look like {example!r})")
    return found


def _set_module(model: torch.nn.Module, name: str, module: torch.nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


@torch.no_grad()
def input_second_moments(model: torch.nn.Module, names: list[str], blocks: torch.Tensor,
                         batch_size: int = 4) -> dict[str, torch.Tensor]:
    """E[x x^T] (float64) of each named layer's input over the calibration token ``blocks``."""
    if blocks is None or blocks.ndim != 2 or len(blocks) == 0:
        raise LowRankError("calibration blocks: activation-aware factorization needs a [n, tokens] tensor")
    sums: dict[str, torch.Tensor] = {}
    counts = dict.fromkeys(names, 0)

    def hook(name):
        def fn(module, args):
            x = args[0].detach().flatten(0, -2).double()
            sums[name] = sums.get(name, 0) + (x.T @ x).cpu()
            counts[name] += x.shape[0]
        return fn

    handles = [model.get_submodule(n).register_forward_pre_hook(hook(n)) for n in names]
    try:
        device = next(model.parameters()).device
        for start in range(0, len(blocks), batch_size):
            model(input_ids=blocks[start:start + batch_size].to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return {n: sums[n] / counts[n] for n in names}


# ---------------------------------------------------------------------------------- one layer


def choose_rank(singular: torch.Tensor, in_features: int, out_features: int, *, rank: int | None = None,
                energy: float | None = None, param_ratio: float | None = None) -> int:
    """The rank from exactly one of: ``rank``; ``energy`` (smallest r keeping that share of the sum
    of squared singular values); ``param_ratio`` (r * (in + out) <= ratio * in * out)."""
    given = [k for k, v in (("rank", rank), ("energy", energy), ("param_ratio", param_ratio)) if v is not None]
    if len(given) != 1:
        raise LowRankError(f"rank/energy/param_ratio: give exactly one, got {given or 'none'}")
    full = min(in_features, out_features)
    if rank is not None:
        if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= full:
            raise LowRankError(f"rank: {rank!r} is not an integer in [1, {full}]")
        return rank
    if energy is not None:
        if not 0 < energy <= 1:
            raise LowRankError(f"energy: {energy!r} is not in (0, 1]")
        share = torch.cumsum(singular.double().pow(2), 0) / singular.double().pow(2).sum().clamp_min(1e-300)
        return min(int(torch.searchsorted(share, torch.tensor(energy - 1e-12, dtype=share.dtype)).item()) + 1, full)
    if not 0 < param_ratio <= 1:
        raise LowRankError(f"param_ratio: {param_ratio!r} is not in (0, 1]")
    return max(1, min(full, int(param_ratio * in_features * out_features / (in_features + out_features))))


def _whitening(moment: torch.Tensor, damping: float) -> torch.Tensor:
    """L with L L^T = C + damping * mean(diag C) * I; the damping grows until C is positive definite
    (inputs that never vary, such as dead channels, make C singular)."""
    eye = torch.eye(len(moment), dtype=torch.float64)
    scale = moment.diagonal().mean().clamp_min(1e-12)
    for _ in range(8):
        chol, info = torch.linalg.cholesky_ex(moment + damping * scale * eye)
        if info.item() == 0:
            return chol
        damping *= 10
    raise LowRankError("the input second moment is not positive definite even with damping")


@torch.no_grad()
def factor_linear(linear: torch.nn.Linear, *, rank: int | None = None, energy: float | None = None,
                  param_ratio: float | None = None, moment: torch.Tensor | None = None,
                  damping: float = 1e-6) -> LowRankLinear:
    """A ``LowRankLinear`` approximating ``linear``; activation-aware when ``moment`` (E[x x^T]) is given.
    The SVD is computed in float64; the factors take the layer's dtype and device."""
    w = linear.weight.detach().double().cpu()
    out_f, in_f = w.shape
    if moment is None:
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        right = vh
    else:
        if moment.shape != (in_f, in_f):
            raise LowRankError(f"moment: shape {tuple(moment.shape)} does not match the layer's {in_f} inputs")
        chol = _whitening(moment.double().cpu(), damping)
        u, s, vh = torch.linalg.svd(w @ chol, full_matrices=False)
        # V^T L^-1, by a triangular solve: (L^-T V)^T
        right = torch.linalg.solve_triangular(chol.T, vh.T, upper=True).T
    r = choose_rank(s, in_f, out_f, rank=rank, energy=energy, param_ratio=param_ratio)
    root = s[:r].sqrt()  # split the singular values evenly so both factors are on the same scale
    first = root[:, None] * right[:r]
    second = u[:, :r] * root[None, :]
    dtype, device = linear.weight.dtype, linear.weight.device
    out = LowRankLinear(in_f, out_f, r, bias=linear.bias is not None, dtype=dtype, device=device)
    out[0].weight.copy_(first.to(dtype))
    out[1].weight.copy_(second.to(dtype))
    if linear.bias is not None:
        out[1].bias.copy_(linear.bias.detach())
    return out


# ---------------------------------------------------------------------------------- a model


@dataclass
class LowRankReport:
    layers: dict[str, int]
    params_before: int
    params_after: int
    method: str
    originals: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = field(default_factory=dict, repr=False)

    def to_dict(self) -> dict:
        return {"layers": self.layers, "params_before": self.params_before, "params_after": self.params_after,
                "params_fraction": self.params_after / self.params_before, "method": self.method}


@torch.no_grad()
def factorize(model: torch.nn.Module, layers: list[str] | str, *, rank: int | None = None,
              energy: float | None = None, param_ratio: float | None = None, method: str = "svd",
              blocks: torch.Tensor | None = None, batch_size: int = 4, damping: float = 1e-6,
              keep_originals: bool = False) -> LowRankReport:
    """Factor the linears matching ``layers`` in place; ``method`` is ``svd`` (plain) or ``asvd``
    (activation-aware, needs calibration ``blocks``). With ``keep_originals`` the report keeps each
    original weight and bias, for ``OutputMatch`` during re-distillation."""
    if method not in ("svd", "asvd"):
        raise LowRankError(f"method: {method!r} is not one of svd, asvd")
    chosen = select_linears(model, layers)
    before = sum(p.numel() for p in model.parameters())
    moments = input_second_moments(model, list(chosen), blocks, batch_size) if method == "asvd" else {}
    ranks, originals = {}, {}
    for name, linear in chosen.items():
        if keep_originals:
            originals[name] = (linear.weight.detach().clone(),
                               None if linear.bias is None else linear.bias.detach().clone())
        new = factor_linear(linear, rank=rank, energy=energy, param_ratio=param_ratio,
                            moment=moments.get(name), damping=damping)
        _set_module(model, name, new)
        ranks[name] = new.rank
    recorded = dict(getattr(model.config, CONFIG_KEY, None) or {}).get("layers", {})
    setattr(model.config, CONFIG_KEY, {"format": FORMAT, "layers": {**recorded, **ranks}})
    after = sum(p.numel() for p in model.parameters())
    return LowRankReport(ranks, before, after, method, originals)


def factored_layers(model: torch.nn.Module) -> dict[str, int]:
    return {name: m.rank for name, m in model.named_modules() if isinstance(m, LowRankLinear)}


@torch.no_grad()
def fold_lowrank(model: torch.nn.Module) -> torch.nn.Module:
    """Multiply every factored layer back into a dense ``nn.Linear`` (in place): a plain model
    with the factored model's outputs, for export to tools that know nothing of factors."""
    for name, m in list(model.named_modules()):
        if isinstance(m, LowRankLinear):
            dense = torch.nn.Linear(m.in_features, m.out_features, bias=m[1].bias is not None,
                                    dtype=m[0].weight.dtype, device=m[0].weight.device)
            dense.weight.copy_((m[1].weight.double() @ m[0].weight.double()).to(dense.weight.dtype))
            if m[1].bias is not None:
                dense.bias.copy_(m[1].bias)
            _set_module(model, name, dense)
    if hasattr(model.config, CONFIG_KEY):
        delattr(model.config, CONFIG_KEY)
    return model


class OutputMatch:
    """During re-distillation, the optional loss matching each factored layer's output to the
    original dense layer's on the same input (the seed's subspace matching)::

        with OutputMatch(model, report.originals) as match:
            out = model(input_ids=batch)
            loss = kd_loss + beta * match.loss()

    ``loss()`` is the mean over layers of ||y - W x - b||^2 / ||W x + b||^2 for the forward passes
    since the last call."""

    def __init__(self, model: torch.nn.Module, originals: dict[str, tuple[torch.Tensor, torch.Tensor | None]]):
        if not originals:
            raise LowRankError("originals: none kept (factorize(..., keep_originals=True))")
        self.model, self.originals = model, originals
        self.terms: list[torch.Tensor] = []
        self.handles = []

    def __enter__(self) -> OutputMatch:
        for name, (w, b) in self.originals.items():
            module = self.model.get_submodule(name)
            if not isinstance(module, LowRankLinear):
                raise LowRankError(f"{name}: not a factored layer")

            def hook(mod, args, output, w=w, b=b):
                target = torch.nn.functional.linear(args[0].detach(), w.to(output.device, output.dtype),
                                                    None if b is None else b.to(output.device, output.dtype))
                self.terms.append((output - target).pow(2).sum() / target.pow(2).sum().clamp_min(1e-12))
            self.handles.append(module.register_forward_hook(hook))
        return self

    def loss(self) -> torch.Tensor:
        if not self.terms:
            raise LowRankError("OutputMatch.loss: no forward pass through a factored layer since the last call")
        out = torch.stack(self.terms).mean()
        self.terms = []
        return out

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()
        self.handles, self.terms = [], []


# ---------------------------------------------------------------------------------- save / load


def save_lowrank(model: torch.nn.Module, folder: str | os.PathLike, tokenizer=None) -> Path:
    """``save_pretrained`` (atomically) with the factored layers and ranks in config.json."""
    from distillery.io import save_model_folder

    setattr(model.config, CONFIG_KEY, {"format": FORMAT, "layers": factored_layers(model)})
    return save_model_folder(model, folder, tokenizer)


def lowrank_layers(folder: str | os.PathLike) -> dict[str, int] | None:
    """The factored layers a saved folder records, or None for a plain folder."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        return None
    entry = json.loads(path.read_text()).get(CONFIG_KEY)
    if entry is None:
        return None
    if not isinstance(entry, dict) or entry.get("format") != FORMAT or not isinstance(entry.get("layers"), dict):
        raise LowRankError(f"{path}: {CONFIG_KEY} is not a format-{FORMAT} record of factored layers")
    return {str(k): int(v) for k, v in entry["layers"].items()}


def _read_weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (folder / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise LowRankError(f"{folder}: no model.safetensors (or its index) to load")
    state = {}
    for f in files:
        state.update(load_file(folder / f))
    return state


def load_lowrank(folder: str | os.PathLike, *, dtype: torch.dtype | None = None,
                 device: str | torch.device = "cpu") -> torch.nn.Module:
    """Rebuild a model saved by ``save_lowrank`` (a plain folder loads as usual)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = Path(folder)
    ranks = lowrank_layers(folder)
    if ranks is None:
        return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype or "auto").to(device).eval()
    config = AutoConfig.from_pretrained(folder)
    state = _read_weights(folder)
    dtype = dtype or next(iter(state.values())).dtype
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    for name, r in ranks.items():
        try:
            old = model.get_submodule(name)
        except AttributeError:
            raise LowRankError(f"{folder}: {CONFIG_KEY} names {name!r}, which the model does not have") from None
        _set_module(model, name, LowRankLinear(old.in_features, old.out_features, r, bias=old.bias is not None,
                                               dtype=dtype))
    missing, unexpected = model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or ()) if getattr(config, "tie_word_embeddings", False) \
        else set()
    if unexpected or set(missing) - tied:
        raise LowRankError(f"{folder}: weights do not match the factored model "
                           f"(missing {sorted(set(missing) - tied)[:5]}, unexpected {sorted(unexpected)[:5]})")
    if tied:
        model.tie_weights()
    return model.to(device).eval()
