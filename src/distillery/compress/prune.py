"""Structured pruning of a Llama-style decoder: depth (whole layers) and width (MLP channels,
attention heads under grouped-query attention, the hidden size), Minitron-style.

Width units are ranked by their activation on calibration token blocks, measured with forward
hooks in one pass: an MLP channel by the size of what it adds to the residual stream
(|a_c| * ||W_down[:, c]||), a query head by the norm of its o_proj output, a key/value group by
the sum over its query heads, a hidden channel by |RMSNorm output| summed over every norm.
Tokens are aggregated by their mean (``aggregate="mean"``) or root mean square (``"l2"``).

The result is a smaller *dense* model: a fresh model of the new config (``head_dim`` written
explicitly, since hidden size / heads no longer gives it) into which the kept slices are copied,
so it saves with ``save_pretrained`` and loads with plain ``AutoModelForCausalLM.from_pretrained``.

Ratios are fractions *removed*, in [0, 1); 0 leaves that axis untouched (and the model's outputs
bit-identical). Head ratios must keep whole key/value groups (``head_mode="groups"``) or the same
number of query heads in every group (``head_mode="queries"``): anything else would break GQA.
"""

from __future__ import annotations

import copy
import functools
import json
import math
import re
from dataclasses import dataclass, field

import torch

from distillery.models.layers import decoder_layers
from distillery.models.student import SCORING, cut_layers, layer_scores, top_layers


class PruneError(ValueError):
    """A pruning request that cannot be met; the message names the parameter at fault."""


AXES = ("layers", "mlp_channels", "heads", "hidden")
HEAD_MODES = ("groups", "queries")


# ---------------------------------------------------------------------------------- shapes


@dataclass(frozen=True)
class Dims:
    """The sizes width/depth pruning changes."""

    layers: int
    intermediate: int
    heads: int
    kv_heads: int
    hidden: int
    head_dim: int

    @classmethod
    def of(cls, config) -> Dims:
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return cls(config.num_hidden_layers, config.intermediate_size, config.num_attention_heads,
                   config.num_key_value_heads, config.hidden_size, head_dim)

    def apply(self, config):
        cfg = copy.deepcopy(config)
        cfg.num_hidden_layers = self.layers
        cfg.intermediate_size = self.intermediate
        cfg.num_attention_heads = self.heads
        cfg.num_key_value_heads = self.kv_heads
        cfg.hidden_size = self.hidden
        cfg.head_dim = self.head_dim  # explicit: hidden_size // heads no longer gives it
        if getattr(cfg, "layer_types", None) and len(cfg.layer_types) != self.layers:
            cfg.layer_types = cfg.layer_types[: self.layers]
        try:  # what from_pretrained will do with it: a config it refuses is refused now
            type(cfg).from_dict(cfg.to_dict())
        except Exception as e:  # noqa: BLE001 - transformers' validators raise several kinds
            raise PruneError(f"the pruned config is not valid for {type(cfg).__name__}: {e}") from None
        return cfg


