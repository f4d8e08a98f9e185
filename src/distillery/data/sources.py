"""Text sources and fixed-length token blocks.

Real corpora come from registry packages, never from a hub at run time:
- ``austen``: Jane Austen's six novels from Debian's ``r-cran-janeaustenr`` (R lazy-load database,
  read with the ``rdata`` package); ``make data`` unpacks it into the cache.
- ``gensim-lee``: the Lee news corpus (Australian Broadcasting Corporation news, ~300 articles)
  shipped in the ``gensim`` wheel's test_data.
- ``gensim-wiki``: a shortened English Wikipedia dump from the same test_data.
- ``gensim-crime``: the opening of Dostoevsky's Crime and Punishment, in Russian (same test_data; ~4 KB):
  a domain (and language) far from the others, for held-out evaluation.
"""

from __future__ import annotations

import bz2
import gzip
import importlib.util
import json
import re
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import warnings

import torch

from distillery.models.load import cache_dir

AUSTEN_BOOKS = ["sensesensibility", "prideprejudice", "mansfieldpark", "emma", "northangerabbey", "persuasion"]
_AUSTEN_SUBDIR = Path("corpora/janeaustenr/usr/lib/R/site-library/janeaustenr/data")


class DataError(ValueError):
    """Data that cannot be read; the message names the file or field."""


@dataclass
class Document:
    id: str
    text: str


# ---------------------------------------------------------------- corpora


def austen_dir(cache: str | Path | None = None) -> Path:
    for d in (cache_dir(cache) / _AUSTEN_SUBDIR, Path("/usr/lib/R/site-library/janeaustenr/data")):
        if (d / "Rdata.rdb").is_file():
            return d
    raise DataError(
        "corpus austen: Debian's r-cran-janeaustenr is not unpacked; run `make data` "
        f"(it unpacks the package into {cache_dir(cache) / 'corpora'})"
    )


def read_austen(parts: list[str] | None = None, cache: str | Path | None = None) -> list[Document]:
    import rdata

    # rdata warns that a lazy-load record has no RDS/RDA header; that is what these records are.
    warnings.filterwarnings("ignore", message="Unknown file type", module="rdata")

    d = austen_dir(cache)
    index = rdata.conversion.convert(rdata.parser.parse_data(gzip.decompress((d / "Rdata.rdx").read_bytes())))
    offsets = {str(k): (int(v[0]), int(v[1])) for k, v in index["variables"].items()}
    wanted = parts or AUSTEN_BOOKS
    unknown = [p for p in wanted if p not in offsets]
    if unknown:
        raise DataError(f"corpus austen: unknown parts {unknown} (known: {sorted(offsets)})")
    blob = (d / "Rdata.rdb").read_bytes()
    docs = []
    for name in wanted:
        off, length = offsets[name]
        record = blob[off:off + length]
        size = struct.unpack(">I", record[:4])[0]  # R lazy-load: 4-byte length, then zlib stream
        raw = zlib.decompress(record[4:])
        if len(raw) != size:
            raise DataError(f"corpus austen: {name} decompressed to {len(raw)} bytes, expected {size}")
        lines = rdata.conversion.convert(rdata.parser.parse_data(raw))
        docs.append(Document(f"austen/{name}", _join_lines([str(x) for x in lines])))
    return docs


def gensim_data_dir() -> Path:
    spec = importlib.util.find_spec("gensim")  # the wheel is data only here: never imported
    if spec is None or not spec.submodule_search_locations:
        raise DataError("gensim corpora: the gensim wheel is not installed; run `pip install --no-deps gensim`")
    return Path(list(spec.submodule_search_locations)[0]) / "test" / "test_data"


def read_gensim_lee() -> list[Document]:
    path = gensim_data_dir() / "lee_background.cor"
    return [Document(f"lee/{i}", line.strip()) for i, line in enumerate(path.read_text("utf-8").splitlines())
            if line.strip()]


def read_gensim_crime() -> list[Document]:
    path = gensim_data_dir() / "crime-and-punishment.txt"
    return [Document("crime-and-punishment", path.read_text("utf-8").strip())]


_WIKI_MARKUP = [
    (re.compile(r"\{\{[^{}]*\}\}"), ""),
    (re.compile(r"\[\[(?:[^|\]]*\|)?([^\]]*)\]\]"), r"\1"),
    (re.compile(r"<ref[^>]*?/>|<ref[^>]*>.*?</ref>", re.S), ""),
    (re.compile(r"<[^>]+>"), ""),
    (re.compile(r"'{2,}"), ""),
    (re.compile(r"^[=*#:;|!{}].*$", re.M), ""),
    (re.compile(r"\n{3,}"), "\n\n"),
]


