"""Token alignment between two tokenizers: the same text, cut two ways, grouped into the smallest spans
on which both cuts agree (the GOLD / "merge" approach to cross-tokenizer distillation).

Every token is read as the bytes it stands for (:func:`token_bytes`): byte-level BPE symbols (``Ġ``,
GPT-2's byte alphabet), SentencePiece pieces (``▁`` for a space, ``<0xE2>`` byte-fallback tokens) and
plain strings all become bytes, so two tokenizers are compared in one coordinate system: *units*, one
per byte of text plus one per special token the other side also has (a chat marker translated by
``special_map``). A special token without a counterpart is zero units wide and travels with the span
after it.

A span is a run of tokens on each side that covers the same units; its boundaries are exactly the
unit offsets where both tokenizations end a token. Per span the sequence log-probability of each side
is the sum of its tokens' log-probs (the student's over its tokens, the teacher's over its own).

A position ``p`` of the student (whose logits predict token ``p + 1``) has a comparable teacher
position ``q`` when both prefixes cover the same units: ``p + 1`` and ``q + 1`` start the same span.
Only there is the teacher's next-token distribution a distribution over the same continuation.
"""

from __future__ import annotations

import bisect
import json
from dataclasses import dataclass, field
from functools import lru_cache

# GPT-2's reversible map from bytes to printable characters (byte-level BPE vocabularies use it).


@lru_cache(maxsize=1)
def _byte_level_decoder() -> dict[str, int]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def _backend(tokenizer) -> dict:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ValueError(f"{type(tokenizer).__name__}: cross-tokenizer alignment needs a fast (Rust-backed) tokenizer")
    return json.loads(backend.to_str())


def _is_byte_level(spec: dict) -> bool:
    def has(node) -> bool:
        if not isinstance(node, dict):
            return False
        if node.get("type") == "ByteLevel":
            return True
        return any(has(n) for n in node.get("decoders", []) + node.get("pretokenizers", []))
    return has(spec.get("decoder")) or has(spec.get("pre_tokenizer"))


def special_ids(tokenizer) -> set[int]:
    """Ids of tokens that are not text: added special tokens (BOS, EOS, chat markers, pads, ...)."""
    ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    for tid, added in getattr(tokenizer, "added_tokens_decoder", {}).items():
        if getattr(added, "special", False):
            ids.add(int(tid))
    return ids


def token_bytes(tokenizer) -> list[bytes | None]:
    """The bytes each token id stands for (``None`` for special tokens). Byte-level BPE symbols are
    mapped back through GPT-2's byte alphabet; SentencePiece's ``▁`` is a space and ``<0xHH>`` the
    byte HH; anything else is the UTF-8 of its string."""
    spec = _backend(tokenizer)
    specials = special_ids(tokenizer)
    vocab = tokenizer.get_vocab()
    out: list[bytes | None] = [None] * (max(vocab.values()) + 1)
    byte_level = _is_byte_level(spec)
    table = _byte_level_decoder()
    for piece, tid in vocab.items():
        if tid in specials:
            continue
        if byte_level and all(c in table for c in piece):
            out[tid] = bytes(table[c] for c in piece)
        elif len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            out[tid] = bytes([int(piece[3:5], 16)])
        else:
            out[tid] = piece.replace("▁", " ").encode("utf-8")
    return out


@dataclass(frozen=True)
class Span:
    """Tokens ``[s_lo, s_hi)`` of the student and ``[t_lo, t_hi)`` of the teacher cover units ``[lo, hi)``."""

    s_lo: int
    s_hi: int
    t_lo: int
    t_hi: int
    lo: int
    hi: int


@dataclass
class Alignment:
    spans: list[Span]
    student_bounds: list[tuple[int, int]]  # units each student token covers
    teacher_bounds: list[tuple[int, int]]
    pairs: list[tuple[int, int]] = field(default_factory=list)  # (student position, teacher position)

    @property
    def is_identity(self) -> bool:
        return all(s.s_hi - s.s_lo == 1 and s.t_hi - s.t_lo == 1 and s.s_lo == s.t_lo for s in self.spans) and \
            len(self.student_bounds) == len(self.teacher_bounds)


def _bounds(widths: list[int]) -> list[tuple[int, int]]:
    out, at = [], 0
    for w in widths:
        out.append((at, at + w))
        at += w
    return out


