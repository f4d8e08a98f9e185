"""Calibration, bootstrap/McNemar and text metrics against independent implementations
(torchmetrics, scipy, rouge-score, sacrebleu) and hand-computed values."""

import math

import numpy as np
import pytest
import torch
from scipy import stats as sps

from distillery.evaluate.calibration import (calibration_errors, model_token_confidence, next_token_calibration,
                                             reliability, token_confidence)
from distillery.evaluate.stats import bootstrap_ci, mcnemar, paired_bootstrap
from distillery.evaluate.text import bleu, chrf, exact_match, normalize_answer, normalize_spaces, rouge_l, token_f1
from tests.helpers import tiny_llama

# ---------------------------------------------------------------- calibration


def _torchmetrics_binary(conf, correct, norm, n_bins=15):
    from torchmetrics.classification import BinaryCalibrationError

    m = BinaryCalibrationError(n_bins=n_bins, norm=norm)
    return m(torch.as_tensor(conf, dtype=torch.float32), torch.as_tensor(correct, dtype=torch.long)).item()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_answer_confidence_ece_mce_equal_torchmetrics(seed):
    g = torch.Generator().manual_seed(seed)
    conf = torch.rand(500, generator=g)
    # correctness drawn with probability conf**2: over-confident, so the errors are far from zero
    correct = (torch.rand(500, generator=g) < conf ** 2).long()
    conf[:2] = torch.tensor([0.0, 0.5])  # the lower end of the range and a mid-bin value
    ours = calibration_errors(conf, correct)
    assert ours["ece"] > 0.05
    assert ours["ece"] == pytest.approx(_torchmetrics_binary(conf, correct, "l1"), abs=1e-6)
    assert ours["mce"] == pytest.approx(_torchmetrics_binary(conf, correct, "max"), abs=1e-6)
    assert sum(ours["bins"]["count"]) == 500 and len(ours["bins"]["count"]) == 15


def test_calibration_hand_computed():
    # bin [0.9, 1.0): conf 0.9, acc 0.5; bin [0.1, 0.2): conf 0.1, acc 0
    out = calibration_errors([0.9, 0.9, 0.1, 0.1], [1, 0, 0, 0], n_bins=10)
    assert out["ece"] == pytest.approx(0.5 * 0.4 + 0.5 * 0.1)
    assert out["mce"] == pytest.approx(0.4)
    rel = reliability([0.9, 0.9, 0.1, 0.1], [1, 0, 0, 0], n_bins=10)
    assert rel.count == [0, 2, 0, 0, 0, 0, 0, 0, 0, 2]
    assert rel.accuracy[9] == 0.5 and rel.accuracy[1] == 0.0 and rel.confidence[0] is None
    assert rel.lower[9] == pytest.approx(0.9) and rel.upper[9] == 1.0
    # a confidence of exactly 1.0 falls in the last bin (torchmetrics would give it a bin of its own)
    assert reliability([1.0, 0.95], [0, 1], n_bins=10).count[9] == 2
    assert calibration_errors([1.0, 0.95], [0, 1], n_bins=10)["mce"] == pytest.approx(0.475)


def test_calibration_rejects_bad_input():
    with pytest.raises(ValueError, match="confidence must lie in"):
        calibration_errors([1.5], [1])
    with pytest.raises(ValueError, match="2 confidences but 1"):
        calibration_errors([0.5, 0.5], [1])


def test_next_token_ece_equals_torchmetrics_multiclass():
    from torchmetrics.classification import MulticlassCalibrationError

    g = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(4, 20, 50, generator=g)
    targets = torch.randint(0, 50, (4, 20), generator=g)
    # make a third of the targets the argmax, so accuracy is spread over the bins
    targets[:, ::3] = logits[:, ::3].argmax(-1)
    targets[0, :5] = -100
    conf, hit = token_confidence(logits, targets)
    assert conf.numel() == 75
    keep = targets != -100
    for norm, key in (("l1", "ece"), ("max", "mce")):
        tm = MulticlassCalibrationError(num_classes=50, n_bins=15, norm=norm)
        ref = tm(torch.softmax(logits[keep], -1), targets[keep]).item()
        assert calibration_errors(conf, hit)[key] == pytest.approx(ref, abs=1e-6)


