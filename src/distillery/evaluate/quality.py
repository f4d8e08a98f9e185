"""Held-out quality: perplexity, KL(teacher || student) per token, top-1 agreement with the teacher.

All accumulation is in float64 over every predicted token (position t predicts token t+1), so
the numbers do not depend on the batch size.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


Examples = dict[str, torch.Tensor]  # input_ids [N, T]; optional attention_mask, labels (-100 = not scored)


def as_examples(data: torch.Tensor | Examples) -> Examples:
    """The one form examples take inside Distillery: a dict of ``[N, T]`` tensors. Bare ``[N, T]`` token
    blocks (the public functions accept them) become ``{"input_ids": blocks}``."""
    return data if isinstance(data, dict) else {"input_ids": data}


def head(data: torch.Tensor | Examples, n: int) -> Examples:
    """The first ``n`` examples."""
    return {k: v[:n] for k, v in as_examples(data).items()}


@torch.no_grad()
def evaluate_models(models: dict[str, torch.nn.Module], blocks: torch.Tensor | dict, teacher: torch.nn.Module | None = None,
                    batch_size: int = 8, progress: bool = False) -> dict[str, dict[str, float]]:
    """Score several models on the same blocks; the teacher's logits are computed once per batch.

    ``blocks``: ``[N, T]`` token ids, or a dict with ``input_ids`` and optionally ``attention_mask``
    and ``labels`` (-100 = not scored, e.g. prompt tokens of prompt/response pairs).

    Returns ``{name: {perplexity, nll, kl_to_teacher, top1_agreement, tokens}}``; the teacher
    (when given) is scored under the name ``teacher`` unless it is already among ``models``.
    """
    if teacher is not None and "teacher" not in models:
        models = {"teacher": teacher, **models}
    data = as_examples(blocks)
    ids = data["input_ids"]
    sums = {name: {"nll": 0.0, "kl": 0.0, "agree": 0.0} for name in models}
    tokens = 0
    was_training = {name: m.training for name, m in models.items()}
    for m in models.values():
        m.eval()

    def logprobs(model, batch, attn):
        dev = next(model.parameters()).device
        am = attn.to(dev) if attn is not None else None
        return F.log_softmax(model(input_ids=batch.to(dev), attention_mask=am).logits[:, :-1].double(), -1).cpu()

    bar = tqdm(range(0, len(ids), batch_size), desc="evaluate", disable=not progress, leave=False)
    for start in bar:
        batch = ids[start:start + batch_size]
        attn = data["attention_mask"][start:start + batch_size] if "attention_mask" in data else None
        labels = data["labels"][start:start + batch_size] if "labels" in data else (
            batch if attn is None else batch.masked_fill(attn == 0, -100))
        targets = labels[:, 1:]
        valid = targets != -100  # prompt and padding positions are not scored
        safe = targets.clamp_min(0).unsqueeze(-1)
        t_logp = logprobs(teacher, batch, attn) if teacher is not None else None
        for name, model in models.items():
            logp = t_logp if (model is teacher and t_logp is not None) else logprobs(model, batch, attn)
            s = sums[name]
            s["nll"] -= logp.gather(-1, safe).squeeze(-1)[valid].sum().item()
            if t_logp is not None:
                s["kl"] += (t_logp.exp() * (t_logp - logp)).sum(-1)[valid].sum().item()
                s["agree"] += (logp.argmax(-1) == t_logp.argmax(-1))[valid].sum().item()
        tokens += int(valid.sum())
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