def align_bounds(student: list[tuple[int, int]], teacher: list[tuple[int, int]]) -> Alignment:
    """Group two tokenizations of the same units (each a list of ``(start, end)``, contiguous from 0)
    into the smallest spans whose boundaries both share. Zero-width tokens join the span after them
    (the last span if they sit at the end)."""
    total_s = student[-1][1] if student else 0
    total_t = teacher[-1][1] if teacher else 0
    if total_s != total_t:
        raise ValueError(f"align: the two tokenizations cover different lengths ({total_s} vs {total_t} units)")
    ends = sorted({e for s, e in student if e > s} & {e for s, e in teacher if e > s} | {total_s})
    starts = [0] + ends[:-1]
    n = len(starts)

    def owner(bounds) -> list[int]:
        # A token belongs to the span holding its first unit; zero-width tokens at the very end to the last.
        return [min(bisect.bisect_right(starts, s) - 1, n - 1) for s, _ in bounds]

    s_own, t_own = owner(student), owner(teacher)
    spans = []
    for k in range(n):
        s_lo, s_hi = bisect.bisect_left(s_own, k), bisect.bisect_right(s_own, k)
        t_lo, t_hi = bisect.bisect_left(t_own, k), bisect.bisect_right(t_own, k)
        spans.append(Span(s_lo, s_hi, t_lo, t_hi, starts[k], ends[k]))
    if total_s == 0:  # nothing but zero-width tokens: one empty span holds them all
        spans = [Span(0, len(student), 0, len(teacher), 0, 0)]
    pairs = []
    for sp in spans:
        p = _first_content(student, sp.s_lo, sp.s_hi) - 1
        q = _first_content(teacher, sp.t_lo, sp.t_hi) - 1
        if p >= 0 and q >= 0 and sp.hi > sp.lo:
            pairs.append((p, q))
    return Alignment(spans, student, teacher, pairs)


def _first_content(bounds, lo: int, hi: int) -> int:
    for i in range(lo, hi):
        if bounds[i][1] > bounds[i][0]:
            return i
    return hi


def _valid_utf8_range(data: bytes) -> tuple[int, int]:
    """(lo, hi): ``data[lo:hi]`` drops a partial character cut off at either end (a block of byte-level
    tokens may start or stop inside a multi-byte character)."""
    lo = 0
    while lo < len(data) and lo < 3 and (data[lo] & 0xC0) == 0x80:
        lo += 1
    hi = len(data)
    for back in range(1, min(4, hi - lo) + 1):
        b = data[hi - back]
        if (b & 0xC0) == 0x80:
            continue
        need = 1 if b < 0x80 else 2 if b >> 5 == 0b110 else 3 if b >> 4 == 0b1110 else 4 if b >> 3 == 0b11110 else 1
        if need > back:
            hi -= back
        break
    return lo, hi


