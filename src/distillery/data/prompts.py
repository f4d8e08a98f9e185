"""Prompts for teacher generation: read from files or datasets, or built as checkable tasks.

A :class:`Prompt` carries an optional ``answer`` and ``answer_type`` so that code can check the
teacher's response (``check_answer``); that is how confidence scores are shown to mean something.
"""

from __future__ import annotations

import csv
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

from distillery.data.sources import DataError, jsonl_rows


@dataclass(frozen=True)
class Prompt:
    id: str
    text: str
    answer: str | None = None
    answer_type: str | None = None  # "number" | "text" | None (no checkable answer)
    task: str | None = None


# ---------------------------------------------------------------- reading


def read_prompts(cfg, seed: int = 0) -> list[Prompt]:
    """Prompts for a recipe ``generate.prompts`` (a PromptSourceConfig)."""
    if cfg.kind == "tasks":
        return make_tasks(cfg.limit or 200, cfg.tasks, seed)
    path = Path(cfg.path)
    if cfg.kind == "text":
        rows = [{"prompt": line.strip()} for line in _read_lines(path) if line.strip()]
        field, answer_field, id_field = "prompt", None, None
    else:
        rows = {"jsonl": _rows_jsonl, "csv": _rows_csv, "parquet": _rows_parquet, "hf_disk": _rows_hf}[cfg.kind](path)
        field, answer_field, id_field = cfg.field, cfg.answer_field, cfg.id_field
    prompts = []
    for n, row in enumerate(rows[: cfg.limit] if cfg.limit else rows):
        where = f"{path}: row {n + 1}"
        if field not in row:
            raise DataError(f"{where}: no field {field!r} (fields: {sorted(row)})")
        text = row[field]
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"{where}: field {field!r} must be a non-empty string")
        answer = None
        if answer_field:
            if answer_field not in row:
                raise DataError(f"{where}: no answer field {answer_field!r}")
            answer = str(row[answer_field])
        pid = str(row[id_field]) if id_field and id_field in row else f"{path.name}:{n + 1}"
        prompts.append(Prompt(pid, text, answer, _answer_type(answer) if answer is not None else None))
    if not prompts:
        raise DataError(f"{path}: no prompts")
    return prompts


def _read_lines(path: Path) -> list[str]:
    try:
        return path.read_text("utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e})") from None


def _rows_jsonl(path: Path) -> list[dict]:
    return [row for _, row in jsonl_rows(path)]


def _rows_csv(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _rows_parquet(path: Path) -> list[dict]:
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path).to_pylist()
    except Exception as e:  # noqa: BLE001 - pyarrow raises several kinds; name the file
        raise DataError(f"{path}: not a readable Parquet file ({e})") from None


def _rows_hf(path: Path) -> list[dict]:
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except FileNotFoundError as e:
        raise DataError(f"{path}: not a dataset saved with save_to_disk ({e})") from None
    if isinstance(ds, datasets.DatasetDict):
        split = "train" if "train" in ds else next(iter(ds))
        ds = ds[split]
    return ds.to_list()


def _answer_type(answer: str) -> str:
    return "number" if re.fullmatch(r"-?\d+(\.\d+)?", answer.strip()) else "text"


# ---------------------------------------------------------------- templates


def render(prompt: Prompt, tokenizer=None, template: str | None = None, chat: bool = True,
           system: str | None = None) -> str:
    """The exact text sent to the teacher: the prompt template first, then the chat template."""
    text = template.format(prompt=prompt.text) if template else prompt.text
    if chat and tokenizer is not None and getattr(tokenizer, "chat_template", None):
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return text


# Templates that ask for a reasoning trace or JSON; the final answer is pulled out by extract_answer.
COT_TEMPLATE = "{prompt}\nThink step by step, then give the final answer on the last line as 'Answer: <answer>'."
JSON_TEMPLATE = '{prompt}\nReply only with JSON of the form {{"answer": ...}}.'


# ---------------------------------------------------------------- checkable tasks


def make_tasks(n: int, kinds: list[str], seed: int = 0) -> list[Prompt]:
    """``n`` prompts with known answers, of mixed difficulty so that confidence has something to rank."""
    if not kinds:
        raise DataError("generate.prompts.tasks: name at least one task kind")
    rng = random.Random(seed)
    makers = {"arithmetic": _arithmetic, "copy": _copy, "format": _format}
    return [makers[kinds[i % len(kinds)]](rng, i) for i in range(n)]


_WORDS = ("apple river stone cloud garden pencil window silver orange forest candle bridge "
          "yellow music winter letter summer button dragon planet").split()


def _arithmetic(rng: random.Random, i: int) -> Prompt:
    digits = rng.choice([1, 1, 2, 3])  # mostly easy, some hard: a spread of correctness
    a, b = rng.randint(0, 10 ** digits - 1), rng.randint(0, 10 ** digits - 1)
    op = rng.choice(["+", "-"]) if digits > 1 else "+"
    ans = a + b if op == "+" else a - b
    return Prompt(f"task/arith/{i}", f"What is {a} {op} {b}? Reply with the number only.", str(ans), "number",
                  "arithmetic")


def _copy(rng: random.Random, i: int) -> Prompt:
    words = " ".join(rng.sample(_WORDS, rng.randint(1, 4)))
    return Prompt(f"task/copy/{i}", f"Repeat exactly, with nothing else: {words}", words, "text", "copy")


def _format(rng: random.Random, i: int) -> Prompt:
    words = rng.sample(_WORDS, rng.randint(1, 3))
    return Prompt(f"task/upper/{i}", f"Write these words in capital letters, nothing else: {' '.join(words)}",
                  " ".join(w.upper() for w in words), "text", "format")


def extract_answer(response: str, answer_type: str | None) -> str | None:
    """The final answer in a response: JSON ``answer``, an ``Answer:`` line, the last number, or the text."""
    text = response.strip()
    try:
        obj = json.loads(text)
        if isinstance(obj, dict) and "answer" in obj:
            text = str(obj["answer"])
    except (json.JSONDecodeError, ValueError):
        m = re.findall(r"answer\s*[:=]\s*(.+)", text, flags=re.I)
        if m:
            text = m[-1]
    if answer_type == "number":
        nums = re.findall(r"-?\d+(?:\.\d+)?", text.replace(",", ""))
        return nums[-1] if nums else None
    return normalise(text)


def normalise(text: str) -> str:
    """Lower case, strip punctuation at the ends and collapse spaces: for answer and dedup comparison."""
    return re.sub(r"\s+", " ", text.strip().strip(".!\"'`").strip()).lower()


def check_answer(prompt: Prompt, response: str) -> bool | None:
    """True/False for a prompt with a known answer, None when there is nothing to check."""
    if prompt.answer is None:
        return None
    got = extract_answer(response, prompt.answer_type)
    if got is None:
        return False
    if prompt.answer_type == "number":
        try:
            return float(got) == float(prompt.answer)
        except ValueError:
            return False
    return got == normalise(prompt.answer)
