"""torchrun data parallel (gloo, CPU) gives the same losses and weights as one process with
twice the gradient accumulation: the loss is normalised by the global token count."""

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
from tests.conftest import tiny_llama

ROOT = Path(__file__).resolve().parents[2]

WORKER = textwrap.dedent("""
    import json, sys, torch
    sys.path.insert(0, {root!r})
    from distillery.models.student import cut_layers
    from distillery.recipe import DistillConfig
    from distillery.signals.online import OnlineTeacher
    from distillery.train.loop import init_distributed, train, world
    from tests.conftest import tiny_llama
    import torch.distributed as dist

    init_distributed()
    rank, size = world()
    teacher = tiny_llama(layers=4)
    student = cut_layers(teacher, [0, 3])
    blocks = torch.load({blocks!r})
    cfg = DistillConfig(steps=5, batch_size=2, grad_accum=1, lr=1e-3, warmup_steps=1, checkpoint_every=100)
    recs = train(student, OnlineTeacher(teacher, model_id="t", tokenizer_fingerprint="x"), blocks, cfg,
                 out_dir=__import__("pathlib").Path({out!r}), progress=False)
    if rank == 0:
        torch.save(student.state_dict(), {out!r} + "/weights.pt")
        json.dump([r["loss"] for r in recs], open({out!r} + "/losses.json", "w"))
    dist.destroy_process_group()
""")


@pytest.mark.skipif(shutil.which("torchrun") is None and not (Path(sys.executable).parent / "torchrun").exists(),
                    reason="torchrun not installed")
def test_torchrun_two_ranks_equals_one_process_with_double_accumulation(tmp_path):
    torch.manual_seed(0)
    blocks = torch.randint(0, 512, (40, 32))
    torch.save(blocks, tmp_path / "blocks.pt")
    out = tmp_path / "ddp"
    out.mkdir()
    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(root=str(ROOT), blocks=str(tmp_path / "blocks.pt"), out=str(out)))
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
    ddp_weights = torch.load(out / "weights.pt")
    for k, v in student.state_dict().items():
        torch.testing.assert_close(ddp_weights[k], v, atol=1e-5, rtol=0)