class TokenizerBridge:
    """Two tokenizers, compared once: each token's bytes, the translation of special tokens and the id
    map of tokens whose bytes are identical in both vocabularies (the GOLD hybrid's matched set).

    ``special_map`` maps a student special token's string to the teacher's counterpart (or None to drop
    it); BOS and EOS are paired by role and ChatML's turn markers with Gemma's by default. Translated
    specials are one unit wide on both sides, so they align with each other and join the id map.
    """

    CHAT_MARKERS = {"<|im_start|>": "<start_of_turn>", "<|im_end|>": "<end_of_turn>"}

    def __init__(self, student_tokenizer, teacher_tokenizer, special_map: dict[str, str | None] | None = None):
        self.student_tok, self.teacher_tok = student_tokenizer, teacher_tokenizer
        self.student_bytes = token_bytes(student_tokenizer)
        self.teacher_bytes = token_bytes(teacher_tokenizer)
        self.teacher_specials = special_ids(teacher_tokenizer)
        t_vocab = teacher_tokenizer.get_vocab()
        s_vocab = student_tokenizer.get_vocab()
        s_specials = special_ids(student_tokenizer)
        # A special token both vocabularies spell the same way is its own counterpart.
        pairs: dict[str, str | None] = {s: s for s, i in s_vocab.items() if i in s_specials and s in t_vocab}
        for role in ("bos_token", "eos_token"):
            s, t = getattr(student_tokenizer, role, None), getattr(teacher_tokenizer, role, None)
            if s and t:
                pairs[s] = t
        pairs.update({s: t for s, t in self.CHAT_MARKERS.items() if t in t_vocab})
        pairs.update(special_map or {})
        self.special_translation: dict[int, int] = {}  # student special id -> teacher special id
        for s, t in pairs.items():
            if s in s_vocab and t is not None and t in t_vocab and self.student_bytes[s_vocab[s]] is None:
                self.special_translation[s_vocab[s]] = t_vocab[t]
        self.id_map = self._id_map()
        bos = teacher_tokenizer.bos_token_id
        self.teacher_adds_bos = bos is not None and teacher_tokenizer("a").input_ids[:1] == [bos]

    def _id_map(self) -> dict[int, int]:
        """teacher id -> student id for tokens with identical bytes (ties: the lowest student id), plus the
        translated specials."""
        by_bytes: dict[bytes, int] = {}
        for sid, b in enumerate(self.student_bytes):
            if b is not None and b not in by_bytes:
                by_bytes[b] = sid
        out = {tid: by_bytes[b] for tid, b in enumerate(self.teacher_bytes) if b is not None and b in by_bytes}
        out.update({t: s for s, t in self.special_translation.items()})
        return out

    def student_widths(self, ids: list[int]) -> tuple[bytes, list[int]]:
        """(text bytes, units per student token) for a row of student ids."""
        data, widths = bytearray(), []
        for i in ids:
            b = self.student_bytes[i] if 0 <= i < len(self.student_bytes) else None
            if b is None:
                widths.append(1 if i in self.special_translation else 0)
            else:
                data += b
                widths.append(len(b))
        return bytes(data), widths

    def teacher_ids(self, student_ids: list[int]) -> tuple[list[int], Alignment]:
        """The teacher's tokenization of the text a row of student ids stands for, and the alignment.

        An id of -1 is a placeholder for a partial character cut off at a block's edge: it takes part
        in the alignment but is not given to the model (:func:`model_positions`). Text runs between special tokens are tokenized by the teacher on their own; translated specials
        become the teacher's special ids; the teacher's BOS leads when its tokenizer adds one."""
        s_units: list[tuple[int, int]] = []
        t_ids: list[int] = []
        t_widths: list[int] = []
        if self.teacher_adds_bos and not (student_ids and self.special_translation.get(student_ids[0])
                                          == self.teacher_tok.bos_token_id):
            t_ids.append(self.teacher_tok.bos_token_id)
            t_widths.append(0)
        at = 0
        run: list[int] = []

        def flush():
            nonlocal at
            if not run:
                return
            data, widths = self.student_widths(run)
            lo, hi = _valid_utf8_range(data)
            ids, tw = self._tokenize_bytes(data[lo:hi])
            # Partial characters at a block's edges are units the teacher never sees: a placeholder
            # (id -1, not given to the model) covers them so both sides still cover the same units.
            if lo:
                t_ids.append(-1)
                t_widths.append(lo)
            t_ids.extend(ids)
            t_widths.extend(tw)
            if hi < len(data):
                t_ids.append(-1)
                t_widths.append(len(data) - hi)
            s_units.extend((at + a, at + b) for a, b in _bounds(widths))
            at += sum(widths)
            run.clear()

        for i in student_ids:
            if 0 <= i < len(self.student_bytes) and self.student_bytes[i] is not None:
                run.append(i)
                continue
            flush()
            t = self.special_translation.get(i)
            if t is not None:
                t_ids.append(t)
                t_widths.append(1)
                s_units.append((at, at + 1))
                at += 1
            else:
                s_units.append((at, at))
        flush()
        alignment = align_bounds(s_units, _bounds(t_widths))
        return t_ids, alignment

    def _tokenize_bytes(self, data: bytes) -> tuple[list[int], list[int]]:
        """Teacher ids (no specials added) and their widths in bytes for a run of text."""
        if not data:
            return [], []
        text = data.decode("utf-8")  # valid: partial characters were cut off by the caller
        enc = self.teacher_tok(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(enc["input_ids"])
        pieces = [self.teacher_bytes[i] if 0 <= i < len(self.teacher_bytes) else None for i in ids]
        if all(p is not None for p in pieces) and b"".join(pieces) == data:
            return ids, [len(p) for p in pieces]
        # A normalising tokenizer (its tokens do not spell the text byte for byte): fall back to its
        # character offsets, turned into byte offsets; a token repeating the last end is zero-width.
        char_end = [0]
        for ch in text:
            char_end.append(char_end[-1] + len(ch.encode("utf-8")))
        widths, done = [], 0
        for _, end in enc["offset_mapping"]:
            e = max(char_end[end], done)
            widths.append(e - done)
            done = e
        if widths:
            widths[-1] += len(data) - done
        return ids, widths

    def align_text(self, text: str) -> tuple[list[int], list[int], Alignment]:
        """(student ids, teacher ids, alignment) for a text both tokenize (no specials added)."""
        s_ids = self.student_tok(text, add_special_tokens=False).input_ids
        t_ids, alignment = self.teacher_ids(s_ids)
        return s_ids, t_ids, alignment


def model_positions(teacher_ids: list[int]) -> tuple[list[int], list[int]]:
    """(the ids the model sees, each aligned token's position among them or -1 for a placeholder)."""
    ids, where = [], []
    for t in teacher_ids:
        if t < 0:
            where.append(-1)
        else:
            where.append(len(ids))
            ids.append(t)
    return ids, where
