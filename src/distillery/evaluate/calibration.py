"""Calibration: expected and maximum calibration error, and the reliability diagram behind them.

Confidences are split into ``n_bins`` equal-width bins over [0, 1]. With ``n`` examples in all and
``n_b`` in bin ``b``, whose mean confidence is ``conf_b`` and fraction correct ``acc_b``:

    ECE = sum_b (n_b / n) * |acc_b - conf_b|        MCE = max_b over non-empty bins |acc_b - conf_b|

Bin ``b`` holds confidences in ``[b/B, (b+1)/B)`` (torchmetrics' edges, so the two agree on the
same inputs), and the last bin also holds 1.0, where torchmetrics opens a 16th bin for it alone.
Two kinds of confidence are scored:

- next-token: the model's top probability at each position, correct when its argmax is the target;
- answer: the probability a task scorer gave its chosen answer, correct when that answer was right.

Everything is accumulated in float64.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

N_BINS = 15


@dataclass
class Reliability:
    """Per-bin data of a reliability diagram; ``confidence``/``accuracy`` are None for empty bins."""

    lower: list[float]
    upper: list[float]
    count: list[int]
    confidence: list[float | None]
    accuracy: list[float | None]

    def to_dict(self) -> dict:
        return asdict(self)


def _as_double(x, name: str) -> torch.Tensor:
    t = torch.as_tensor(x, dtype=torch.float64).flatten()
    if t.numel() and (t.isnan().any() or t.min() < 0 or t.max() > 1):
        raise ValueError(f"calibration: {name} must lie in [0, 1]")
    return t


def reliability(confidence, correct, n_bins: int = N_BINS) -> Reliability:
    """Bin ``confidence`` (probabilities) against ``correct`` (booleans or 0/1), same length."""
    if n_bins < 1:
        raise ValueError(f"calibration: n_bins must be at least 1, got {n_bins}")
    conf, hit = _as_double(confidence, "confidence"), _as_double(correct, "correct")
    if conf.shape != hit.shape:
        raise ValueError(f"calibration: {conf.numel()} confidences but {hit.numel()} correctness values")
    edges = torch.linspace(0, 1, n_bins + 1, dtype=torch.float64)
    # right=True puts a confidence equal to an edge into the bin that starts there
    idx = (torch.bucketize(conf, edges, right=True) - 1).clamp(0, n_bins - 1)
    count = torch.bincount(idx, minlength=n_bins)
    conf_sum = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, idx, conf)
    hit_sum = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, idx, hit)

    def per_bin(total: torch.Tensor) -> list[float | None]:
        return [(total[b] / count[b]).item() if count[b] else None for b in range(n_bins)]

    return Reliability(edges[:-1].tolist(), edges[1:].tolist(), count.tolist(), per_bin(conf_sum), per_bin(hit_sum))


def calibration_errors(confidence, correct, n_bins: int = N_BINS) -> dict:
    """``{"ece", "mce", "n", "bins": Reliability as a dict}`` of confidences against correctness."""
    rel = reliability(confidence, correct, n_bins)
    n = sum(rel.count)
    gaps = [(c, abs(a - p)) for c, p, a in zip(rel.count, rel.confidence, rel.accuracy) if c]
    ece = sum(c / n * g for c, g in gaps) if n else float("nan")
    mce = max((g for _, g in gaps), default=float("nan"))
    return {"ece": ece, "mce": mce, "n": n, "bins": rel.to_dict()}


def token_confidence(logits: torch.Tensor, targets: torch.Tensor,
                     ignore_index: int = -100) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-1 probability and whether the argmax is the target, for every scored position.

    ``logits``: ``[..., V]`` already aligned with ``targets`` ``[...]`` (position t predicts
    target t); positions whose target is ``ignore_index`` are dropped. Returns two 1-D tensors."""
    if logits.shape[:-1] != targets.shape:
        raise ValueError(f"token_confidence: logits {tuple(logits.shape)} do not match targets {tuple(targets.shape)}")
    keep = targets != ignore_index
    probs = F.softmax(logits[keep].double(), -1)
    conf, pred = probs.max(-1)
    return conf, (pred == targets[keep]).double()


@torch.no_grad()
def model_token_confidence(model: torch.nn.Module, blocks: torch.Tensor | dict,
                           batch_size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`token_confidence` of a model over ``[N, T]`` blocks, or a dict with ``input_ids`` and
    optionally ``attention_mask``/``labels`` (-100 = not scored), as ``evaluate_models`` takes them."""
    data = blocks if isinstance(blocks, dict) else {"input_ids": blocks}
    ids = data["input_ids"]
    dev = next(model.parameters()).device
    was_training = model.training
    model.eval()
    confs, hits = [], []
    for start in range(0, len(ids), batch_size):
        batch = ids[start:start + batch_size]
        attn = data["attention_mask"][start:start + batch_size] if "attention_mask" in data else None
        labels = data["labels"][start:start + batch_size] if "labels" in data else (
            batch if attn is None else batch.masked_fill(attn == 0, -100))
        logits = model(input_ids=batch.to(dev), attention_mask=None if attn is None else attn.to(dev)).logits
        c, h = token_confidence(logits[:, :-1].cpu(), labels[:, 1:])
        confs.append(c)
        hits.append(h)
    model.train(was_training)
    return torch.cat(confs), torch.cat(hits)


def next_token_calibration(model: torch.nn.Module, blocks: torch.Tensor | dict, n_bins: int = N_BINS,
                           batch_size: int = 8) -> dict:
    """ECE, MCE and reliability bins of a model's next-token confidence on held-out blocks."""
    return calibration_errors(*model_token_confidence(model, blocks, batch_size), n_bins=n_bins)
