"""torchrun data parallel (gloo, CPU) gives the same losses and weights as one process with
twice the gradient accumulation: the loss is normalised by the global token count."""

import contextlib
import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from distillery.models.student import cut_layers
from distillery.recipe import DistillConfig
from distillery.signals.online import OnlineTeacher
from distillery.train.loop import train
from tests.helpers import tiny_llama, tiny_recipe

ROOT = Path(__file__).resolve().parents[2]

WORKER = textwrap.dedent("""
    import json, sys, torch
    sys.path.insert(0, {root!r})
    from distillery.models.student import cut_layers
    from distillery.recipe import DistillConfig
    from distillery.signals.online import OnlineTeacher
    from distillery.train.distributed import init_distributed, world
    from distillery.train.loop import train
    from tests.helpers import tiny_llama, tiny_recipe
    import torch.distributed as dist

    init_distributed()
    rank, size = world()
    teacher = tiny_llama(layers=4)
    student = cut_layers(teacher, [0, 3])
    blocks = torch.load({blocks!r})
    cfg = DistillConfig(steps=5, batch_size=2, grad_accum=1, lr=1e-3, warmup_steps=1, checkpoint_every=100,
                        fsdp={fsdp!r}, shard_teacher={shard_teacher!r})
    total = sum(p.numel() for p in teacher.parameters())
    recs = train(student, OnlineTeacher(teacher, model_id="t", tokenizer_fingerprint="x"), blocks, cfg,
                 out_dir=__import__("pathlib").Path({out!r}), progress=False)
    # What this rank holds of the teacher: a shard's local tensor, or the whole parameter.
    local = sum((p.to_local() if hasattr(p, "to_local") else p).numel() for p in teacher.parameters())
    from distillery.train.distributed import full_state_dict
    state = full_state_dict(student)
    if rank == 0:
        torch.save(state, {out!r} + "/weights.pt")
        json.dump([r["loss"] for r in recs], open({out!r} + "/losses.json", "w"))
        json.dump({{"total": total, "local": local}}, open({out!r} + "/teacher.json", "w"))
    dist.destroy_process_group()
""")


@pytest.mark.skipif(shutil.which("torchrun") is None and not (Path(sys.executable).parent / "torchrun").exists(),
                    reason="torchrun not installed")
@pytest.mark.parametrize("fsdp,shard_teacher", [(False, False), (True, False), (True, True)],
                         ids=["ddp", "fsdp2-student", "fsdp2-student-and-teacher"])
def test_torchrun_two_ranks_equals_one_process_with_double_accumulation(tmp_path, fsdp, shard_teacher):
    torch.manual_seed(0)
    blocks = torch.randint(0, 512, (40, 32))
    torch.save(blocks, tmp_path / "blocks.pt")
    out = tmp_path / "ddp"
    out.mkdir()
    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(root=str(ROOT), blocks=str(tmp_path / "blocks.pt"), out=str(out), fsdp=fsdp,
                                    shard_teacher=shard_teacher))
    torchrun = Path(sys.executable).parent / "torchrun"
    proc = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node=2", str(script)],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]

    teacher = tiny_llama(layers=4)
    student = cut_layers(teacher, [0, 3])
    cfg = DistillConfig(steps=5, batch_size=2, grad_accum=2, lr=1e-3, warmup_steps=1, checkpoint_every=100)
    recs = train(student, OnlineTeacher(teacher, model_id="t", tokenizer_fingerprint="x"), blocks, cfg,
                 out_dir=tmp_path / "single", progress=False)
    ddp_losses = json.loads((out / "losses.json").read_text())
    assert len(ddp_losses) == 5
    for a, b in zip(ddp_losses, [r["loss"] for r in recs]):
        assert abs(a - b) < 1e-5
    held = json.loads((out / "teacher.json").read_text())
    if shard_teacher:  # each rank kept about half of the teacher (rows split over 2 ranks)
        assert held["local"] <= 0.55 * held["total"], held
    else:
        assert held["local"] == held["total"]
    ddp_weights = torch.load(out / "weights.pt")
    for k, v in student.state_dict().items():
        torch.testing.assert_close(ddp_weights[k], v, atol=1e-5, rtol=0)


