"""Local task files (JSONL) and how a model is scored on them, one result per example.

Two kinds of row; a file holds one kind:

- multiple choice: ``{"id", "prompt", "choices": [str, ...], "answer": index, "tags": [...]}``.
  Each choice is scored by its log-likelihood as a continuation of the prompt,
  ``LL(c) = sum_i log p(c_i | prompt, c_<i)``, over the choice's tokens. The prediction is
  ``argmax LL``; the length-normalised prediction is ``argmax LL / len(choice)`` in characters
  (lm-evaluation-harness' ``acc_norm``; characters, not tokens, so it compares across tokenizers). The answer
  confidence is the softmax of the LLs over the choices, at the predicted one.
- generation: ``{"id", "prompt", "answer", "tags", "answer_type"?}``. Greedy decoding; the first
  non-empty line of the response is the prediction (for ``answer_type: "number"`` the number in it,
  as ``data.prompts.extract_answer`` finds it), scored by exact match and token F1 after SQuAD's
  normalisation (case, punctuation and articles ignored), or for ``answer_type: "exact"`` with
  case and words kept (only spaces and a final full stop ignored: a formatting task).

The text scored for a choice is ``prompt + delimiter + choice`` and is tokenized the way
lm-evaluation-harness does it (the whole string and the prompt are encoded separately and the
choice's tokens are what the whole has beyond the prompt; spaces at the prompt's end move to the
choice), so the two agree on the same examples. Tags make slices: every metric is also reported for
the examples that carry each tag.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from distillery.data.sources import DataError, jsonl_rows
from distillery.evaluate.calibration import calibration_errors
from distillery.evaluate.stats import bootstrap_ci
from distillery.evaluate.text import exact_match, normalize_answer, normalize_spaces, token_f1
from distillery.io import atomic_write_text

ANSWER_TYPES = (None, "number", "text", "exact")


class TaskError(ValueError):
    """A task file that cannot be used; the message names the file and line."""


@dataclass(frozen=True)
class ChoiceExample:
    id: str
    prompt: str
    choices: tuple[str, ...]
    answer: int
    tags: tuple[str, ...] = ()


@dataclass(frozen=True)
class GenerationExample:
    id: str
    prompt: str
    answer: str
    tags: tuple[str, ...] = ()
    answer_type: str | None = None


@dataclass
class Task:
    name: str
    kind: str  # "multiple_choice" | "generation"
    examples: list = field(default_factory=list)


# ---------------------------------------------------------------- files


def _example(row: dict, where: str) -> ChoiceExample | GenerationExample:
    if not isinstance(row, dict):
        raise TaskError(f"{where}: a row must be a JSON object")
    for key in ("id", "prompt", "answer"):
        if key not in row:
            raise TaskError(f"{where}: no field {key!r}")
    if not isinstance(row["prompt"], str) or not row["prompt"]:
        raise TaskError(f"{where}: field 'prompt' must be a non-empty string")
    tags = row.get("tags", [])
    if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
        raise TaskError(f"{where}: field 'tags' must be a list of strings")
    if "choices" in row:
        choices, answer = row["choices"], row["answer"]
        if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
            raise TaskError(f"{where}: field 'choices' must be a list of at least two non-empty strings")
        if not isinstance(answer, int) or isinstance(answer, bool) or not 0 <= answer < len(choices):
            raise TaskError(f"{where}: field 'answer' must be an index into 'choices' (0..{len(choices) - 1})")
        return ChoiceExample(str(row["id"]), row["prompt"], tuple(choices), answer, tuple(tags))
    if not isinstance(row["answer"], (str, int, float)) or isinstance(row["answer"], bool):
        raise TaskError(f"{where}: field 'answer' must be a string or a number")
    answer_type = row.get("answer_type")
    if answer_type not in ANSWER_TYPES:
        raise TaskError(f"{where}: field 'answer_type' must be one of {', '.join(map(repr, ANSWER_TYPES[1:]))},"
                        f" got {answer_type!r}")
    return GenerationExample(str(row["id"]), row["prompt"], str(row["answer"]), tuple(tags), answer_type)


def read_task(path: str | Path, name: str | None = None) -> Task:
    """A task file; its kind comes from its rows (``choices`` = multiple choice), all of one kind."""
    path = Path(path)
    try:
        rows = jsonl_rows(path)
    except FileNotFoundError:
        raise TaskError(f"{path}: no such task file") from None
    except DataError as e:
        raise TaskError(str(e)) from None
    examples, seen = [], set()
    for n, row in rows:
        ex = _example(row, f"{path}:{n}")
        if examples and type(ex) is not type(examples[0]):
            raise TaskError(f"{path}:{n}: mixes multiple-choice and generation rows")
        if ex.id in seen:
            raise TaskError(f"{path}:{n}: duplicate id {ex.id!r}")
        seen.add(ex.id)
        examples.append(ex)
    if not examples:
        raise TaskError(f"{path}: no examples")
    kind = "multiple_choice" if isinstance(examples[0], ChoiceExample) else "generation"
    return Task(name or path.stem, kind, examples)


def write_task(path: str | Path, rows: Sequence[dict]) -> Path:
    """Validate ``rows`` as task rows and write them as JSONL, atomically."""
    for n, row in enumerate(rows, 1):
        _example(row, f"{path}: row {n}")
    return atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


# ---------------------------------------------------------------- multiple choice


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Context and continuation tokens as lm-evaluation-harness' ``_encode_pair`` makes them."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer(context + continuation)["input_ids"]
    ctx = tokenizer(context)["input_ids"]
    return ctx, whole[len(ctx):]


def _max_length(model) -> int:
    return int(getattr(model.config, "max_position_embeddings", 2048) or 2048)


@torch.no_grad()
def continuation_logprobs(model, pairs: Sequence[tuple[list[int], list[int]]],
                          batch_size: int = 8) -> list[list[float]]:
    """Per-token log-probabilities (float64) of each continuation given its context.

    The model sees ``(context + continuation)[:-1]``, left-truncated to its maximum length and
    right-padded in a batch (causal attention: padding after a sequence cannot change it)."""
    dev = next(model.parameters()).device
    limit = _max_length(model)
    out: list[list[float]] = []
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        if any(len(cont) > limit for _, cont in chunk):
            raise TaskError(f"a continuation is longer than the model's {limit} positions")
        seqs = [(ctx + cont)[-(limit + 1):][:-1] for ctx, cont in chunk]
        width = max(len(s) for s in seqs)
        ids = torch.zeros(len(seqs), width, dtype=torch.long)
        mask = torch.zeros(len(seqs), width, dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, :len(s)] = torch.tensor(s)
            mask[i, :len(s)] = 1
        logits = model(input_ids=ids.to(dev), attention_mask=mask.to(dev)).logits
        for i, ((_, cont), s) in enumerate(zip(chunk, seqs)):
            # the last len(cont) positions of the input predict the continuation's tokens; only
            # those rows are upcast, never the whole [batch, time, vocab] tensor
            rows = F.log_softmax(logits[i, len(s) - len(cont):len(s)].double(), -1).cpu()
            out.append(rows.gather(-1, torch.tensor(cont).unsqueeze(-1)).squeeze(-1).tolist())
    return out


def score_multiple_choice(model, tokenizer, examples: Sequence[ChoiceExample], delimiter: str = " ",
                          batch_size: int = 8) -> list[dict]:
    """One result per example: log-likelihood of each choice, predictions, correctness, confidence."""
    pairs = []
    for ex in examples:
        for choice in ex.choices:
            ctx, cont = encode_pair(tokenizer, ex.prompt, delimiter + choice)
            if not cont:
                raise TaskError(f"task example {ex.id!r}: choice {choice!r} has no tokens after the prompt")
            pairs.append((ctx, cont))
    token_logps = continuation_logprobs(model, pairs, batch_size)
    results, k = [], 0
    for ex in examples:
        lls = [math.fsum(token_logps[k + j]) for j in range(len(ex.choices))]
        k += len(ex.choices)
        norm = [ll / len(c) for ll, c in zip(lls, ex.choices)]
        pred, pred_norm = _argmax(lls), _argmax(norm)
        top = max(lls)
        confidence = 1.0 / math.fsum(math.exp(ll - top) for ll in lls)  # softmax at the argmax
        results.append({"id": ex.id, "tags": list(ex.tags), "answer": ex.answer, "loglik": lls,
                        "pred": pred, "pred_norm": pred_norm, "correct": float(pred == ex.answer),
                        "correct_norm": float(pred_norm == ex.answer), "confidence": confidence})
    return results


def _argmax(values: Sequence[float]) -> int:
    return max(range(len(values)), key=lambda i: values[i])  # first of ties, like numpy


# ---------------------------------------------------------------- generation


def _prediction(response: str, answer_type: str | None) -> str:
    from distillery.data.prompts import extract_answer

    line = next((ln.strip() for ln in response.splitlines() if ln.strip()), "")
    if answer_type == "number":
        return extract_answer(line, "number") or ""
    return line


@torch.no_grad()
def greedy_responses(model, tokenizer, prompts: Sequence[str], max_new_tokens: int = 24,
                     batch_size: int = 8) -> list[str]:
    """Greedy continuations of already rendered prompts, batched with left padding."""
    dev = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = []
    for start in range(0, len(prompts), batch_size):
        enc = [tokenizer(p)["input_ids"] for p in prompts[start:start + batch_size]]
        width = max(len(e) for e in enc)
        ids = torch.tensor([[pad] * (width - len(e)) + e for e in enc])
        mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in enc])
        gen = model.generate(input_ids=ids.to(dev), attention_mask=mask.to(dev), do_sample=False,
                             max_new_tokens=max_new_tokens, pad_token_id=pad)
        out += tokenizer.batch_decode(gen[:, width:].cpu(), skip_special_tokens=True)
    return out


def score_generation(model, tokenizer, examples: Sequence[GenerationExample], max_new_tokens: int = 24,
                     batch_size: int = 8, chat: bool = False) -> list[dict]:
    """One result per example: the response, the prediction taken from it, exact match and token F1.
    With ``chat`` the prompt goes through the tokenizer's chat template (an instruct model)."""
    from distillery.data.prompts import Prompt, render

    texts = [render(Prompt(ex.id, ex.prompt), tokenizer, chat=chat) for ex in examples]
    responses = greedy_responses(model, tokenizer, texts, max_new_tokens, batch_size)
    results = []
    for ex, response in zip(examples, responses):
        pred = _prediction(response, ex.answer_type)
        norm = normalize_spaces if ex.answer_type == "exact" else normalize_answer
        results.append({"id": ex.id, "tags": list(ex.tags), "answer": ex.answer, "response": response,
                        "prediction": pred, "exact_match": exact_match(pred, ex.answer, norm),
                        "token_f1": token_f1(pred, ex.answer, norm)})
    return results