def _check_ratio(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise PruneError(f"{name}: {value!r} is not a fraction in [0, 1) (the share of it to remove)")
    return float(value)


def _kept(name: str, total: int, ratio: float) -> int:
    keep = round(total * (1 - ratio))
    if keep < 1:
        raise PruneError(f"{name}: {ratio} removes all {total}")
    return keep


def head_plan(heads: int, kv_heads: int, ratio: float, mode: str) -> tuple[int, int]:
    """(query heads, key/value heads) kept when ``ratio`` of the query heads are removed."""
    if mode not in HEAD_MODES:
        raise PruneError(f"head_mode: {mode!r} is not one of {', '.join(HEAD_MODES)}")
    group = heads // kv_heads
    keep = round(heads * (1 - ratio))
    unit = group if mode == "groups" else kv_heads
    if keep < 1 or keep % unit:
        ok = ", ".join(f"{1 - k * unit / heads:.4g}" for k in range(heads // unit - 1, 0, -1)) or "none"
        what = (f"whole key/value groups of {group} query heads" if mode == "groups"
                else f"the same number of query heads in each of the {kv_heads} key/value groups")
        raise PruneError(f"heads: {ratio} keeps {keep} of {heads} query heads, but grouped-query attention "
                         f"with {kv_heads} key/value heads (head_mode={mode}) must keep {what}; "
                         f"fractions that can be removed: {ok}")
    if mode == "groups":
        return keep, keep // group
    return keep, kv_heads


def plan_dims(config, *, layers: float = 0.0, mlp_channels: float = 0.0, heads: float = 0.0,
              hidden: float = 0.0, head_mode: str = "groups") -> Dims:
    """The sizes after pruning these fractions, checked (ValueError naming the parameter)."""
    d = Dims.of(config)
    layers, mlp_channels, heads, hidden = (_check_ratio(n, v) for n, v in
                                           (("layers", layers), ("mlp_channels", mlp_channels),
                                            ("heads", heads), ("hidden", hidden)))
    q, kv = head_plan(d.heads, d.kv_heads, heads, head_mode)
    # transformers' configs (LlamaConfig's validate_architecture) refuse a hidden size that is not a
    # multiple of the head count, even with head_dim explicit: keep whole multiples of it.
    keep_hidden = _kept("hidden", d.hidden // q, hidden) * q if hidden else d.hidden
    return Dims(_kept("layers", d.layers, layers), _kept("mlp_channels", d.intermediate, mlp_channels),
                q, kv, keep_hidden, d.head_dim)


@functools.lru_cache(maxsize=4096)
def _count_cached(config_class: type, config_json: str) -> int:
    from transformers import AutoModelForCausalLM

    cfg = config_class.from_dict(json.loads(config_json))
    with torch.device("meta"):  # shapes only: no memory, no initialisation
        model = AutoModelForCausalLM.from_config(cfg)
    return sum(p.numel() for p in model.parameters())  # parameters() yields tied weights once


def count_params(model_or_config) -> int:
    """Parameters of a model, or of the model a config would build (tied weights counted once)."""
    if isinstance(model_or_config, torch.nn.Module):
        return sum(p.numel() for p in model_or_config.parameters())
    cfg = model_or_config
    return _count_cached(type(cfg), cfg.to_json_string(use_diff=False))


# ---------------------------------------------------------------------------------- importance


@dataclass
class Importance:
    """Per-unit activation importance: ``mlp[l][c]``, ``heads[l][h]`` (query heads), ``hidden[c]``."""

    mlp: torch.Tensor
    heads: torch.Tensor
    hidden: torch.Tensor
    tokens: int = 0

    def kv_groups(self, kv_heads: int) -> torch.Tensor:
        layers, heads = self.heads.shape
        return self.heads.view(layers, kv_heads, heads // kv_heads).sum(-1)


def _hidden_norms(model: torch.nn.Module, hidden: int) -> list[torch.nn.Module]:
    """Every norm over the residual stream (per-layer norms and the final one), not q/k norms."""
    return [m for name, m in model.named_modules()
            if type(m).__name__.endswith("RMSNorm") and ".self_attn." not in f".{name}."
            and getattr(m, "weight", None) is not None and m.weight.shape == (hidden,)]


def _llama_parts(layer) -> tuple[torch.nn.Module, torch.nn.Module]:
    attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    needed = [(attn, "q_proj"), (attn, "k_proj"), (attn, "v_proj"), (attn, "o_proj"),
              (mlp, "gate_proj"), (mlp, "up_proj"), (mlp, "down_proj")]
    if any(part is None or not isinstance(getattr(part, n, None), torch.nn.Linear) for part, n in needed):
        raise PruneError(f"{type(layer).__name__}: width pruning needs Llama-style layers "
                         "(self_attn.q/k/v/o_proj and mlp.gate/up/down_proj as nn.Linear)")
    return attn, mlp


@torch.no_grad()
def activation_importance(model: torch.nn.Module, blocks: torch.Tensor, *, batch_size: int = 4,
                          aggregate: str = "mean") -> Importance:
    """Importance of every MLP channel, query head and hidden channel on ``blocks`` (token ids)."""
    if aggregate not in ("mean", "l2"):
        raise PruneError(f"aggregate: {aggregate!r} is not one of mean, l2")
    if blocks is None or blocks.ndim != 2 or len(blocks) == 0:
        raise PruneError("calibration blocks: need a non-empty [n, tokens] tensor of token ids")
    d = Dims.of(model.config)
    layers = decoder_layers(model)
    mlp = torch.zeros(len(layers), d.intermediate, dtype=torch.float64)
    heads = torch.zeros(len(layers), d.heads, dtype=torch.float64)
    hidden = torch.zeros(d.hidden, dtype=torch.float64)

    def reduce(x: torch.Tensor) -> torch.Tensor:  # [..., units] -> [units], summed over tokens
        x = x.double().flatten(0, -2)
        return (x.abs() if aggregate == "mean" else x.pow(2)).sum(0)

    def mlp_hook(i, down):
        col_norm = down.weight.detach().double().norm(dim=0).cpu()

        def fn(module, args):
            mlp[i] += reduce(args[0]).cpu() * (col_norm if aggregate == "mean" else col_norm.pow(2))
        return fn

    def head_hook(i, o_proj):
        w = o_proj.weight.detach().view(d.hidden, d.heads, d.head_dim)

        def fn(module, args):
            a = args[0].flatten(0, -2).view(-1, d.heads, d.head_dim)
            per_head = torch.einsum("nhk,dhk->nhd", a.to(w.dtype), w).double().norm(dim=-1)  # [tokens, heads]
            heads[i] += (per_head if aggregate == "mean" else per_head.pow(2)).sum(0).cpu()
        return fn

    def norm_hook(module, args, output):
        hidden.add_(reduce(output).cpu())

    handles = []
    try:
        for i, layer in enumerate(layers):
            attn, block = _llama_parts(layer)
            handles.append(block.down_proj.register_forward_pre_hook(mlp_hook(i, block.down_proj)))
            handles.append(attn.o_proj.register_forward_pre_hook(head_hook(i, attn.o_proj)))
        for norm in _hidden_norms(model, d.hidden):
            handles.append(norm.register_forward_hook(norm_hook))
        device = next(model.parameters()).device
        tokens = 0
        for start in range(0, len(blocks), batch_size):
            batch = blocks[start:start + batch_size].to(device)
            model(input_ids=batch, use_cache=False)
            tokens += batch.numel()
    finally:
        for h in handles:
            h.remove()

    def finish(x):
        x = x / max(tokens, 1)
        return x if aggregate == "mean" else x.sqrt()
    return Importance(finish(mlp), finish(heads), finish(hidden), tokens)


# ---------------------------------------------------------------------------------- depth


def prune_depth(model: torch.nn.Module, blocks: torch.Tensor, keep: int, method: str = "influence",
                batch_size: int = 4) -> tuple[torch.nn.Module, list[int]]:
    """A copy of ``model`` keeping its ``keep`` most important layers (in order), and their indices."""
    total = len(decoder_layers(model))
    if not 1 <= keep <= total:
        raise PruneError(f"layers: cannot keep {keep} of {total} layers")
    if keep == total:
        return copy.deepcopy(model), list(range(total))
    if method not in SCORING:
        raise PruneError(f"depth_method: {method!r} is not one of {', '.join(SCORING)}")
    kept = top_layers(layer_scores(model, blocks, method, batch_size), keep)
    return cut_layers(model, kept), kept


# ---------------------------------------------------------------------------------- width


def _top(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest scores, in their original order (stable on ties)."""
    order = torch.sort(scores, descending=True, stable=True).indices[:k]
    return torch.sort(order).values


@dataclass
class Kept:
    hidden: torch.Tensor
    mlp: list[torch.Tensor] = field(default_factory=list)
    q_heads: list[torch.Tensor] = field(default_factory=list)
    kv_heads: list[torch.Tensor] = field(default_factory=list)


def choose_kept(imp: Importance, old: Dims, new: Dims) -> Kept:
    """Which units survive, per layer (every layer keeps the same count, as the config demands)."""
    kept = Kept(hidden=_top(imp.hidden, new.hidden))
    group, new_group = old.heads // old.kv_heads, new.heads // new.kv_heads
    groups = imp.kv_groups(old.kv_heads)
    for layer in range(old.layers):
        kept.mlp.append(_top(imp.mlp[layer], new.intermediate))
        kv = _top(groups[layer], new.kv_heads)
        q = [g * group + _top(imp.heads[layer, g * group:(g + 1) * group], new_group) for g in kv.tolist()]
        kept.kv_heads.append(kv)
        # Query heads stay grouped by their key/value head: new head j reads kv head j // new_group.
        kept.q_heads.append(torch.cat(q))
    return kept


def _rows(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    return (heads[:, None] * head_dim + torch.arange(head_dim)).flatten()


_LAYER = re.compile(r"(?:^|\.)(?:layers|h|blocks)\.(\d+)\.")


def _slice(name: str, tensor: torch.Tensor, kept: Kept, old: Dims, norm_scale: float) -> torch.Tensor:
    hid = kept.hidden
    m = _LAYER.search(name)
    leaf = name.rsplit(".", 2)
    proj, kind = (leaf[-2], leaf[-1]) if len(leaf) >= 2 else ("", leaf[-1])
    if m is None:
        if name.endswith(("embed_tokens.weight", "lm_head.weight")):
            return tensor.index_select(1, hid)
        if tensor.shape == (old.hidden,):  # the final norm
            return tensor[hid] * norm_scale
        raise PruneError(f"{name}: no rule to prune this parameter of shape {tuple(tensor.shape)}")
    i = int(m.group(1))
    q, kv, mlp = _rows(kept.q_heads[i], old.head_dim), _rows(kept.kv_heads[i], old.head_dim), kept.mlp[i]
    out_rows = {"q_proj": q, "k_proj": kv, "v_proj": kv, "o_proj": hid, "gate_proj": mlp, "up_proj": mlp,
                "down_proj": hid}
    in_cols = {"q_proj": hid, "k_proj": hid, "v_proj": hid, "o_proj": q, "gate_proj": hid, "up_proj": hid,
               "down_proj": mlp}
    if proj in out_rows:
        t = tensor.index_select(0, out_rows[proj])
        return t.index_select(1, in_cols[proj]) if kind == "weight" else t
    if proj.endswith("layernorm") and tensor.shape == (old.hidden,):
        return tensor[hid] * norm_scale
    if ".self_attn." in name and tensor.shape == (old.head_dim,):  # per-head q/k norms: unchanged
        return tensor
    raise PruneError(f"{name}: no rule to prune this parameter of shape {tuple(tensor.shape)}")


@torch.no_grad()
def prune_width(model: torch.nn.Module, imp: Importance, new: Dims) -> torch.nn.Module:
    """A fresh dense model of the pruned config holding the kept slices of ``model``'s weights.

    Removing hidden channels shrinks the count in every RMSNorm's mean square. With each norm's
    weight scaled by sqrt(H / H') and its epsilon by H / H', an RMSNorm over the H' kept channels
    equals the original on them whenever the removed channels are zero, so removing channels that
    carry nothing leaves every output unchanged, and removing ones that carry little changes it little."""
    from transformers import AutoModelForCausalLM

    old = Dims.of(model.config)
    if new.layers != old.layers or new.head_dim != old.head_dim:
        raise PruneError("prune_width: layers and head_dim are not changed by width pruning")
    for layer in decoder_layers(model):
        _llama_parts(layer)
    kept = choose_kept(imp, old, new)
    norm_scale = math.sqrt(old.hidden / new.hidden)
    dtype = next(model.parameters()).dtype
    device = next(model.parameters()).device
    cfg = new.apply(model.config)
    if new.hidden != old.hidden:
        cfg.rms_norm_eps = model.config.rms_norm_eps * old.hidden / new.hidden
    pruned = AutoModelForCausalLM.from_config(cfg, dtype=dtype).to(device)
    source = model.state_dict()
    state = {}
    for name, param in pruned.state_dict().items():
        if name not in source:
            raise PruneError(f"{name}: the pruned model has a parameter the source lacks")
        t = _slice(name, source[name], kept, old, norm_scale)
        if t.shape != param.shape:
            raise PruneError(f"{name}: pruned to {tuple(t.shape)} but the new config wants {tuple(param.shape)}")
        state[name] = t.to(param.dtype).contiguous()
    pruned.load_state_dict(state, strict=True)
    if getattr(cfg, "tie_word_embeddings", False):
        pruned.tie_weights()
    pruned.generation_config = copy.deepcopy(model.generation_config)
    return pruned.eval()


# ---------------------------------------------------------------------------------- entry points


@dataclass
class PruneResult:
    model: torch.nn.Module
    report: dict


def prune(model: torch.nn.Module, blocks: torch.Tensor, *, layers: float = 0.0, mlp_channels: float = 0.0,
          heads: float = 0.0, hidden: float = 0.0, head_mode: str = "groups", depth_method: str = "influence",
          aggregate: str = "mean", batch_size: int = 4) -> PruneResult:
    """Remove these fractions of layers, MLP channels, query heads and hidden channels.

    Depth first (scores on the full model), then width with importance measured on the
    depth-pruned model. ``model`` is not modified."""
    target = plan_dims(model.config, layers=layers, mlp_channels=mlp_channels, heads=heads, hidden=hidden,
                       head_mode=head_mode)
    before = count_params(model)
    kept_layers = list(range(model.config.num_hidden_layers))
    current = model
    if target.layers < model.config.num_hidden_layers:
        current, kept_layers = prune_depth(model, blocks, target.layers, depth_method, batch_size)
    old = Dims.of(current.config)
    width = Dims(old.layers, target.intermediate, target.heads, target.kv_heads, target.hidden, old.head_dim)
    if width != old:
        imp = activation_importance(current, blocks, batch_size=batch_size, aggregate=aggregate)
        current = prune_width(current, imp, width)
    elif current is model:
        current = copy.deepcopy(model)
    after = count_params(current)
    report = {
        "ratios": {"layers": layers, "mlp_channels": mlp_channels, "heads": heads, "hidden": hidden},
        "head_mode": head_mode, "depth_method": depth_method, "aggregate": aggregate,
        "params_before": before, "params_after": after, "params_fraction": after / before,
        "kept_layers": kept_layers,
        "config": {"num_hidden_layers": width.layers, "intermediate_size": width.intermediate,
                   "num_attention_heads": width.heads, "num_key_value_heads": width.kv_heads,
                   "hidden_size": width.hidden, "head_dim": width.head_dim},
        "calibration_tokens": int(blocks.numel()) if blocks is not None else 0,
    }
    return PruneResult(current, report)


def solve_ratios(config, target: int | float, *, axes: tuple[str, ...] = ("mlp_channels", "hidden"),
                 tolerance: float = 0.02, head_mode: str = "groups", **fixed: float) -> tuple[dict, int]:
    """One fraction r, removed from every axis in ``axes`` (others as ``fixed``), that brings the
    parameter count nearest ``target`` (a count, or a fraction of the current count if < 1).

    Returns (ratios, predicted parameter count); PruneError naming ``target`` if the nearest
    reachable count is more than ``tolerance`` away (e.g. depth alone moves in whole layers)."""
    bad = [a for a in (*axes, *fixed) if a not in AXES]
    if bad or not axes:
        raise PruneError(f"axes: {bad or 'none given'}: choose from {', '.join(AXES)}")
    if set(axes) & set(fixed):
        raise PruneError(f"axes: {sorted(set(axes) & set(fixed))} both solved for and fixed")
    before = count_params(config)
    if isinstance(target, bool) or not isinstance(target, (int, float)) or target <= 0:
        raise PruneError(f"target: {target!r} is not a positive parameter count or fraction")
    goal = target * before if target < 1 else int(target)
    if goal > before:
        raise PruneError(f"target: {goal:.0f} parameters is more than the model's {before}")

    def count(ratios: dict) -> int:
        return count_params(plan_dims(config, head_mode=head_mode, **ratios).apply(config))

    def nearest(make) -> tuple[float, dict, int]:
        """Bisect r in [0, 1) for make(r)'s count (falling as r grows), keeping the nearest seen."""
        best = (abs(count(make(0.0)) - goal), make(0.0))
        lo, hi = 0.0, 1.0 - 1e-9
        for _ in range(48):
            mid = (lo + hi) / 2
            try:
                n = count(make(mid))
            except PruneError:  # an axis emptied or a head split GQA cannot take: search lower
                hi = mid
                continue
            best = min(best, (abs(n - goal), make(mid)), key=lambda b: b[0])
            lo, hi = (mid, hi) if n > goal else (lo, mid)
        return best[0], best[1], count(best[1])

    err, ratios, n = nearest(lambda r: {**fixed, **{a: r for a in axes}})
    if "mlp_channels" in axes and len(axes) > 1 and err > 0:
        # Coarse axes (hidden moves in multiples of the head count, through the embeddings too) can
        # overshoot: keep their share and let the finest axis, MLP channels, close the gap.
        others = {a: r for a, r in ratios.items() if a != "mlp_channels"}
        err2, ratios2, n2 = nearest(lambda r: {**others, "mlp_channels": r})
        if err2 < err:
            ratios, n = ratios2, n2
    if abs(n - goal) > tolerance * goal:
        raise PruneError(f"target: the nearest reachable size pruning {', '.join(axes)} is {n} parameters, "
                         f"{abs(n - goal) / goal:.1%} from {goal:.0f} (tolerance {tolerance:.0%}); "
                         "add a finer axis (mlp_channels, hidden)")
    return {**{a: 0.0 for a in AXES}, **ratios}, n


def prune_to_target(model: torch.nn.Module, blocks: torch.Tensor, target: int | float, *,
                    axes: tuple[str, ...] = ("mlp_channels", "hidden"), tolerance: float = 0.02,
                    head_mode: str = "groups", depth_method: str = "influence", aggregate: str = "mean",
                    batch_size: int = 4, **fixed: float) -> PruneResult:
    """Prune ``model`` to about ``target`` parameters (a count, or a fraction < 1 of its own),
    solving for the share removed from ``axes``; ``fixed`` sets other axes (e.g. ``heads=1/3``)."""
    ratios, predicted = solve_ratios(model.config, target, axes=axes, tolerance=tolerance, head_mode=head_mode,
                                     **fixed)
    result = prune(model, blocks, head_mode=head_mode, depth_method=depth_method, aggregate=aggregate,
                   batch_size=batch_size, **ratios)
    before = result.report["params_before"]
    goal = target * before if target < 1 else int(target)
    result.report.update(target_params=round(goal), predicted_params=predicted, solved_axes=list(axes),
                         param_error=abs(result.report["params_after"] - goal) / goal)
    return result