def read_gensim_wiki(max_articles: int = 200) -> list[Document]:
    """Plain text of the articles in gensim's shortened English Wikipedia dump (markup stripped)."""
    path = gensim_data_dir() / "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
    xml = bz2.decompress(path.read_bytes()).decode("utf-8", "replace")
    docs = []
    for m in re.finditer(r"<title>(.*?)</title>.*?<text[^>]*>(.*?)</text>", xml, re.S):
        text = m.group(2).replace("&lt;", "<").replace("&gt;", ">").replace("&quot;", '"').replace("&amp;", "&")
        for pattern, repl in _WIKI_MARKUP:
            text = pattern.sub(repl, text)
        text = text.strip()
        if len(text) > 500 and not text.lower().startswith("#redirect"):
            docs.append(Document(f"wiki/{m.group(1)}", text))
        if len(docs) >= max_articles:
            break
    return docs


def _join_lines(lines: list[str]) -> str:
    """Novels come as one line per printed line: rejoin into paragraphs."""
    paras, cur = [], []
    for line in lines:
        if line.strip():
            cur.append(line.strip())
        elif cur:
            paras.append(" ".join(cur))
            cur = []
    if cur:
        paras.append(" ".join(cur))
    return "\n\n".join(paras)


# ---------------------------------------------------------------- files


def read_text_file(path: Path) -> list[Document]:
    try:
        return [Document(str(path), path.read_text("utf-8"))]
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e})") from None