def _prepare_tiny(tmp_path, teacher_dir, text, **distill):
    import yaml

    recipe = tiny_recipe(tmp_path, teacher_dir, text, name="tr", evaluate={"eval_blocks": 4},
                         distill={"steps": 6, "batch_size": 2, "lr": 2e-3, "warmup_steps": 1, "eval_every": 3,
                                  "checkpoint_every": 3, **distill})
    path = tmp_path / "tr.yaml"
    path.write_text(yaml.safe_dump(recipe))
    proc = subprocess.run([sys.executable, "-m", "distillery.cli", "prepare", str(path)], capture_output=True,
                          text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return path


@pytest.mark.parametrize("fsdp,on_policy", [(False, None), (True, None), (True, "transformers"), (True, "server")],
                         ids=["ddp", "fsdp2", "fsdp2-on-policy", "fsdp2-on-policy-server"])
def test_torchrun_distill_stage_from_the_cli(tiny_teacher_dir, lee_file, tmp_path, fsdp, on_policy):
    """`torchrun -m distillery.cli distill`: the distill stage under DDP or FSDP2 sharding (gloo, CPU)
    trains, checkpoints a full state, and saves a plain student; the manifest marks it complete. With
    on-policy batches a sharded student samples in step on both ranks (synced_gpus), or is gathered
    and synced to a sampling server by rank 0 while the other rank waits."""
    from transformers import AutoModelForCausalLM

    from tests.model_server import serve

    extra = {}
    if on_policy:
        extra["on_policy"] = {"lam": 1.0, "prompt_tokens": 8, "max_new_tokens": 8, "generator": on_policy}
    with contextlib.ExitStack() as stack:
        if on_policy == "server":
            sync = tmp_path / "policy"
            shutil.copytree(tiny_teacher_dir, sync)  # any model of the student's vocabulary to start from
            srv = stack.enter_context(serve(model_dir=sync))
            extra["on_policy"].update(sync_dir=str(sync), server={"base_url": srv.url, "model": "tiny"})
        recipe = _prepare_tiny(tmp_path, tiny_teacher_dir, lee_file, fsdp=fsdp, **extra)
        torchrun = Path(sys.executable).parent / "torchrun"
        proc = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node=2", "-m", "distillery.cli",
                               "distill", str(recipe)], capture_output=True, text=True, timeout=300, cwd=ROOT)
        assert proc.returncode == 0, proc.stderr[-3000:]
        if on_policy == "server":
            assert srv.reloads == 6  # every step is on-policy and re-synced (sync_every 1)
    run = tmp_path / "runs" / "tr"
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["stages"]["distill"]["status"] == "complete"
    log = [json.loads(x) for x in (run / "train.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 7)) and "eval_kl_to_teacher" in log[-1]
    student = AutoModelForCausalLM.from_pretrained(run / "student")
    init = AutoModelForCausalLM.from_pretrained(run / "student_init")
    state = torch.load(sorted((run / "checkpoints").glob("step-*.pt"))[-1], weights_only=False)
    for k, v in student.state_dict().items():
        torch.testing.assert_close(state["model"][k], v)  # the checkpoint holds the full, unsharded model
    assert any(not torch.equal(v, init.state_dict()[k]) for k, v in student.state_dict().items())


def test_an_int8_teacher_cannot_be_sharded():
    from distillery.train.distributed import shard_live_teacher

    teacher = OnlineTeacher(tiny_llama(layers=2), model_id="t", tokenizer_fingerprint="x", dtype="int8")
    with pytest.raises(ValueError, match="distill.shard_teacher"):
        shard_live_teacher(teacher)