def test_model_next_token_calibration_matches_direct_logits(tiny_tokenizer, lee_text):
    from torchmetrics.classification import MulticlassCalibrationError

    model = tiny_llama()  # random but widened logits: confidences spread over the bins
    ids = torch.tensor(tiny_tokenizer(lee_text[:4000])["input_ids"][:96]).view(3, 32)
    conf, hit = model_token_confidence(model, ids, batch_size=2)
    assert conf.numel() == 3 * 31
    with torch.no_grad():
        logits = model(input_ids=ids).logits[:, :-1]
    tm = MulticlassCalibrationError(num_classes=logits.shape[-1], n_bins=15, norm="l1")
    ref = tm(torch.softmax(logits.reshape(-1, logits.shape[-1]), -1), ids[:, 1:].reshape(-1)).item()
    assert next_token_calibration(model, ids)["ece"] == pytest.approx(ref, abs=1e-5)
    assert hit.sum().item() == (logits.argmax(-1) == ids[:, 1:]).sum().item()
    assert torch.allclose(conf, torch.softmax(logits.double(), -1).amax(-1).reshape(-1), atol=1e-6)


# ---------------------------------------------------------------- bootstrap and McNemar


def test_bootstrap_ci_equals_scipy_percentile():
    x = np.random.default_rng(5).exponential(size=200)
    ours = bootstrap_ci(x, n_resamples=2000, seed=7)
    ref = sps.bootstrap((x,), np.mean, method="percentile", n_resamples=2000, rng=np.random.default_rng(7))
    assert ours["value"] == pytest.approx(x.mean())
    assert ours["low"] == pytest.approx(ref.confidence_interval.low, rel=1e-12)
    assert ours["high"] == pytest.approx(ref.confidence_interval.high, rel=1e-12)
    assert ours["low"] < ours["value"] < ours["high"]
    assert bootstrap_ci(x, n_resamples=2000, seed=7) == ours  # seeded


def test_paired_bootstrap_interval_equals_scipy_paired():
    rng = np.random.default_rng(1)
    a = rng.normal(0.6, 0.2, 150)
    b = a - rng.normal(0.05, 0.1, 150)
    ours = paired_bootstrap(a, b, n_resamples=3000, seed=3)
    ref = sps.bootstrap((a, b), lambda x, y, axis: np.mean(x - y, axis=axis), paired=True, method="percentile",
                        n_resamples=3000, rng=np.random.default_rng(3))
    assert ours["difference"] == pytest.approx(np.mean(a - b))
    assert ours["low"] == pytest.approx(ref.confidence_interval.low, rel=1e-12)
    assert ours["high"] == pytest.approx(ref.confidence_interval.high, rel=1e-12)


@pytest.mark.parametrize("shift", [0.02, 0.04])
def test_paired_bootstrap_p_value_close_to_paired_t_test(shift):
    # with a normal difference and n = 400 the bootstrap and the paired t-test agree closely
    rng = np.random.default_rng(11)
    a = rng.normal(0, 1, 400)
    b = a - shift - rng.normal(0, 0.3, 400)
    ours = paired_bootstrap(a, b, n_resamples=20000, seed=0)["p_value"]
    ref = sps.ttest_rel(a, b).pvalue
    assert 0.001 < ref < 0.5
    assert ours == pytest.approx(ref, abs=0.015)


def test_paired_bootstrap_identical_variants():
    x = np.random.default_rng(0).random(50)
    out = paired_bootstrap(x, x)
    assert out["difference"] == 0 and out["p_value"] == 1.0 and out["low"] == out["high"] == 0
    with pytest.raises(ValueError, match="differ in length"):
        paired_bootstrap(x, x[:-1])


