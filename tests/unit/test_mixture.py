"""Data mixtures: each step's examples drawn from the components by weight, a pure function of (seed, step)."""

import dataclasses
import json
import math

import pytest
import torch

from distillery.data.mixture import CHUNK, Component, MixtureSampler, build, heldout_of, interleave
from distillery.models.student import cut_layers
from distillery.recipe import DistillConfig, RecipeError, parse_recipe
from distillery.signals.online import OnlineTeacher
from distillery.train.loop import train
from tests.helpers import run, tiny_llama, tiny_recipe

COMPONENTS = [Component("a", 5.0, 0, 40), Component("b", 3.0, 40, 25), Component("c", 2.0, 65, 7)]


def test_proportions_match_the_weights_within_sampling_error():
    sampler = MixtureSampler(COMPONENTS, seed=1)
    steps, per_step = 2500, 4  # 10,000 slots: across chunk boundaries (CHUNK = 4096)
    rows = torch.cat([sampler.indices(s, per_step) for s in range(steps)])
    counts = torch.bincount(sampler.component_of(rows), minlength=3).tolist()
    n = steps * per_step
    for c, k in zip(COMPONENTS, counts):
        p = c.weight / 10.0
        assert abs(k - n * p) < 4 * math.sqrt(n * p * (1 - p)), (c.name, k, n * p)
    # within a component the draws walk a permutation per epoch: every row of c (7 rows) seen equally often
    c_rows = rows[(rows >= 65)]
    per_row = torch.bincount(c_rows - 65, minlength=7)
    assert per_row.max() - per_row.min() <= 1
    assert rows.min() >= 0 and rows.max() < 72


def test_same_seed_same_batches_other_seed_others():
    a, b, other = MixtureSampler(COMPONENTS, 7), MixtureSampler(COMPONENTS, 7), MixtureSampler(COMPONENTS, 8)
    first = [a.indices(s, 8) for s in range(50)]
    assert all(torch.equal(x, b.indices(s, 8)) for s, x in enumerate(first))
    assert not all(torch.equal(x, other.indices(s, 8)) for s, x in enumerate(first))