def jsonl_rows(path: Path, *, torn_tail: bool = False) -> list[tuple[int, dict]]:
    """``(line number, object)`` for every non-blank line; a bad line is an error naming file:line.

    With ``torn_tail``, a last line that is not valid JSON is dropped instead: a run killed while
    appending a line leaves it half written, and resume starts again from the line before."""
    try:
        lines = Path(path).read_text("utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e})") from None
    rows = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            if torn_tail and n == len(lines):
                break
            raise DataError(f"{path}:{n}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise DataError(f"{path}:{n}: expected a JSON object")
        rows.append((n, row))
    return rows


def read_jsonl(path: Path, field: str | None = None) -> list[Document]:
    docs = []
    for n, rec in jsonl_rows(path):
        if field:
            if field not in rec:
                raise DataError(f"{path}:{n}: no field {field!r}")
            text = rec[field]
        elif "text" in rec:
            text = rec["text"]
        elif "prompt" in rec and "response" in rec:
            text = rec["prompt"] + rec["response"]
        else:
            raise DataError(f"{path}:{n}: needs a 'text' field or 'prompt' and 'response' (or set field:)")
        if not isinstance(text, str):
            raise DataError(f"{path}:{n}: field is {type(text).__name__}, expected a string")
        docs.append(Document(str(rec.get("id", f"{path.name}:{n}")), text))
    return docs


def read_source(source, cache: str | Path | None = None) -> list[Document]:
    """Documents for a recipe ``data.source`` (CorpusSource or FileSource)."""
    if source.kind == "corpus":
        if source.name == "austen":
            return read_austen(source.parts, cache)
        if source.name == "gensim-lee":
            return read_gensim_lee()
        if source.name == "gensim-wiki":
            return read_gensim_wiki()
        if source.name == "gensim-crime":
            return read_gensim_crime()
    if source.kind == "text":
        return read_text_file(Path(source.path))
    if source.kind == "jsonl":
        return read_jsonl(Path(source.path), source.field)
    raise DataError(f"data.source: unsupported kind {source.kind!r}")


# ---------------------------------------------------------------- blocks


# The rule to_blocks splits by, hashed into the data stage's inputs (and evaluate's, for its slices):
# a run folder cut by an earlier rule (every document's last fraction) is cut again, not reused.
HELDOUT_SPLIT = "long documents' tails, short documents whole"


def to_blocks(docs: list[Document], tokenizer, block_size: int, heldout_fraction: float):
    """Tokenise and cut into ``block_size`` blocks, holding out about ``heldout_fraction`` of the text.

    A document long enough that its last ``heldout_fraction`` fills a block gives that contiguous tail
    (so no held-out window overlaps a training one). Shorter documents are held out whole or not at all,
    in order, so that about ``heldout_fraction`` of their tokens are held out: their tails would be a few
    tokens each (5% of a 200-token news story is 10), stitched into blocks of fragments that score
    nothing like the text. Too few short documents to hold one out whole (a single small file): tails.

    Returns ``(train [N, block_size], heldout [M, block_size])`` int64 tensors.
    """
    eos = tokenizer.eos_token_id
    encoded = []
    for doc in docs:
        ids = tokenizer(doc.text, add_special_tokens=False)["input_ids"]
        encoded.append(ids + [eos] if eos is not None else ids)
    split = [int(len(ids) * (1 - heldout_fraction)) for ids in encoded]  # where each document's tail starts
    short = [i for i, ids in enumerate(encoded) if len(ids) - split[i] < block_size]
    whole, total, held_tokens = set(), 0, 0
    for i in short:  # greedy: hold out a document when that brings the held-out share closer to the fraction
        total += len(encoded[i])
        if held_tokens + len(encoded[i]) / 2 < heldout_fraction * total:
            whole.add(i)
            held_tokens += len(encoded[i])
    if whole:
        for i in short:
            split[i] = 0 if i in whole else len(encoded[i])
    train, held = [], []
    for ids, at in zip(encoded, split):
        train.extend(ids[:at])
        held.extend(ids[at:])
    if len(train) < block_size or len(held) < block_size:
        raise DataError(f"data: too little text for block_size {block_size} "
                        f"({len(train)} training and {len(held)} held-out tokens)")
    def cut(ids):
        n = len(ids) // block_size
        return torch.tensor(ids[: n * block_size], dtype=torch.long).view(n, block_size)
    return cut(train), cut(held)


# ---------------------------------------------------------------- prompt/response pairs


def read_pairs(path: Path) -> list[tuple[str, str]]:
    """``(prompt, response)`` records of a JSONL file (the prompt as the teacher saw it)."""
    pairs = []
    for n, rec in jsonl_rows(path):
        if not isinstance(rec.get("prompt"), str) or not isinstance(rec.get("response"), str):
            raise DataError(f"{path}:{n}: format pairs needs string fields 'prompt' and 'response'")
        pairs.append((rec["prompt"], rec["response"]))
    if not pairs:
        raise DataError(f"{path}: no records")
    return pairs


def to_pairs(pairs: list[tuple[str, str]], tokenizer, max_len: int) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` (-100 on the prompt and padding),
    so the loss falls on the response tokens only. Prompt and response are tokenised apart so the
    boundary is exact; over-long examples keep their prompt's end and the response's start."""
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    ids = torch.full((len(pairs), max_len), pad, dtype=torch.long)
    mask = torch.zeros((len(pairs), max_len), dtype=torch.long)
    labels = torch.full((len(pairs), max_len), -100, dtype=torch.long)
    for i, (prompt, response) in enumerate(pairs):
        p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        r = tokenizer(response, add_special_tokens=False)["input_ids"] + ([eos] if eos is not None else [])
        p = p[-(max_len // 2):] if len(p) + len(r) > max_len else p
        r = r[: max_len - len(p)]
        row = p + r
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
        labels[i, len(p): len(row)] = torch.tensor(r)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


# ---------------------------------------------------------------- data-free: the teacher's own samples


@torch.no_grad()
def teacher_samples(model, tokenizer, source, seed: int, progress: bool = False) -> list[Document]:
    """Texts sampled from the teacher itself, from BOS or from seed prompts taken in turn; the
    temperature, top-p and repetition penalty control their diversity; exact duplicates are dropped."""
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    starts = source.seed_prompts or [""]
    docs, seen = [], set()
    tokenizer.padding_side = "left"
    bar = tqdm(total=source.num_samples, desc="teacher samples", disable=not progress, leave=False)
    for b, start in enumerate(range(0, source.num_samples, source.batch_size)):
        n = min(source.batch_size, source.num_samples - start)
        texts = [starts[(start + i) % len(starts)] for i in range(n)]
        enc = [[bos] + tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
        width = max(len(e) for e in enc)
        ids = torch.tensor([[tokenizer.pad_token_id or bos] * (width - len(e)) + e for e in enc], device=device)
        attn = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in enc], device=device)
        torch.manual_seed(seed * 1_000_003 + b)  # each batch's samples depend on the seed and batch only
        out = model.generate(input_ids=ids, attention_mask=attn, do_sample=True, temperature=source.temperature,
                             top_p=source.top_p, repetition_penalty=source.repetition_penalty,
                             max_new_tokens=source.max_new_tokens, pad_token_id=tokenizer.pad_token_id or bos)
        for i, row in enumerate(out):
            text = texts[i] + tokenizer.decode(row[width:], skip_special_tokens=True)
            if text.strip() and text not in seen:
                seen.add(text)
                docs.append(Document(f"teacher_sample/{start + i}", text))
        bar.update(n)
    bar.close()
    if not docs:
        raise DataError("data.source teacher_samples: the teacher produced no text")
    return docs
