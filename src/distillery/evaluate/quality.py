"""Held-out quality: perplexity, KL(teacher || student) per token, top-1 agreement with the teacher.

All accumulation is in float64 over every predicted token (position t predicts token t+1), so
the numbers do not depend on the batch size.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


@torch.no_grad()
def evaluate_models(models: dict[str, torch.nn.Module], blocks: torch.Tensor, teacher: torch.nn.Module | None = None,
                    batch_size: int = 8, progress: bool = False) -> dict[str, dict[str, float]]:
    """Score several models on the same blocks; the teacher's logits are computed once per batch.

    Returns ``{name: {perplexity, nll, kl_to_teacher, top1_agreement, tokens}}``; the teacher
    (when given) is scored under the name ``teacher`` unless it is already among ``models``.
    """
    if teacher is not None and "teacher" not in models:
        models = {"teacher": teacher, **models}
    sums = {name: {"nll": 0.0, "kl": 0.0, "agree": 0.0} for name in models}
    tokens = 0
    was_training = {name: m.training for name, m in models.items()}
    for m in models.values():
        m.eval()
    bar = tqdm(range(0, len(blocks), batch_size), desc="evaluate", disable=not progress, leave=False)
    for start in bar:
        batch = blocks[start:start + batch_size]
        targets = batch[:, 1:]
        t_logp = None
        if teacher is not None:
            dev = next(teacher.parameters()).device
            t_logp = F.log_softmax(teacher(input_ids=batch.to(dev)).logits[:, :-1].double(), -1).cpu()
        for name, model in models.items():
            if model is teacher and t_logp is not None:
                logp = t_logp
            else:
                dev = next(model.parameters()).device
                logp = F.log_softmax(model(input_ids=batch.to(dev)).logits[:, :-1].double(), -1).cpu()
            s = sums[name]
            s["nll"] -= logp.gather(-1, targets.unsqueeze(-1)).sum().item()
            if t_logp is not None:
                s["kl"] += (t_logp.exp() * (t_logp - logp)).sum().item()
                s["agree"] += (logp.argmax(-1) == t_logp.argmax(-1)).sum().item()
        tokens += targets.numel()
    for name, m in models.items():
        m.train(was_training[name])
    out = {}
    for name, s in sums.items():
        nll = s["nll"] / tokens
        out[name] = {"perplexity": math.exp(nll), "nll": nll, "tokens": tokens}
        if teacher is not None:
            out[name]["kl_to_teacher"] = max(s["kl"] / tokens, 0.0)
            out[name]["top1_agreement"] = s["agree"] / tokens
    return out
