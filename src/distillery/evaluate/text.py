"""Free-text and short-answer metrics: ROUGE-L (rouge-score), corpus BLEU and chrF (sacrebleu),
exact match and token F1 after SQuAD's answer normalisation.

Per-example functions return one number per pair so variants can be compared paired; corpus
BLEU/chrF are corpus statistics (n-gram counts pooled over all pairs), as sacrebleu reports them.
All scores are on a 0-1 scale except BLEU and chrF, which keep sacrebleu's 0-100.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Callable
from functools import lru_cache


def _pairs(predictions: list[str], references: list[str]) -> list[tuple[str, str]]:
    if len(predictions) != len(references):
        raise ValueError(f"text metrics: {len(predictions)} predictions but {len(references)} references")
    return list(zip(predictions, references))


@lru_cache(maxsize=2)
def _rouge_scorer(use_stemmer: bool):
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=use_stemmer)


def rouge_l(predictions: list[str], references: list[str], use_stemmer: bool = False) -> list[float]:
    """ROUGE-L F-measure of each prediction against its reference (longest common subsequence)."""
    scorer = _rouge_scorer(use_stemmer)
    return [scorer.score(ref, pred)["rougeL"].fmeasure for pred, ref in _pairs(predictions, references)]


def bleu(predictions: list[str], references: list[str]) -> float:
    """sacrebleu's corpus BLEU (13a tokenisation, exponential smoothing off), 0-100."""
    import sacrebleu

    pairs = _pairs(predictions, references)
    return sacrebleu.corpus_bleu([p for p, _ in pairs], [[r for _, r in pairs]]).score


def chrf(predictions: list[str], references: list[str]) -> float:
    """sacrebleu's corpus chrF (character 6-grams, beta 2), 0-100."""
    import sacrebleu

    pairs = _pairs(predictions, references)
    return sacrebleu.corpus_chrf([p for p, _ in pairs], [[r for _, r in pairs]]).score


_PUNCT = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD's normalisation: lower case, drop punctuation and the articles a/an/the, collapse spaces."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCT)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def normalize_spaces(text: str) -> str:
    """Only trim the ends (spaces and final punctuation) and collapse spaces: case and words count."""
    return " ".join(text.strip().rstrip(".!").split())


def exact_match(prediction: str, reference: str, normalize: Callable[[str], str] = normalize_answer) -> float:
    return float(normalize(prediction) == normalize(reference))


def token_f1(prediction: str, reference: str, normalize: Callable[[str], str] = normalize_answer) -> float:
    """Harmonic mean of precision and recall of the normalised tokens, counted as a multiset."""
    pred, ref = normalize(prediction).split(), normalize(reference).split()
    if not pred or not ref:  # SQuAD: two empty answers agree, one empty answer scores 0
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)
