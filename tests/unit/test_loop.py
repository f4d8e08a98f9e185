import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from distillery.evaluate.quality import evaluate_models
from distillery.models.student import cut_layers
from distillery.recipe import DistillConfig
from distillery.signals.online import OnlineTeacher
from distillery.train.loop import lr_lambda, step_indices, train
from tests.helpers import tiny_llama, tiny_recipe

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def blocks(tiny_tokenizer, lee_text):
    ids = tiny_tokenizer(lee_text[:40_000])["input_ids"]
    n = len(ids) // 32
    return torch.tensor(ids[: n * 32]).view(n, 32)


def test_step_indices_cover_each_epoch_once():
    seen = torch.cat([step_indices(s, 6, 30, seed=3) for s in range(5)])
    assert sorted(seen.tolist()) == list(range(30))
    assert not torch.equal(step_indices(0, 6, 30, seed=3), step_indices(0, 6, 30, seed=4))


def test_lr_schedule_warms_up_then_decays():
    cfg = DistillConfig(steps=100, warmup_steps=10, lr=1.0, min_lr_ratio=0.1)
    f = lr_lambda(cfg)
    assert f(0) < f(5) < f(9) <= 1.0
    assert f(10) == pytest.approx(1.0) and f(100) == pytest.approx(0.1) and f(55) < f(20)


def test_distillation_lowers_kl_to_the_teacher(blocks, tmp_path):
    teacher = tiny_llama(layers=4)
    student = cut_layers(teacher, [0, 3])
    held, train_blocks = blocks[:8], blocks[8:]
    before = evaluate_models({"s": student}, held, teacher=teacher)["s"]
    cfg = DistillConfig(steps=30, batch_size=4, lr=3e-3, warmup_steps=2, eval_every=30, eval_blocks=8)
    signal = OnlineTeacher(teacher, model_id="tiny", tokenizer_fingerprint="x")
    records = train(student, signal, train_blocks, cfg, out_dir=tmp_path, eval_blocks=held, eval_teacher=teacher,
                    progress=False)
    after = evaluate_models({"s": student}, held, teacher=teacher)["s"]
    assert after["kl_to_teacher"] < 0.7 * before["kl_to_teacher"]
    assert records[-1]["eval_kl_to_teacher"] == pytest.approx(after["kl_to_teacher"], rel=1e-6)
    assert [r["step"] for r in records] == list(range(1, 31))
    assert len((tmp_path / "train.jsonl").read_text().splitlines()) == 30
    import resource

    rss_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # this process: its peak so far
    for r in records:  # every record carries its terms, throughput and memory
        assert {"loss", "kd", "lr", "grad_norm", "tokens", "tokens_per_s", "peak_rss_gb"} <= r.keys()
        assert r["tokens"] == 4 * (blocks.shape[1] - 1) and r["tokens_per_s"] > 0
        assert 0.05 < r["peak_rss_gb"] <= rss_gb


def test_grad_accumulation_gives_the_same_update(blocks, tmp_path):
    """Loss normalised by the step's token count: 1 x 8 blocks == 4 micro-batches of 2."""
    teacher = tiny_llama(layers=4)
    results = []
    for bs, acc in ((8, 1), (2, 4)):
        student = cut_layers(teacher, [0, 3])
        cfg = DistillConfig(steps=3, batch_size=bs, grad_accum=acc, lr=1e-3, warmup_steps=0)
        recs = train(student, OnlineTeacher(teacher, model_id="t", tokenizer_fingerprint="x"), blocks, cfg,
                     out_dir=tmp_path / f"{bs}", progress=False)
        results.append((recs, student.state_dict()))
    (r1, w1), (r2, w2) = results
    for a, b in zip(r1, r2):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    for k in w1:
        torch.testing.assert_close(w1[k], w2[k], atol=1e-5, rtol=1e-5)


def _tiny_recipe(tmp_path: Path, teacher_dir: Path, text: Path, **distill) -> Path:
    recipe = tiny_recipe(tmp_path, teacher_dir, text, name="tiny", seed=1, report={"enabled": True},
                         distill={"steps": 40, "lr": 2e-3, "eval_every": 20, "checkpoint_every": 10, **distill})
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def _cli(*args, **kw):
    return subprocess.run([sys.executable, "-m", "distillery.cli", *args], capture_output=True, text=True, **kw)


def _losses(run: Path) -> list[float]:
    return [json.loads(x)["loss"] for x in (run / "train.jsonl").read_text().splitlines()]


