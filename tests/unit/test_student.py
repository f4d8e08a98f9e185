import pytest
import torch
from transformers import AutoModelForCausalLM

from distillery.models.layers import decoder_layers
from distillery.models.student import (StudentError, block_influence, choose_layers, cut_layers, evenly_spaced,
                                       fresh_student, skip_loss_increase)
from distillery.recipe import CutConfig
from tests.helpers import tiny_llama


def test_evenly_spaced_keeps_ends():
    assert evenly_spaced(30, 15)[0] == 0 and evenly_spaced(30, 15)[-1] == 29
    assert len(evenly_spaced(30, 15)) == 15
    with pytest.raises(StudentError, match="num_layers"):
        evenly_spaced(4, 5)


def test_cut_is_a_plain_model_that_round_trips(tmp_path):
    teacher = tiny_llama(layers=4)
    student = cut_layers(teacher, [0, 3])
    assert len(decoder_layers(student)) == 2 and student.config.num_hidden_layers == 2
    assert len(decoder_layers(teacher)) == 4  # the teacher is untouched
    # The kept layers are the teacher's own weights.
    assert torch.equal(decoder_layers(student)[1].mlp.up_proj.weight, decoder_layers(teacher)[3].mlp.up_proj.weight)
    student.save_pretrained(tmp_path / "s")
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "s")
    ids = torch.randint(0, 512, (2, 16))
    torch.testing.assert_close(back(input_ids=ids).logits, student(input_ids=ids).logits)
    # Generation with a KV cache works after renumbering layer_idx.
    out = back.generate(ids[:1, :4], max_new_tokens=5, do_sample=False)
    assert out.shape == (1, 9)


def test_importance_picks_the_layers_that_change_the_hidden_state_most():
    teacher = tiny_llama(layers=6)
    # Make layers 1 and 4 near-identity maps: their block influence must be the lowest.
    with torch.no_grad():
        for i in (1, 4):
            decoder_layers(teacher)[i].self_attn.o_proj.weight.zero_()
            decoder_layers(teacher)[i].mlp.down_proj.weight.zero_()
    blocks = torch.randint(0, 512, (4, 32))
    scores = block_influence(teacher, blocks)
    assert scores[1] < 1e-6 and scores[4] < 1e-6 and min(scores[i] for i in (0, 2, 3, 5)) > 1e-5
    keep = choose_layers(CutConfig(num_layers=4, select="importance"), 6, teacher, blocks)
    assert keep == [0, 2, 3, 5]


def test_skip_loss_keeps_the_layers_whose_skipping_costs_most():
    teacher = tiny_llama(layers=6)
    with torch.no_grad():  # layer 2 writes nothing to the residual stream: skipping it costs nothing
        decoder_layers(teacher)[2].self_attn.o_proj.weight.zero_()
        decoder_layers(teacher)[2].mlp.down_proj.weight.zero_()
    blocks = torch.randint(0, 512, (4, 32), generator=torch.Generator().manual_seed(3))
    rises = skip_loss_increase(teacher, blocks)
    assert rises[2] == pytest.approx(0.0, abs=1e-6)
    keep = choose_layers(CutConfig(num_layers=3, select="skip_loss"), 6, teacher, blocks)
    assert keep == sorted(sorted(range(6), key=lambda i: -rises[i])[:3]) and 2 not in keep
    with pytest.raises(StudentError, match="select=skip_loss needs the teacher"):
        choose_layers(CutConfig(num_layers=3, select="skip_loss"), 6)


def test_choose_layers_variants_and_errors():
    assert choose_layers(CutConfig(every=2), 6) == [0, 2, 4]
    assert choose_layers(CutConfig(keep_layers=[5, 0]), 6) == [0, 5]
    with pytest.raises(StudentError, match="out of range"):
        choose_layers(CutConfig(keep_layers=[0, 9]), 6)
    with pytest.raises(ValueError, match="exactly one"):
        CutConfig(every=2, num_layers=3)


def test_fresh_student_from_config():
    teacher = tiny_llama(layers=4)
    s = fresh_student(teacher.config, {"num_hidden_layers": 2, "intermediate_size": 16})
    assert s.config.num_hidden_layers == 2 and len(decoder_layers(s)) == 2
    with pytest.raises(StudentError, match="student.config.nonsense"):
        fresh_student(teacher.config, {"nonsense": 1})


def test_decoder_layers_of_other_architectures_and_of_a_model_without_them():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=3, n_embd=16, n_head=2, vocab_size=64))
    assert decoder_layers(gpt2) is gpt2.transformer.h
    student = cut_layers(gpt2, [0, 2])
    assert len(student.transformer.h) == 2 and student.config.n_layer == 2
    with pytest.raises(ValueError, match="Linear: cannot find its decoder layers"):
        decoder_layers(torch.nn.Linear(2, 2))
