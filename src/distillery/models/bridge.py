"""Linear bridges over dropped layers: a training-free repair of a student cut from the teacher.

After ``cut_layers``, each run of dropped teacher layers i+1..j leaves kept layer i's output where layer
j's used to be. Kept layer i adds its MLP's output ``M`` to the residual stream ``Y``; a square map ``T``
fitted by least squares so that ``Y + M T`` is close to the teacher's output of layer j stands in for the
dropped run, and folds into the MLP's output projection (``down_proj.weight <- T^T W``), so the student
stays the plain model class with the same shapes (ReplaceMe, Shopkhoev et al. 2025, arXiv:2505.02819).

The runs are fitted in layer order on the student as repaired so far, against the teacher's hidden
states: each map also absorbs what the bridges before it missed. ``ridge`` shrinks ``T`` toward the
identity (the plain cut), relative to the mean of ``diag(M^T M)`` so one value suits any width.
"""

from __future__ import annotations

import torch

from distillery.models.layers import decoder_layers


class BridgeError(ValueError):
    pass


class _Stop(Exception):
    """Raised by a hook once it has what it needs: the rest of the forward pass is not computed."""


def _output_projection(layer: torch.nn.Module) -> torch.nn.Linear:
    """The linear layer whose output a decoder block adds, as it is, to its residual stream."""
    down = getattr(getattr(layer, "mlp", None), "down_proj", None)
    # Gemma-style blocks normalise the MLP's output before adding it: no linear map folds into that.
    if not isinstance(down, torch.nn.Linear) or hasattr(layer, "post_feedforward_layernorm"):
        raise BridgeError(f"student.from_teacher.bridge: {type(layer).__name__} does not add mlp.down_proj's "
                          "output straight to its residual stream (Llama, Qwen and Mistral blocks do); "
                          "use bridge: none")
    return down


def dropped_runs(keep: list[int], total: int) -> list[tuple[int, int]]:
    """(student layer index, last dropped teacher layer) for each run of dropped layers that follows a kept
    layer. A run before the first kept layer has no block to fold into and is left as it is."""
    return [(si, nxt - 1) for si, (ti, nxt) in enumerate(zip(keep, [*keep[1:], total])) if nxt > ti + 1]


@torch.no_grad()
def fit_bridges(student: torch.nn.Module, teacher: torch.nn.Module, keep: list[int], blocks: torch.Tensor,
                ridge: float = 0.01, batch_size: int = 8) -> list[dict]:
    """Fit and fold one linear bridge per run of dropped layers (in place). ``keep``: the teacher layers the
    student kept, in order; ``blocks``: calibration token ids. Returns, per bridge, where it sits and the
    mean squared error to the teacher's hidden state before and after it, on the calibration blocks."""
    if ridge < 0:
        raise BridgeError(f"student.from_teacher.bridge_ridge: {ridge} must be >= 0")
    t_layers, s_layers = decoder_layers(teacher), decoder_layers(student)
    if len(s_layers) != len(keep):
        raise BridgeError(f"keep: {len(keep)} layers listed, the student has {len(s_layers)}")
    runs = dropped_runs(keep, len(t_layers))
    if not runs:
        return []
    downs = [_output_projection(s_layers[si]) for si, _ in runs]
    device = next(student.parameters()).device
    batches = [blocks[i:i + batch_size].to(device) for i in range(0, len(blocks), batch_size)]
    targets = _teacher_states(teacher, [j for _, j in runs], batches)
    report = []
    for (si, tj), down in zip(runs, downs):
        d = down.out_features
        gram = torch.zeros(d, d, dtype=torch.float64, device=device)
        cross = torch.zeros_like(gram)
        rr, n = 0.0, 0
        for b, batch in enumerate(batches):
            m, out = _mlp_and_output(student, s_layers[si], batch)
            # what the MLP's output should be for the block to hand on the teacher's state
            r = (targets[tj][b].to(device) - (out - m)).reshape(-1, d).double()
            m = m.reshape(-1, d).double()
            gram += m.T @ m
            cross += m.T @ r
            rr += r.square().sum().item()
            n += m.shape[0]
        eye = torch.eye(d, dtype=torch.float64, device=device)
        shrink = ridge * gram.diagonal().mean()
        t = torch.linalg.solve(gram + shrink * eye, cross + shrink * eye)
        w = down.weight  # on the CPU between forwards if the student streams from there (models/offload.py)
        w.copy_((t.T.to(w.device) @ w.double()).to(w.dtype))
        report.append({"student_layer": si, "after_teacher_layer": keep[si], "replaces": [keep[si] + 1, tj],
                       "mse_before": _sse(eye, gram, cross, rr) / (n * d),
                       "mse_after": _sse(t, gram, cross, rr) / (n * d)})
    return report


def _sse(t: torch.Tensor, gram: torch.Tensor, cross: torch.Tensor, rr: float) -> float:
    """||M t - R||^2 from M^T M, M^T R and ||R||^2."""
    return ((t.T @ gram @ t).trace() - 2 * (t.T @ cross).trace()).item() + rr


def _teacher_states(teacher: torch.nn.Module, layers: list[int], batches: list[torch.Tensor]) -> dict:
    """The teacher's output hidden states of ``layers``, per batch (kept on the CPU)."""
    states: dict[int, list[torch.Tensor]] = {j: [] for j in layers}
    t_layers = decoder_layers(teacher)

    def hook(j):
        def fn(module, args, output):
            states[j].append((output[0] if isinstance(output, tuple) else output).float().cpu())
            if j == layers[-1]:
                raise _Stop
        return fn

    handles = [t_layers[j].register_forward_hook(hook(j)) for j in layers]
    try:
        for batch in batches:
            try:
                teacher(input_ids=batch.to(next(teacher.parameters()).device), use_cache=False)
            except _Stop:
                pass
    finally:
        for h in handles:
            h.remove()
    return states


def _mlp_and_output(model: torch.nn.Module, layer: torch.nn.Module, batch: torch.Tensor):
    """(the MLP's output, the block's output) of ``layer`` on ``batch``; the layers after it are not run."""
    got = {}

    def on_mlp(module, args, output):
        got["m"] = output.float()

    def on_layer(module, args, output):
        got["out"] = (output[0] if isinstance(output, tuple) else output).float()
        raise _Stop

    handles = [layer.mlp.register_forward_hook(on_mlp), layer.register_forward_hook(on_layer)]
    try:
        model(input_ids=batch, use_cache=False)
    except _Stop:
        pass
    finally:
        for h in handles:
            h.remove()
    return got["m"], got["out"]
