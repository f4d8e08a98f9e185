"""Task files built from real data on this machine, deterministically from a seed.

- ``sentiment``: the 200 labelled movie-review sentences (Pang & Lee) in gensim's test data,
  ``__label__neg|pos <sentence>`` per line, cp1252; multiple choice negative/positive.
- ``analogies``: Mikolov's ``questions-words.txt`` (``: section`` headers, then ``a b c d``):
  "a is to b as c is to" with d among distractors drawn from the same section's answers.
- ``arithmetic``: the checkable prompts of ``data.prompts.make_tasks`` (arithmetic, copy,
  format) as generation with known answers.

Each builder returns the rows and writes them as JSONL, atomically, when given a path. Example ids
come from the source (line numbers, prompt ids), so the same example has the same id whatever the
seed; the seed chooses which examples, their order and (analogies) the distractors.
"""

from __future__ import annotations

import random
import re
from pathlib import Path

from distillery.data.sources import DataError, gensim_data_dir
from distillery.evaluate.tasks import write_task

LONG_REVIEW_WORDS = 25  # a review sentence longer than this is tagged "long"


def _finish(rows: list[dict], path: str | Path | None) -> list[dict]:
    if path is not None:
        write_task(path, rows)
    return rows


def _read_source(path: Path, encoding: str) -> list[str]:
    try:
        return path.read_text(encoding).splitlines()
    except FileNotFoundError:
        raise DataError(f"{path}: missing (the gensim wheel's test data; run `make install`)") from None


def sentiment_rows(seed: int = 0, limit: int | None = None, source: Path | None = None) -> list[dict]:
    path = source or gensim_data_dir() / "pang_lee_polarity.cor"
    rows = []
    for n, line in enumerate(_read_source(path, "cp1252"), 1):  # 0x97 etc.: Windows-1252 dashes and accents
        m = re.fullmatch(r"__label__(neg|pos)\s+(.*\S)\s*", line)
        if not m:
            raise DataError(f"{path}: line {n}: expected '__label__neg|pos <sentence>'")
        label, text = m.groups()
        length = "long" if len(text.split()) > LONG_REVIEW_WORDS else "short"
        rows.append({"id": f"sentiment/{n}",
                     "prompt": f"Review: {text}\nIs this review positive or negative? Answer:",
                     "choices": ["negative", "positive"], "answer": int(label == "pos"),
                     "tags": ["sentiment", f"label:{label}", length]})
    random.Random(seed).shuffle(rows)
    return rows[:limit] if limit else rows


def build_sentiment(path: str | Path | None = None, seed: int = 0, limit: int | None = None) -> list[dict]:
    return _finish(sentiment_rows(seed, limit), path)


def _analogy_sections(path: Path) -> dict[str, list[tuple[int, list[str]]]]:
    sections: dict[str, list[tuple[int, list[str]]]] = {}
    current = None
    for n, line in enumerate(_read_source(path, "utf-8"), 1):
        if line.startswith(":"):
            current = line[1:].strip()
            sections.setdefault(current, [])
        elif line.strip():
            words = line.split()
            if current is None or len(words) != 4:
                raise DataError(f"{path}: line {n}: expected ': section' or four words")
            sections[current].append((n, words))
    return sections


def analogy_rows(n: int = 200, seed: int = 0, n_choices: int = 4, source: Path | None = None) -> list[dict]:
    """``n`` questions spread evenly over the sections; distractors are other answers of the section."""
    path = source or gensim_data_dir() / "questions-words.txt"
    sections = _analogy_sections(path)
    rng = random.Random(seed)
    names = sorted(sections)
    rows = []
    for k, name in enumerate(names):
        share = n // len(names) + (k < n % len(names))
        answers = sorted({q[3] for _, q in sections[name]})
        for line, (a, b, c, d) in rng.sample(sections[name], min(share, len(sections[name]))):
            taken = {w.lower() for w in (a, b, c, d)}
            pool = [w for w in answers if w.lower() not in taken]
            if len(pool) < n_choices - 1:
                raise DataError(f"{path}: section {name!r} has too few answers for {n_choices} choices")
            choices = rng.sample(pool, n_choices - 1) + [d]
            rng.shuffle(choices)
            kind = "syntactic" if name.startswith("gram") else "semantic"
            rows.append({"id": f"analogy/{line}", "prompt": f"{a} is to {b} as {c} is to",
                         "choices": choices, "answer": choices.index(d), "tags": ["analogy", name, kind]})
    rng.shuffle(rows)
    return rows


def build_analogies(path: str | Path | None = None, n: int = 200, seed: int = 0, n_choices: int = 4) -> list[dict]:
    return _finish(analogy_rows(n, seed, n_choices), path)


def arithmetic_rows(n: int = 100, seed: int = 0, kinds: tuple[str, ...] = ("arithmetic",)) -> list[dict]:
    from distillery.data.prompts import make_tasks

    rows = []
    for p in make_tasks(n, list(kinds), seed):
        tags = [p.task]
        if p.task == "arithmetic":
            operands = re.findall(r"\d+", p.text.split("?")[0])
            tags.append(f"digits:{max(len(x) for x in operands)}")
        # a formatting task is judged with case kept; SQuAD's normalisation would lower-case it away
        answer_type = "exact" if p.task == "format" else p.answer_type
        rows.append({"id": p.id, "prompt": p.text, "answer": p.answer, "answer_type": answer_type, "tags": tags})
    return rows


def build_arithmetic(path: str | Path | None = None, n: int = 100, seed: int = 0,
                     kinds: tuple[str, ...] = ("arithmetic",)) -> list[dict]:
    return _finish(arithmetic_rows(n, seed, kinds), path)


BUILDERS = {"sentiment": build_sentiment, "analogies": build_analogies, "arithmetic": build_arithmetic}


def build_task(name: str, path: str | Path, seed: int = 0, **options) -> list[dict]:
    """Build the named task into ``path``; ``options`` are the builder's (``limit``, ``n``, ...)."""
    if name not in BUILDERS:
        raise DataError(f"task builder {name!r}: unknown (known: {', '.join(sorted(BUILDERS))})")
    return BUILDERS[name](path, seed=seed, **options)
