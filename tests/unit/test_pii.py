"""PII scrubbing: every supported kind planted in real prose is replaced; real prose is left alone."""

import random

import pytest

from distillery.data.pii import KINDS, PLACEHOLDER, Scrubber, iban_ok, luhn_ok, scrub
from distillery.data.sources import DataError, read_austen, read_gensim_lee, read_gensim_wiki

# Real-format examples of every kind (test numbers: valid checksums, reserved ranges).
PLANTED = {
    "email": ["jane.doe+news@example.co.uk", "a_b@mail.example.org"],
    "phone": ["+1 415 555 0132", "+44 20 7946 0958", "(212) 555-0147", "020 7946 0958", "+49 (30) 1234 5678",
              "415-555-0199"],
    "card": ["4111 1111 1111 1111", "5500-0000-0000-0004", "340000000000009", "6011000990139424"],
    "ip": ["192.168.1.20", "8.8.8.8", "2001:0db8:85a3:0000:0000:8a2e:0370:7334", "fe80::1ff:fe23:4567:890a"],
    "iban": ["GB82 WEST 1234 5698 7654 32", "DE89370400440532013000", "FR1420041010050500013M02606"],
    "national_id": ["123-45-6789", "JG 10 37 21 B", "AB123456D"],
}


def _prose() -> list[str]:
    lines = []
    try:
        for d in read_austen(["emma", "persuasion"]):
            lines += [p for p in d.text.split("\n\n") if p.strip()]
    except DataError:
        pass  # janeaustenr not unpacked here: the gensim corpora still give real prose
    lines += [d.text for d in read_gensim_lee()]
    for d in read_gensim_wiki(60):
        lines += [p for p in d.text.splitlines() if p.strip()]
    return lines


PROSE = _prose()


def test_checksums():
    assert luhn_ok("4111111111111111") and not luhn_ok("4111111111111112")
    assert iban_ok("GB82WEST12345698765432") and not iban_ok("GB83WEST12345698765432")


@pytest.mark.parametrize("kind", KINDS)
def test_each_kind_alone(kind):
    for value in PLANTED[kind]:
        out, counts = scrub(f"Contact: {value}, thanks.", [kind])
        assert out == f"Contact: {PLACEHOLDER[kind]}, thanks.", (kind, value, out)
        assert counts[kind] == 1


def test_planted_in_real_prose_and_generated_text_all_replaced():
    rng = random.Random(0)
    generated = ["Sure! You can reach me at {} any time.", "The answer is 42. Details: {}.", "{}"]
    hosts = rng.sample(PROSE, 40) + generated * 5
    s = Scrubber()
    planted = 0
    for kind, values in PLANTED.items():
        for value in values:
            for host in rng.sample(hosts, 4):
                words = host.split(" ")
                cut = rng.randint(0, len(words))
                line = host.format(value) if "{}" in host else " ".join(words[:cut] + [value] + words[cut:])
                out = s(line)
                planted += 1
                assert value not in out, (kind, value, out)
                assert PLACEHOLDER[kind] in out, (kind, value, out)
    assert sum(s.counts.values()) >= planted


def test_real_prose_mostly_untouched():
    assert len(PROSE) > 1000
    s = Scrubber()
    changed = [line for line in PROSE if s(line) != line]
    assert len(changed) / len(PROSE) < 0.01, (len(changed), len(PROSE), changed[:5], dict(s.counts))


def test_ordinary_numbers_are_not_pii():
    text = "In 1811 she paid 2,500 pounds; see pages 12-14, version 2.1, call at 10:30, ratio 3:1."
    assert scrub(text)[0] == text


def test_configurable_kinds_and_unknown_kind_is_an_error():
    out, counts = scrub("mail a@b.com or 192.168.0.1", ["email"])
    assert out == "mail [EMAIL] or 192.168.0.1" and counts == {"email": 1}
    with pytest.raises(ValueError, match="pii.kinds"):
        Scrubber(["ssn"])