@pytest.mark.parametrize("b,c", [(1, 6), (10, 3), (0, 5), (25, 25), (40, 20), (0, 0)])
def test_mcnemar_equals_scipy_binomtest(b, c):
    # build paired outcomes with b (a right, b wrong) and c (a wrong, b right) discordant pairs
    a_right = [1] * b + [0] * c + [1] * 7 + [0] * 4
    b_right = [0] * b + [1] * c + [1] * 7 + [0] * 4
    out = mcnemar(a_right, b_right)
    assert (out["b"], out["c"]) == (b, c)
    ref = 1.0 if b + c == 0 else sps.binomtest(b, b + c, 0.5).pvalue
    assert out["p_value"] == pytest.approx(ref, rel=1e-12)
    assert out["difference"] == pytest.approx((b - c) / len(a_right))


def test_mcnemar_textbook_value():
    # b = 1, c = 6: p = 2 * (C(7,0) + C(7,1)) / 2^7 = 16 / 128
    assert mcnemar([1] + [0] * 6, [0] + [1] * 6)["p_value"] == pytest.approx(0.125)
    with pytest.raises(ValueError, match="0/1"):
        mcnemar([0.5], [1])


# ---------------------------------------------------------------- text metrics


def test_rouge_l_equals_rouge_score_and_hand_value():
    from rouge_score import rouge_scorer

    preds = ["the cat sat on the mat", "a quick brown fox", "nothing in common", ""]
    refs = ["the cat is on the mat", "the quick brown dog jumps", "entirely other words", "empty"]
    ours = rouge_l(preds, refs)
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    assert ours == [scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(preds, refs)]
    assert ours[0] == pytest.approx(5 / 6)  # LCS "the cat on the mat": P = R = 5/6
    assert ours[2] == 0.0


def test_bleu_chrf_equal_sacrebleu_and_hand_value():
    import sacrebleu

    preds = ["the cat sat on the mat today", "he read the book", "the weather is nice"]
    refs = ["the cat sat on the mat", "he reads a book", "it is sunny"]
    assert bleu(preds, refs) == sacrebleu.corpus_bleu(preds, [refs]).score
    assert chrf(preds, refs) == sacrebleu.corpus_chrf(preds, [refs]).score
    # one pair, by hand: brevity penalty 1 (7 >= 6); modified precisions 6/7, 5/6, 4/5, 3/4
    assert bleu(preds[:1], refs[:1]) == pytest.approx(100 * (3 / 7) ** 0.25)
    assert bleu(refs, refs) == pytest.approx(100) and chrf(refs, refs) == pytest.approx(100)
    with pytest.raises(ValueError, match="3 predictions but 2 references"):
        bleu(preds, refs[:2])


def test_exact_match_and_token_f1_hand_values():
    assert normalize_answer("  The  Cat, sat!  ") == "cat sat"
    assert exact_match("The Cat!", "cat") == 1.0 and exact_match("cats", "cat") == 0.0
    assert token_f1("the cat sat", "a cat sat down") == pytest.approx(0.8)  # P = 1, R = 2/3
    assert token_f1("cat cat", "cat") == pytest.approx(2 * 0.5 * 1 / 1.5)  # multiset: 1 common of 2
    assert token_f1("dog", "cat") == 0.0
    assert token_f1("the", "a") == 1.0 and token_f1("", "cat") == 0.0  # both empty after normalising
    assert math.isclose(token_f1("42", "42"), 1.0)
    # a formatting answer keeps case: only spaces and a final full stop are forgiven
    assert exact_match(" APPLE  RIVER. ", "APPLE RIVER", normalize_spaces) == 1.0
    assert exact_match("apple river", "APPLE RIVER", normalize_spaces) == 0.0
    assert token_f1("APPLE river", "APPLE RIVER", normalize_spaces) == pytest.approx(0.5)