def test_any_step_is_the_same_read_alone_or_in_order():
    """What resume relies on: a fresh sampler asked for step k gives the batch the run would have read."""
    walked = MixtureSampler(COMPONENTS, 3)
    seq = [walked.indices(s, 6) for s in range(1500)]  # 9,000 slots: past two chunk boundaries
    for k in (0, 1, CHUNK // 6, 683, 1364, 1499):
        assert torch.equal(MixtureSampler(COMPONENTS, 3).indices(k, 6), seq[k]), k


def test_bad_components_are_named():
    with pytest.raises(ValueError, match="'b': weight must be > 0"):
        MixtureSampler([Component("a", 1.0, 0, 3), Component("b", 0.0, 3, 3)], 0)
    with pytest.raises(ValueError, match="'a': no training blocks"):
        MixtureSampler([Component("a", 1.0, 0, 0)], 0)


def test_heldout_is_interleaved_by_weight_and_recoverable():
    order = interleave([6, 2, 100], [1.0, 1.0, 2.0])
    assert order[:4] == [(2, 0), (0, 0), (1, 0), (2, 1)]
    assert sorted(order) == sorted([(0, i) for i in range(6)] + [(1, i) for i in range(2)]
                                   + [(2, i) for i in range(100)])
    parts = [(name, w, {"input_ids": torch.full((n, 4), k)}, {"input_ids": torch.full((h, 4), k)}, 1)
             for k, (name, w, n, h) in enumerate((("x", 1.0, 5, 3), ("y", 3.0, 2, 4)))]
    train_, held, info = build(parts)
    assert train_["input_ids"][:, 0].tolist() == [0] * 5 + [1] * 2
    assert held["input_ids"][:2, 0].tolist() == [1, 0]  # the heavier component leads
    assert heldout_of(info, held, "x")["input_ids"][:, 0].tolist() == [0, 0, 0]
    assert [c["train_rows"] for c in info["components"]] == [[0, 5], [5, 2]]
    assert [c["share"] for c in info["components"]] == [0.25, 0.75]


def test_compression_calibrates_on_every_component_as_the_cut_does(tmp_path):
    from distillery.compress.chain import Inputs, calibration_blocks

    parts = [(name, w, {"input_ids": torch.full((n, 4), k)}, {"input_ids": torch.full((1, 4), k)}, 1)
             for k, (name, w, n) in enumerate((("x", 1.0, 40), ("y", 1.0, 40)))]
    train_, _, info = build(parts)
    inputs = Inputs(run=tmp_path, train_examples=train_, eval_examples={}, teacher_signal=lambda: None,
                    eval_teacher=None, tokenizer=None, device=torch.device("cpu"), mixture=info)
    blocks = calibration_blocks(inputs, seed=3, n=16)
    assert blocks.shape == (16, 4) and set(blocks[:, 0].tolist()) == {0, 1}  # the head rows are all x's
    expected = MixtureSampler.from_info(info, 3).indices(0, 16)
    assert torch.equal(blocks, train_["input_ids"][expected])
    single = dataclasses.replace(inputs, mixture=None)
    assert torch.equal(calibration_blocks(single, seed=3, n=16), train_["input_ids"][:16])


def test_resumed_training_continues_the_same_sequence(tmp_path):
    """Stopped at step 3 and resumed, the run reads the batches the uninterrupted one read."""
    teacher = tiny_llama(layers=2)
    data = torch.randint(0, 500, (30, 16))
    mixture = {"components": [{"name": "a", "weight": 1.0, "train_rows": [0, 20]},
                              {"name": "b", "weight": 3.0, "train_rows": [20, 10]}]}
    signal = OnlineTeacher(teacher, model_id="t", tokenizer_fingerprint="x")

    def run_steps(out, steps, seen):
        def record(batch, step):
            seen[step] = batch["example_ids"].tolist()
            return batch
        cfg = DistillConfig(steps=steps, batch_size=4, lr=1e-3, warmup_steps=0, schedule="constant",
                            checkpoint_every=3)  # constant: the 3-step run's schedule is the 6-step run's
        return train(cut_layers(teacher, [0]), signal, data, cfg, out_dir=out, seed=5, progress=False,
                     batch_transform=record, mixture=mixture, log=lambda m: None)

    whole, parts = {}, {}
    full = run_steps(tmp_path / "whole", 6, whole)
    run_steps(tmp_path / "parts", 3, parts)
    resumed = run_steps(tmp_path / "parts", 6, parts)
    assert parts == whole and sorted(whole) == list(range(6))
    assert [r["loss"] for r in resumed[3:]] == pytest.approx([r["loss"] for r in full[3:]], rel=1e-5)
    ids = torch.tensor([i for v in whole.values() for i in v])
    assert (ids >= 20).sum() > (ids < 20).sum()  # weight 3 of 4 on b


def _mixture(*components) -> dict:
    return {"kind": "mixture", "components": list(components)}


def test_recipe_errors_name_the_field(tmp_path, lee_file):
    text = {"kind": "text", "path": str(lee_file)}
    base = tiny_recipe(tmp_path, tmp_path, lee_file)
    base["teacher"] = {"model": "builtin:smollm2-135m-instruct"}
    cases = [
        (_mixture({"weight": 0, "source": text}), "data.source.components.0.weight: Input should be greater than 0"),
        (_mixture({"weight": -1, "source": text}), "data.source.components.0.weight"),
        (_mixture({"weight": 1, "source": {"kind": "wikipedia"}}), "data.source.components.0.source: Input tag "
                                                                     "'wikipedia'"),
        (_mixture({"weight": 1, "source": {"kind": "corpus", "name": "nope"}}),
         "data.source.components.0.source.name"),
        (_mixture({"weight": 1, "source": text}, {"weight": 1, "source": text}),
         "components[1]: the name 'lee' is taken"),
        (_mixture(), "data.source.components: List should have at least 1 item"),
        (_mixture({"weight": 1, "source": {"kind": "generated"}}), "kind generated needs a generate section"),
    ]
    for source, message in cases:
        with pytest.raises(RecipeError, match=message.replace("(", r"\(").replace("[", r"\[")):
            parse_recipe({**base, "data": {"source": source}})
    with pytest.raises(RecipeError, match="evaluate.slices.x"):
        parse_recipe({**base, "data": {"source": text},
                      "evaluate": {"slices": {"x": _mixture({"weight": 1, "source": text})}}})
    ok = parse_recipe({**base, "data": {"source": _mixture({"weight": 1, "source": text},
                                                           {"weight": 3, "source": text, "name": "again"})}})
    assert ok.data.source.shares() == {"lee": 0.25, "again": 0.75}


def test_the_summary_gives_each_trained_variant_its_ratio_to_the_teacher_per_text(tmp_path):
    from distillery.pipeline import summary_line

    (tmp_path / "eval").mkdir()
    ppl = {"teacher": 40.0, "student_init": 400.0, "student": 50.0, "int8": 60.0}
    (tmp_path / "eval" / "summary.json").write_text(json.dumps(
        {v: {"perplexity": p, "kl_to_teacher": 0.5} for v, p in sorted(ppl.items())}))
    (tmp_path / "eval" / "slices.json").write_text(json.dumps(
        {"wiki": {"teacher": {"perplexity": 30.0}, "student": {"perplexity": 57.0}, "int8": {"perplexity": 75.0}},
         "sentiment": {"teacher": {"accuracy": 0.6}}}))
    lines = summary_line(tmp_path).splitlines()
    # the distilled student first, then what was compressed from it; never the untrained cut
    assert lines[1:] == ["student/teacher perplexity: held-out 1.25x, wiki 1.90x",
                         "int8/teacher perplexity: held-out 1.50x, wiki 2.50x"]


def test_mixture_recipe_runs_and_states_its_mixture(tmp_path, tiny_teacher_dir, lee_text):
    news, other = tmp_path / "news.txt", tmp_path / "other.txt"
    news.write_text(lee_text[:30_000])
    other.write_text(lee_text[30_000:45_000])
    recipe = tiny_recipe(tmp_path, tiny_teacher_dir, news, distill={"steps": 6, "eval_every": 6,
                                                                     "checkpoint_every": 6})
    recipe["data"]["source"] = _mixture({"weight": 2, "source": {"kind": "text", "path": str(news)}},
                                        {"weight": 1, "source": {"kind": "text", "path": str(other)}})
    summary = run(recipe)
    folder = tmp_path / "runs" / "v"
    manifest = json.loads((folder / "manifest.json").read_text())
    stated = manifest["stages"]["data"]["mixture"]
    assert [(c["name"], round(c["share"], 3)) for c in stated] == [("news", 0.667), ("other", 0.333)]
    assert stated[0]["train_blocks"] > stated[1]["train_blocks"] > 0
    assert "data/mixture.json" in manifest["stages"]["data"]["outputs"]
    slices = json.loads((folder / "eval" / "slices.json").read_text())
    assert set(slices) == {"heldout:news", "heldout:other"} and "student" in slices["heldout:other"]
    assert summary["student"]["kl_to_teacher"] < summary["student_init"]["kl_to_teacher"]
    from distillery.pipeline import summary_line

    ratio = slices["heldout:other"]["student"]["perplexity"] / slices["heldout:other"]["teacher"]["perplexity"]
    assert f"heldout:other {ratio:.2f}x" in summary_line(folder).splitlines()[1]
    from distillery.report.html import write_report

    assert "Training data mixture" in write_report(folder, title="t").read_text()
