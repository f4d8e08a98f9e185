"""Robustness: a perturbation slice made from held-out rows, and each metric's change under it.

Perturbations (each seeded by ``(seed, row id, kind)``, so a row is perturbed the same way whatever
else is in the list and in whatever order):

- ``lowercase`` / ``uppercase``: the whole text;
- ``whitespace``: some single spaces between words doubled or made a tab, and one newline put where
  a space was; leading and trailing whitespace is left alone, since a task prompt's ending decides
  how its answer is tokenized;
- ``typos``: in a fraction of the words of four letters or more, one edit: two neighbouring letters
  swapped, a letter dropped, a letter doubled or a letter replaced by a neighbour on a QWERTY
  keyboard. Digits and words with digits are never touched, so an arithmetic answer stays right;
- ``paraphrase``: the text rewritten by a ``paraphrase`` callable (a list of texts in, the same
  number out), e.g. :func:`teacher_paraphraser` around the teacher's greedy generation.

A perturbed row is the original row (a task row, or ``{"id", "text"}`` made from a bare string)
with the perturbed field, the id ``<id>~<kind>``, ``source_id`` and ``perturbation`` fields, and the
tags ``perturbed`` and ``perturbation:<kind>`` added, so :func:`distillery.evaluate.tasks.evaluate_task`
scores it and reports it as slices. A row the perturbation leaves unchanged is dropped: it would
only dilute the change.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Callable, Sequence

from distillery.evaluate.stats import paired_bootstrap

KINDS = ("lowercase", "uppercase", "whitespace", "typos", "paraphrase")
DEFAULT_KINDS = ("lowercase", "whitespace", "typos")

_KEYBOARD = ["qwertyuiop", "asdfghjkl", "zxcvbnm"]
_NEIGHBOURS: dict[str, str] = {}
for r, row in enumerate(_KEYBOARD):
    for c, ch in enumerate(row):
        near = [row[c - 1] if c else "", row[c + 1] if c + 1 < len(row) else ""]
        for rr in (r - 1, r + 1):
            if 0 <= rr < len(_KEYBOARD):
                near += [_KEYBOARD[rr][cc] for cc in (c - 1, c, c + 1) if 0 <= cc < len(_KEYBOARD[rr])]
        _NEIGHBOURS[ch] = "".join(n for n in near if n)


class RobustnessError(ValueError):
    """Bad perturbation arguments or rows; the message names the row or argument."""


def _typo(word: str, rng: random.Random) -> str:
    i = rng.randrange(len(word) - 1)
    edit = rng.choice(("swap", "drop", "double", "neighbour"))
    if edit == "swap" and word[i] != word[i + 1]:
        return word[:i] + word[i + 1] + word[i] + word[i + 2:]
    if edit == "drop":
        return word[:i] + word[i + 1:]
    if edit == "double":
        return word[:i + 1] + word[i] + word[i + 1:]
    near = _NEIGHBOURS.get(word[i].lower(), "")
    if not near:  # a letter with no QWERTY neighbours (e.g. accented): drop it instead
        return word[:i] + word[i + 1:]
    sub = rng.choice(near)
    return word[:i] + (sub.upper() if word[i].isupper() else sub) + word[i + 1:]


def add_typos(text: str, rng: random.Random, rate: float = 0.1) -> str:
    """One edit in about ``rate`` of the alphabetic words of four letters or more (at least one word
    when there is any such word)."""
    words = [m for m in re.finditer(r"[^\W\d_]{4,}", text)]
    if not words:
        return text
    picked = [m for m in words if rng.random() < rate] or [rng.choice(words)]
    out, last = [], 0
    for m in picked:
        out += [text[last:m.start()], _typo(m.group(), rng)]
        last = m.end()
    return "".join(out + [text[last:]])


def vary_whitespace(text: str, rng: random.Random, rate: float = 0.15) -> str:
    """Some inner single spaces doubled or made a tab; one made a newline. The ends are kept."""
    spaces = [m.start() for m in re.finditer(r"(?<=\S) (?=\S)", text)]
    if not spaces:
        return text
    newline = rng.choice(spaces)
    chars = list(text)
    for i in spaces:
        if i == newline:
            chars[i] = "\n"
        elif rng.random() < rate:
            chars[i] = rng.choice(("  ", "\t", "   "))
    return "".join(chars)


def perturb_text(text: str, kind: str, rng: random.Random, *, typo_rate: float = 0.1) -> str:
    """One rule-based perturbation of ``text`` (every kind but ``paraphrase``)."""
    if kind == "lowercase":
        return text.lower()
    if kind == "uppercase":
        return text.upper()
    if kind == "whitespace":
        return vary_whitespace(text, rng)
    if kind == "typos":
        return add_typos(text, rng, typo_rate)
    raise RobustnessError(f"robustness: unknown perturbation {kind!r} (one of {', '.join(KINDS)})")


def _rows(rows: Sequence[str | dict], field: str) -> list[dict]:
    out = []
    for i, row in enumerate(rows):
        if isinstance(row, str):
            row = {"id": str(i), field: row}
        if not isinstance(row, dict) or "id" not in row or not isinstance(row.get(field), str):
            raise RobustnessError(f"robustness: row {i} needs an 'id' and a string field {field!r}")
        out.append(row)
    return out


def perturbation_slice(rows: Sequence[str | dict], kinds: Sequence[str] = DEFAULT_KINDS, *, field: str = "prompt",
                       seed: int = 0, typo_rate: float = 0.1,
                       paraphrase: Callable[[list[str]], list[str]] | None = None) -> list[dict]:
    """Perturbed copies of ``rows`` (task rows, or bare strings), every kind in turn; see the module
    docstring for the row format. ``paraphrase`` is needed only for the ``paraphrase`` kind."""
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise RobustnessError(f"robustness: unknown perturbation {unknown[0]!r} (one of {', '.join(KINDS)})")
    if "paraphrase" in kinds and paraphrase is None:
        raise RobustnessError("robustness: the 'paraphrase' perturbation needs a paraphrase callable")
    field = field if rows and isinstance(rows[0], dict) else "text"  # bare strings become {"id", "text"}
    base = _rows(rows, field)
    out = []
    for kind in kinds:
        if kind == "paraphrase":
            texts = paraphrase([r[field] for r in base])
            if len(texts) != len(base):
                raise RobustnessError(f"robustness: paraphrase returned {len(texts)} texts for {len(base)} rows")
        else:
            # a string seed is hashed with SHA-512 by random.Random: the same on every run and machine
            texts = [perturb_text(r[field], kind, random.Random(f"{seed}:{r['id']}:{kind}"), typo_rate=typo_rate)
                     for r in base]
        for row, text in zip(base, texts):
            if not text.strip() or text == row[field]:
                continue
            tags = [*row.get("tags", []), "perturbed", f"perturbation:{kind}"]
            out.append({**row, field: text, "id": f"{row['id']}~{kind}", "source_id": str(row["id"]),
                        "perturbation": kind, "tags": tags})
    return out


def teacher_paraphraser(model, tokenizer, *, max_new_tokens: int = 96, batch_size: int = 8,
                        chat: bool | None = None) -> Callable[[list[str]], list[str]]:
    """A ``paraphrase`` callable around a model's greedy generation. The model is asked to rewrite
    the text in other words; the first paragraph of its reply is the paraphrase (an empty reply
    drops the row). ``chat`` defaults to whether the tokenizer has a chat template."""
    from distillery.data.prompts import Prompt, render
    from distillery.evaluate.tasks import greedy_responses

    use_chat = bool(getattr(tokenizer, "chat_template", None)) if chat is None else chat

    def paraphrase(texts: list[str]) -> list[str]:
        asks = [render(Prompt(str(i), "Rewrite the following text in other words, keeping its meaning. "
                                      f"Reply with the rewritten text only.\n\n{t}"), tokenizer, chat=use_chat)
                for i, t in enumerate(texts)]
        replies = greedy_responses(model, tokenizer, asks, max_new_tokens, batch_size)
        return [r.strip().split("\n\n")[0].strip() for r in replies]

    return paraphrase


# ---------------------------------------------------------------- changes


def number(value) -> float | None:
    """A metric value (a number or ``{"value": v, ...}``) as a finite float, else None."""
    if isinstance(value, dict):
        value = value.get("value")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def metric_changes(before: dict, after: dict, *, per_example_before: dict | None = None,
                   per_example_after: dict | None = None, n_resamples: int = 1000, seed: int = 0) -> dict:
    """Each metric present in both dicts: ``{"before", "after", "change": after - before, "relative":
    change / |before| (None when before is 0)}``. Values may be numbers or ``{"value", ...}``.

    With per-example scores (``{metric: {id: score}}``; the perturbed ids ``<id>~<kind>`` or any id
    with a ``source_id`` mapping are matched to their source id), the change also gets a paired
    bootstrap ``interval`` and ``p_value`` over the examples present in both."""
    out = {}
    for metric in before:
        b, a = number(before[metric]), number(after.get(metric))
        if b is None or a is None:
            continue
        row = {"before": b, "after": a, "change": a - b, "relative": (a - b) / abs(b) if b else None}
        if per_example_before and per_example_after and metric in per_example_before and metric in per_example_after:
            orig = per_example_before[metric]
            pert = {k.split("~", 1)[0]: v for k, v in per_example_after[metric].items()}
            keys = [k for k in orig if k in pert]
            if keys:
                pb = paired_bootstrap([pert[k] for k in keys], [orig[k] for k in keys],
                                      n_resamples=n_resamples, seed=seed)
                row.update(interval=[pb["low"], pb["high"]], p_value=pb["p_value"], n=pb["n"],
                           paired_change=pb["difference"])
        out[metric] = row
    return out


# per-example fields of evaluate_task results, by the metric they average into
EXAMPLE_FIELDS = {"accuracy": "correct", "accuracy_norm": "correct_norm", "exact_match": "exact_match",
                  "token_f1": "token_f1", "answer_confidence": "confidence"}


def changes_by_perturbation(before: Sequence[dict], after: Sequence[dict], *, n_resamples: int = 1000,
                            seed: int = 0) -> dict:
    """``{kind: {metric: change}}`` from per-example results (``evaluate_task(...)["examples"]``) of
    the original rows and of their perturbed copies. Each kind is compared on the rows it changed
    only: ``before`` is the mean over those same source rows, so dropped (unchanged) rows do not
    blur the difference. Every change carries its paired bootstrap interval and ``n``."""
    originals = {str(ex["id"]): ex for ex in before}
    by_kind: dict[str, list[dict]] = {}
    for ex in after:
        kind = next((t.split(":", 1)[1] for t in ex.get("tags", []) if t.startswith("perturbation:")), None)
        if kind is None:
            raise RobustnessError(f"robustness: perturbed example {ex.get('id')!r} has no 'perturbation:<kind>' tag")
        by_kind.setdefault(kind, []).append(ex)
    out = {}
    for kind, rows in by_kind.items():
        pairs = [(originals[str(ex["id"]).split("~", 1)[0]], ex) for ex in rows
                 if str(ex["id"]).split("~", 1)[0] in originals]
        if not pairs:
            raise RobustnessError(f"robustness: no '{kind}' example matches an original example by id")
        metrics = [m for m, f in EXAMPLE_FIELDS.items() if all(f in o and f in p for o, p in pairs)]
        per_b = {m: {str(o["id"]): float(o[EXAMPLE_FIELDS[m]]) for o, _ in pairs} for m in metrics}
        per_a = {m: {str(p["id"]): float(p[EXAMPLE_FIELDS[m]]) for _, p in pairs} for m in metrics}
        mean_b = {m: math.fsum(v.values()) / len(v) for m, v in per_b.items()}
        mean_a = {m: math.fsum(v.values()) / len(v) for m, v in per_a.items()}
        out[kind] = metric_changes(mean_b, mean_a, per_example_before=per_b, per_example_after=per_a,
                                   n_resamples=n_resamples, seed=seed)
    return out


# ---------------------------------------------------------------- held-out token blocks


def _encode(tokenizer, texts: list[str], max_tokens: int | None) -> dict:
    import torch

    enc = [tokenizer(t, add_special_tokens=False)["input_ids"][:max_tokens] for t in texts]
    width = max(len(e) for e in enc)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    return {"input_ids": torch.tensor([e + [pad] * (width - len(e)) for e in enc]),
            "attention_mask": torch.tensor([[1] * len(e) + [0] * (width - len(e)) for e in enc])}


def perturbed_blocks(tokenizer, examples, kinds: Sequence[str] = DEFAULT_KINDS, *, seed: int = 0,
                     typo_rate: float = 0.1, paraphrase: Callable[[list[str]], list[str]] | None = None,
                     max_tokens: int | None = None) -> dict[str, tuple[dict, dict]]:
    """Held-out token blocks (``[N, T]`` or ``{"input_ids", "attention_mask"?}``) perturbed as text:
    ``{kind: (before, after)}``, each an examples dict (right-padded, with ``attention_mask``) of the
    rows that kind changed. ``before`` is the same rows' text encoded the same way as ``after`` (decoded,
    then encoded without special tokens), so the two differ only by the perturbation. Row ids are the
    block's index. A perturbed text may take more tokens than its block; ``max_tokens`` cuts both."""
    ids = examples["input_ids"] if isinstance(examples, dict) else examples
    mask = examples.get("attention_mask") if isinstance(examples, dict) else None
    texts = [tokenizer.decode((ids[i][mask[i].bool()] if mask is not None else ids[i]).tolist(),
                              skip_special_tokens=True) for i in range(len(ids))]
    rows = [{"id": str(i), "text": t} for i, t in enumerate(texts) if t.strip()]
    out = {}
    for kind in kinds:
        changed = perturbation_slice(rows, (kind,), field="text", seed=seed, typo_rate=typo_rate,
                                     paraphrase=paraphrase)
        if changed:
            out[kind] = (_encode(tokenizer, [texts[int(r["source_id"])] for r in changed], max_tokens),
                         _encode(tokenizer, [r["text"] for r in changed], max_tokens))
    return out
