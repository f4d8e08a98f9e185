"""Shared fixtures: a real (small) BPE tokenizer trained on a registry corpus, and tiny random-weight
Llama models built in code and saved as ordinary Hugging Face folders."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.helpers import TINY_VOCAB, tiny_llama


@pytest.fixture(scope="session")
def lee_text() -> str:
    from distillery.data.sources import read_gensim_lee

    return "\n".join(d.text for d in read_gensim_lee())


@pytest.fixture(scope="session")
def tiny_tokenizer(lee_text, tmp_path_factory):
    """A byte-level BPE tokenizer with a 512-token vocabulary, trained on the Lee news corpus."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=TINY_VOCAB, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(lee_text.splitlines(), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                   bos_token="<|endoftext|>")
    return fast


@pytest.fixture(scope="session")
def trained_tiny_teacher(tiny_tokenizer, lee_text):
    """A tiny Llama trained briefly on real news text, so it has real, peaked predictions to distil."""
    torch.manual_seed(0)
    model = tiny_llama()
    with torch.no_grad():
        model.model.embed_tokens.weight.div_(8.0)
    ids = tiny_tokenizer(lee_text[:120_000])["input_ids"]
    blocks = torch.tensor(ids[: len(ids) // 32 * 32]).view(-1, 32)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for step in range(80):
        batch = blocks[torch.randint(0, len(blocks), (16,))]
        model(input_ids=batch, labels=batch).loss.backward()
        opt.step()
        opt.zero_grad()
    return model.eval()


@pytest.fixture
def tiny_teacher_dir(trained_tiny_teacher, tiny_tokenizer, tmp_path) -> Path:
    folder = tmp_path / "tiny-teacher"
    trained_tiny_teacher.save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
def lee_file(lee_text, tmp_path) -> Path:
    path = tmp_path / "lee.txt"
    path.write_text(lee_text[:60_000])
    return path


@pytest.fixture(scope="session")
def chatml_tokenizer(tiny_tokenizer, tmp_path_factory):
    """A copy of the tiny tokenizer with a ChatML chat template (the session one stays template-free)."""
    from transformers import AutoTokenizer

    from tests.helpers import CHATML

    folder = tmp_path_factory.mktemp("chatml-tok")
    tiny_tokenizer.save_pretrained(folder)
    tok = AutoTokenizer.from_pretrained(folder)
    tok.chat_template = CHATML
    return tok