# ---------------------------------------------------------------- summaries

METRICS = {"multiple_choice": ("accuracy", "accuracy_norm"), "generation": ("exact_match", "token_f1")}
_FIELD = {"accuracy": "correct", "accuracy_norm": "correct_norm", "exact_match": "exact_match",
          "token_f1": "token_f1"}


def summarise(kind: str, results: list[dict], *, n_resamples: int = 1000, seed: int = 0,
              n_bins: int = 15) -> dict:
    """``{"metrics": {name: mean, "n"}, "intervals": {name: [low, high]}, "slices": {tag: {name: mean, "n"}}}``.

    Intervals are percentile bootstrap intervals (95%) of each per-example mean; multiple choice also
    gets ``ece``/``mce`` of its answer confidence."""
    names = METRICS[kind]

    def means(rows: list[dict]) -> dict:
        return {**{m: math.fsum(r[_FIELD[m]] for r in rows) / len(rows) for m in names}, "n": len(rows)}

    out = {"metrics": means(results), "intervals": {}, "slices": {}}
    for m in names:
        ci = bootstrap_ci([r[_FIELD[m]] for r in results], n_resamples=n_resamples, seed=seed)
        out["intervals"][m] = [ci["low"], ci["high"]]
    if kind == "multiple_choice":
        cal = calibration_errors([r["confidence"] for r in results], [r["correct"] for r in results], n_bins)
        out["metrics"].update(ece=cal["ece"], mce=cal["mce"])
        out["reliability"] = cal["bins"]
    for tag in sorted({t for r in results for t in r["tags"]}):
        out["slices"][tag] = means([r for r in results if tag in r["tags"]])
    return out


def evaluate_task(model, tokenizer, task: Task, *, batch_size: int = 8, delimiter: str = " ",
                  max_new_tokens: int = 24, chat: bool = False, seed: int = 0) -> dict:
    """Score ``model`` on ``task``: the summary of :func:`summarise` plus every example's result."""
    was_training = model.training
    model.eval()
    try:
        if task.kind == "multiple_choice":
            results = score_multiple_choice(model, tokenizer, task.examples, delimiter, batch_size)
        else:
            results = score_generation(model, tokenizer, task.examples, max_new_tokens, batch_size, chat)
    finally:
        model.train(was_training)
    return {"task": task.name, "kind": task.kind, **summarise(task.kind, results, seed=seed), "examples": results}


def example_rows(task: Task) -> list[dict]:
    """The task's examples as JSON rows again (for writing a subset, or for lm-eval's json loader)."""
    rows = []
    for ex in task.examples:
        row = asdict(ex)
        row["tags"] = list(ex.tags)
        if isinstance(ex, ChoiceExample):
            row["choices"] = list(ex.choices)
        elif row.get("answer_type") is None:
            row.pop("answer_type")
        rows.append(row)
    return rows

