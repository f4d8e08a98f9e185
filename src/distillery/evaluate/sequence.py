"""Sequence-level divergence under the intended decoding: the teacher and a variant continue the same
held-out prompts, and their continuations are compared as text.

Prompts are the first ``prompt_tokens`` tokens of held-out blocks, given to every model as the same
token ids (the variants share the teacher's tokenizer, as the teacher-forced metrics assume). Each
model continues them greedily and sampled with the recipe's sampling settings. Sampling uses common
random numbers: every batch is drawn after ``torch.manual_seed(seed + batch)``, the same for the
teacher and the variant, so a variant whose next-token distributions equal the teacher's samples the
same text, and a close one mostly does; the metric measures the models, not the dice.

Per prompt: ``rouge_l`` (rouge-score's ROUGE-L F-measure of the variant's continuation against the
teacher's; two identical continuations score 1, also when they hold no word rouge-score counts) and
``exact_match`` (the two continuations, stripped, are the same text). Metrics are named
``seq_rouge_l_greedy``, ``seq_exact_match_greedy``, ``seq_rouge_l_sampling``, ``seq_exact_match_sampling``.
"""

from __future__ import annotations

import math

import torch

from distillery.evaluate.quality import Examples, as_examples
from distillery.evaluate.stats import bootstrap_ci
from distillery.evaluate.text import rouge_l

DECODINGS = ("greedy", "sampling")
MEASURES = ("rouge_l", "exact_match")
METRICS = tuple(f"seq_{m}_{d}" for d in DECODINGS for m in MEASURES)


class SequenceError(ValueError):
    """Held-out data too short for the requested prompts; the message says what is missing."""


def heldout_prompts(examples: Examples | torch.Tensor, n: int, prompt_tokens: int) -> list[list[int]]:
    """The first ``prompt_tokens`` real (unpadded) tokens of the first ``n`` examples that have more than
    that many (one token at least is left to predict, so the prompt is text the model had not ended)."""
    data = as_examples(examples)
    ids, mask = data["input_ids"], data.get("attention_mask")
    out = []
    for i in range(len(ids)):
        row = ids[i][mask[i].bool()] if mask is not None else ids[i]
        if len(row) > prompt_tokens:
            out.append(row[:prompt_tokens].tolist())
        if len(out) == n:
            break
    if not out:
        raise SequenceError(f"sequence: no held-out example is longer than prompt_tokens={prompt_tokens}")
    return out


@torch.no_grad()
def continuations(model, tokenizer, prompts: list[list[int]], *, new_tokens: int, decoding: str = "greedy",
                  sampling: dict | None = None, seed: int = 0, batch_size: int = 8) -> list[str]:
    """Each prompt's continuation as text (up to the first EOS, special tokens dropped)."""
    from distillery.evaluate.speed import _eos_ids, _generation_config

    cfg = _generation_config(model, tokenizer, decoding, new_tokens, False, dict(sampling or {}))
    eos = _eos_ids(model, tokenizer)
    dev = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = []
    try:
        for b, start in enumerate(range(0, len(prompts), batch_size)):
            batch = prompts[start:start + batch_size]
            width = max(len(p) for p in batch)
            ids = torch.tensor([[cfg.pad_token_id] * (width - len(p)) + p for p in batch], device=dev)
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=dev)
            torch.manual_seed(seed + b)  # the same draws for every model: common random numbers
            gen = model.generate(input_ids=ids, attention_mask=mask, generation_config=cfg)[:, width:].cpu()
            for row in gen.tolist():
                end = next((i for i, t in enumerate(row) if t in eos), len(row))
                out.append(tokenizer.decode(row[:end], skip_special_tokens=True).strip())
    finally:
        model.train(was_training)
    return out


def pair_scores(reference: list[str], other: list[str]) -> dict[str, list[float]]:
    """Per prompt ROUGE-L and exact match of ``other``'s continuations against ``reference``'s."""
    rouge = rouge_l(other, reference)
    same = [float(a == b) for a, b in zip(other, reference)]
    return {"rouge_l": [1.0 if s else r for r, s in zip(rouge, same)], "exact_match": same}


def sequence_divergence(models: dict, teacher, tokenizer, examples: Examples | torch.Tensor, *, prompts: int = 16,
                        prompt_tokens: int = 16, new_tokens: int = 32, sampling: dict | None = None,
                        seed: int = 0, batch_size: int = 8, prefix: str = "") -> dict:
    """Every model of ``models`` (the teacher may be among them: it then scores 1) against ``teacher``.

    Returns ``{"metrics": {variant: {metric: {"value", "interval"}}}, "per_example": {variant: {metric:
    {id: score}}}, "samples": {"prompts": [text], decoding: {"teacher": [text], variant: [text]}}}``;
    ids are ``<prefix><index>``."""
    ids = heldout_prompts(examples, prompts, prompt_tokens)
    keys = [f"{prefix}{i}" for i in range(len(ids))]
    samples: dict = {"prompts": [tokenizer.decode(p, skip_special_tokens=True) for p in ids]}
    metrics: dict = {v: {} for v in models}
    per_example: dict = {v: {} for v in models}
    for decoding in DECODINGS:
        def generate(model):
            return continuations(model, tokenizer, ids, new_tokens=new_tokens, decoding=decoding,
                                 sampling=sampling, seed=seed, batch_size=batch_size)

        texts = {"teacher": generate(teacher)}
        for v, model in models.items():
            if v not in texts:
                texts[v] = texts["teacher"] if model is teacher else generate(model)
        samples[decoding] = texts
        for v in models:
            for measure, scores in pair_scores(texts["teacher"], texts[v]).items():
                name = f"seq_{measure}_{decoding}"
                ci = bootstrap_ci(scores, seed=seed)
                metrics[v][name] = {"value": math.fsum(scores) / len(scores), "interval": [ci["low"], ci["high"]]}
                per_example[v][name] = dict(zip(keys, scores))
    return {"metrics": metrics, "per_example": per_example, "samples": samples}
