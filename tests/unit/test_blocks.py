"""to_blocks: held-out text is whole documents or long tails, never a stitch of few-token fragments."""

import pytest

from distillery.data.sources import DataError, Document, read_gensim_lee, to_blocks


def _ids(tok, docs):
    return [tok(d.text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for d in docs]


def test_short_documents_are_held_out_whole_at_about_the_fraction(tiny_tokenizer):
    docs = list({d.text: d for d in read_gensim_lee()}.values())  # the 293 distinct news stories, in order
    encoded = _ids(tiny_tokenizer, docs)
    assert max(map(len, encoded)) * 0.05 < 128
    train, held = to_blocks(docs, tiny_tokenizer, 128, 0.05)
    flat_held = held.flatten().tolist()
    # the held-out rows are whole stories back to back (5% of one is far less than a block)
    i, held_docs = 0, []
    while i < len(flat_held):
        n = next(n for n, e in enumerate(encoded)
                 if n not in held_docs and flat_held[i:i + len(e)] == e[: len(flat_held) - i])
        held_docs.append(n)
        i += len(encoded[n])
    total = sum(map(len, encoded))
    held_tokens = sum(len(encoded[n]) for n in held_docs)
    assert abs(held_tokens - 0.05 * total) < max(map(len, encoded)) + 128, (held_tokens, total)
    # and none of them is trained on: the training rows are the other stories, in order
    rest = [t for n, e in enumerate(encoded) if n not in set(held_docs) for t in e]
    assert train.flatten().tolist() == rest[: train.numel()]


def test_long_documents_keep_a_contiguous_tail_beside_short_ones(tiny_tokenizer, lee_text):
    long_doc, shorts = Document("long", lee_text[:40_000]), read_gensim_lee()[:60]
    train, held = to_blocks([long_doc, *shorts], tiny_tokenizer, 64, 0.1)
    (long_ids, *short_ids) = _ids(tiny_tokenizer, [long_doc, *shorts])
    tail = long_ids[int(len(long_ids) * 0.9):]
    assert len(tail) >= 64
    assert held.flatten().tolist()[: len(tail)] == tail  # the long document's last 10%, as before
    assert train.flatten().tolist()[:1000] == long_ids[:1000]
    assert held.numel() < 0.2 * (train.numel() + held.numel())


def test_too_few_short_documents_fall_back_to_tails(tiny_tokenizer, lee_text):
    docs = [Document("a", lee_text[:500]), Document("b", lee_text[500:1000])]  # ~240 tokens each
    a, b = _ids(tiny_tokenizer, docs)
    assert len(a) * 0.2 < 64 and len(b) * 0.2 < 64  # both short; holding either out whole would be half
    train, held = to_blocks(docs, tiny_tokenizer, 64, 0.2)
    tails = a[int(len(a) * 0.8):] + b[int(len(b) * 0.8):]
    assert held.flatten().tolist() == tails[: held.numel()]
    with pytest.raises(DataError, match="too little text for block_size 64"):
        to_blocks(docs[:1], tiny_tokenizer, 64, 0.2)