def test_sigkill_mid_distill_resumes_the_same_loss_sequence(tiny_teacher_dir, lee_file, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    ra, rb = _tiny_recipe(a, tiny_teacher_dir, lee_file), _tiny_recipe(b, tiny_teacher_dir, lee_file)
    proc = _cli("run", str(ra))
    assert proc.returncode == 0, proc.stderr
    uninterrupted = _losses(a / "runs" / "tiny")

    log = b / "runs" / "tiny" / "train.jsonl"
    p = subprocess.Popen([sys.executable, "-m", "distillery.cli", "run", str(rb)],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and p.poll() is None:
        if log.is_file() and len(log.read_text().splitlines()) >= 15:  # past the step-10 checkpoint
            os.kill(p.pid, signal.SIGKILL)
            break
        time.sleep(0.005)
    p.wait()
    assert p.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    resumed = _cli("run", str(rb))
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from step" in resumed.stdout
    assert "resuming from step 0" not in resumed.stdout
    assert _losses(b / "runs" / "tiny") == uninterrupted  # bitwise on CPU


def test_pipeline_end_to_end_and_rerun_skips(tiny_teacher_dir, lee_file, tmp_path):
    recipe = _tiny_recipe(tmp_path, tiny_teacher_dir, lee_file, steps=12)
    first = _cli("run", str(recipe))
    assert first.returncode == 0, first.stderr
    run = tmp_path / "runs" / "tiny"
    for out in ("student/config.json", "student_init/config.json", "eval/summary.json", "manifest.json",
                "report.html", "recipe.yaml", "data/blocks.safetensors"):
        assert (run / out).exists(), out
    summary = json.loads((run / "eval" / "summary.json").read_text())
    assert set(summary) == {"teacher", "student_init", "student"}
    assert summary["teacher"]["kl_to_teacher"] == pytest.approx(0.0, abs=1e-9)
    assert summary["student"]["kl_to_teacher"] < summary["student_init"]["kl_to_teacher"]
    html = (run / "report.html").read_text()
    assert "data:image/png;base64," in html and "student_init" in html
    second = _cli("run", str(recipe))
    assert second.returncode == 0
    assert second.stdout.count("already complete") == 5
    # A changed distill section re-runs distill and what depends on it, not data or the student cut.
    third = _cli("run", str(recipe), "--set", "distill.steps=13")
    assert "data: already complete" in third.stdout and "student_init: already complete" in third.stdout
    assert "distill: already complete" not in third.stdout and "resuming" not in third.stdout
    assert len(_losses(run)) == 13


def test_one_line_in_a_users_own_loop(blocks):
    """The ModelOpt pattern: a plain PyTorch loop adopts distillation with one added line."""
    from distillery import Distiller
    from distillery.recipe import LossesConfig

    teacher = tiny_llama(layers=4)
    student = cut_layers(teacher, [0, 3])
    before = evaluate_models({"s": student}, blocks[:8], teacher=teacher)["s"]["kl_to_teacher"]
    # --- the user's loop ---
    opt = torch.optim.AdamW(student.parameters(), lr=3e-3)
    kd = Distiller(student, OnlineTeacher(teacher, model_id="t", tokenizer_fingerprint="x"), LossesConfig())  # added
    for step in range(25):
        batch = {"input_ids": blocks[8 + 4 * step: 12 + 4 * step]}
        loss = kd.loss(batch)  # was: student(**batch, labels=batch["input_ids"]).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    # ---
    after = evaluate_models({"s": student}, blocks[:8], teacher=teacher)["s"]["kl_to_teacher"]
    assert after < 0.7 * before
    assert set(kd.last_terms) == {"kd", "kd_weighted", "loss"}


@pytest.mark.parametrize("divergence", ["forward_kl", "jsd", "reverse_kl"])
def test_fused_lm_head_path_equals_the_plain_one(divergence):
    """KD fused with the student's lm_head (logits never materialised) gives the same loss and
    gradients as the plain path, in float64."""
    from distillery import Distiller
    from distillery.recipe import LossesConfig

    teacher = tiny_llama(layers=4).double()
    student = cut_layers(teacher, [0, 3])
    batch = {"input_ids": torch.randint(0, 512, (2, 16)), "attention_mask": torch.ones(2, 16, dtype=torch.long)}
    batch["attention_mask"][1, 12:] = 0
    results = []
    for fused in (True, False):
        kd = Distiller(student, OnlineTeacher(teacher, model_id="t", tokenizer_fingerprint="x"),
                       LossesConfig(kd={"fused_lm_head": fused, "divergence": divergence}))
        assert (kd._fusable_head(kd.weights_at(None), False, fused) is not None) == fused
        student.zero_grad()
        loss = kd.loss(batch, num_tokens=25)
        loss.backward()
        results.append((loss.item(), [p.grad.clone() for p in student.parameters()]))
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-12)
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_early_stopping_and_tensorboard(blocks, tmp_path):
    """A student that cannot improve (a vanishing learning rate) stops after `patience` evals without a
    lower held-out KL; every record also lands in TensorBoard."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from distillery.train.checkpoint import list_checkpoints

    teacher = tiny_llama(layers=4)
    student = cut_layers(teacher, [0, 3])
    cfg = DistillConfig(steps=20, batch_size=4, optimizer="sgd", lr=1e-30, warmup_steps=0, eval_every=2,
                        eval_blocks=4, early_stopping_patience=2, checkpoint_every=100, tensorboard=True)
    messages = []
    records = train(student, OnlineTeacher(teacher, model_id="t", tokenizer_fingerprint="x"), blocks[8:], cfg,
                    out_dir=tmp_path, eval_blocks=blocks[:4], eval_teacher=teacher, progress=False,
                    log=messages.append)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert any("early stop at step 6" in m for m in messages)
    assert [p.name for p in list_checkpoints(tmp_path / "checkpoints")] == ["step-000006.pt"]
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert {"loss", "kd", "lr", "eval_kl_to_teacher"} <= set(events.Tags()["scalars"])
    assert [e.step for e in events.Scalars("loss")] == [1, 2, 3, 4, 5, 6]
    assert events.Scalars("loss")[0].value == pytest.approx(records[0]["loss"], rel=1e-6)
