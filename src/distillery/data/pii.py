"""PII scrubbing: replace personal data by typed placeholders before anything is stored or sent.

Kinds: ``email``, ``phone``, ``card`` (13-19 digits passing the Luhn check), ``ip`` (v4 and v6),
``iban`` (country code, check digits and a body passing the ISO 13616 mod-97 check) and
``national_id`` (US SSN and UK National Insurance number shapes). Checksums keep ordinary numbers
in prose (years, amounts, page numbers) from being mistaken for cards or IBANs.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Callable, Iterable

KINDS = ("email", "iban", "card", "national_id", "ip", "phone")  # the order they are applied in
PLACEHOLDER = {k: f"[{k.upper()}]" for k in KINDS}


def luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2 == 1:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def iban_ok(iban: str) -> bool:
    s = iban.replace(" ", "").upper()
    moved = s[4:] + s[:4]
    return int("".join(str(int(c, 36)) for c in moved)) % 97 == 1


_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
_H = r"[0-9A-Fa-f]{1,4}"

# (kind, pattern, check on the match or None). Email runs first so that its digits are gone before
# the number-shaped kinds look; SSN runs before phone because an SSN also looks like a phone number.
_RULES: list[tuple[str, re.Pattern, Callable[[str], bool] | None]] = [
    ("email", re.compile(r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b"), None),
    ("iban", re.compile(r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]){11,30}\b"), iban_ok),
    ("card", re.compile(r"(?<![\d-])(?:\d[ -]?){12,18}\d(?![\d-])"), None),  # Luhn: see _card_prefix
    ("national_id", re.compile(r"\b(?!000|666|9\d\d)\d{3}-(?!00)\d{2}-(?!0000)\d{4}\b"), None),
    ("national_id", re.compile(r"\b(?!BG|GB|NK|KN|TN|NT|ZZ)[A-CEGHJ-PR-TW-Z][A-CEGHJ-NPR-TW-Z] ?\d{2} ?\d{2} ?\d{2} ?[A-D]\b"),
     None),
    ("ip", re.compile(rf"(?<![\d.]){_OCTET}(?:\.{_OCTET}){{3}}(?![\d.]|\.\d)"), None),
    ("ip", re.compile(rf"(?<![:\w])(?:(?:{_H}:){{7}}{_H}|(?:{_H}:){{1,6}}:(?:{_H}(?::{_H}){{0,5}})?|::(?:{_H}:){{0,5}}{_H})(?![:\w])"),
     lambda m: sum(c.isdigit() for c in m) >= 1),
    # International (+CC ...) or national forms with separators; 7-15 digits in all.
    ("phone", re.compile(r"(?<![\w+])\+\d{1,3}[ .-]?(?:\(\d{1,4}\)[ .-]?)?\d{1,4}(?:[ .-]?\d{2,4}){1,4}(?![\w-])"),
     lambda m: 7 <= sum(c.isdigit() for c in m) <= 15),
    ("phone", re.compile(r"(?<![\w+])(?:\(\d{2,4}\)[ .-]?|\d{3}[.-])\d{3}[ .-]\d{4}(?![\w-])"), None),
    ("phone", re.compile(r"(?<![\w+])0\d{2,4}[ -]\d{3,4}[ -]?\d{3,4}(?![\w-])"), None),
]


class Scrubber:
    """Replaces the configured kinds and counts what it replaced (``counts``, across calls)."""

    def __init__(self, kinds: Iterable[str] = KINDS):
        kinds = list(kinds)
        unknown = sorted(set(kinds) - set(KINDS))
        if unknown:
            raise ValueError(f"pii.kinds: unknown {unknown} (known: {list(KINDS)})")
        self.rules = [r for r in _RULES if r[0] in kinds]
        self.counts: Counter = Counter()

    def __call__(self, text: str) -> str:
        for kind, pattern, check in self.rules:
            text = pattern.sub(lambda m, k=kind, c=check: self._replace(m, k, c), text)
        return text

    def _replace(self, m: re.Match, kind: str, check) -> str:
        text = m.group(0)
        if kind == "card":
            end = _card_prefix(text)
            if not end:
                return text
            self.counts[kind] += 1
            return PLACEHOLDER[kind] + text[end:]
        if check is not None and not check(text):
            return text
        self.counts[kind] += 1
        return PLACEHOLDER[kind]


def _card_prefix(text: str) -> int:
    """Length of the longest prefix (ending at a digit group) that is a Luhn-valid card number, or 0.

    The pattern is greedy, so a card followed by another number ("4111 1111 1111 1111 50") matches
    too far; trying shorter prefixes finds the card inside it."""
    ends = [m.end() for m in re.finditer(r"\d(?=[ -]|$)", text)]
    for end in reversed(ends):
        digits = re.sub(r"\D", "", text[:end])
        if 13 <= len(digits) <= 19 and luhn_ok(digits):
            return end
    return 0


def scrub(text: str, kinds: Iterable[str] = KINDS) -> tuple[str, Counter]:
    s = Scrubber(kinds)
    return s(text), s.counts
