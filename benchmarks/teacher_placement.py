"""Where the teacher runs, on a GPU: the same distillation steps with the teacher resident on the
student's GPU, offloaded (decoder layers in pinned CPU memory, each copied to the GPU for its own
forward: `teacher.offload: true`), or computing on the CPU (`teacher.device: cpu`).

The teacher has the real SmolLM2-135M architecture (30 layers, width 576, vocab 49152) with random
weights, in bf16; the fp32 student keeps 15 of its layers and trains under bf16 autocast. Reported
as ratios to the resident run in the same process: step time, peak GPU memory, and the teacher's
weight bytes on the GPU. The offloaded teacher's logits must equal the resident one's exactly, and
a student cut from it by block influence must equal the cut from the resident teacher.

    python benchmarks/teacher_placement.py [--quick]
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import torch

from _common import gpu_args, print_table, write_results
from cuda_paths import smollm2_like

from distillery.models.offload import offload_layers
from distillery.models.student import cut_layers, evenly_spaced
from distillery.recipe import DistillConfig
from distillery.signals.online import OnlineTeacher
from distillery.train.loop import train


DEVICE = "cuda"


def teacher_for(placement: str) -> torch.nn.Module:
    t = smollm2_like().bfloat16().eval()
    if placement == "resident":
        return t.to(DEVICE)
    if placement == "offloaded":
        return offload_layers(t, DEVICE)
    return t.float()  # on the CPU, fp32: bf16 matmuls are slow there


def gpu_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters() if p.device.type == DEVICE)


def run(placement: str, blocks: torch.Tensor, steps: int) -> dict:
    teacher = teacher_for(placement)
    student = cut_layers(smollm2_like(), evenly_spaced(30, 15)).float().to(DEVICE)
    signal = OnlineTeacher(teacher, model_id=f"random-smollm2 ({placement})", tokenizer_fingerprint="-")
    cfg = DistillConfig(steps=steps, batch_size=8, lr=1e-4, warmup_steps=0, precision="bf16", checkpoint_every=10_000)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory() as out:
        t0 = time.perf_counter()
        records = train(student, signal, blocks, cfg, out_dir=Path(out), progress=False, log=lambda m: None)
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    times = [r["tokens"] / r["tokens_per_s"] for r in records[2:]]  # skip warm-up steps
    with torch.no_grad():
        probe = teacher(input_ids=blocks[:2].to(next(teacher.parameters()).device)).logits.float().cpu()
    return {"step_s": statistics.median(times), "wall_s": wall, "peak_gb": torch.cuda.max_memory_allocated() / 2**30,
            "teacher_gpu_gb": gpu_bytes(teacher) / 2**30, "first_loss": records[0]["loss"],
            "last_loss": records[-1]["loss"], "probe": probe}


def cut_from_offloaded_matches(blocks: torch.Tensor) -> dict:
    """The student_init stage on an offloaded teacher: layers chosen by block influence and the cut
    copy must equal those from the same teacher resident on the GPU."""
    from distillery.models.student import block_influence

    picked, states = {}, {}
    for placement in ("resident", "offloaded"):
        teacher = teacher_for(placement)
        scores = block_influence(teacher, blocks[:8])  # on the CPU, as the pipeline passes them
        picked[placement] = sorted(sorted(range(30), key=lambda i: -scores[i])[:15])
        student = cut_layers(teacher, picked[placement]).float()
        states[placement] = {k: v.detach().cpu() for k, v in student.state_dict().items()}
    same = picked["resident"] == picked["offloaded"] and all(
        torch.equal(v, states["offloaded"][k]) for k, v in states["resident"].items())
    return {"offloaded_cut_equals_resident_cut": float(same)}


def main() -> None:
    args = gpu_args("teacher_placement", __doc__)
    steps = 5 if args.quick else 12
    blocks = torch.randint(0, 49152, (steps * 8, 512), generator=torch.Generator().manual_seed(0))
    runs = {p: run(p, blocks, steps) for p in ("resident", "offloaded", "cpu")}
    base = runs["resident"]
    metrics = {f"{p}_{k}": float(v) for p, r in runs.items() for k, v in r.items() if k != "probe"}
    for p in ("offloaded", "cpu"):
        metrics[f"{p}_over_resident_step_time"] = runs[p]["step_s"] / base["step_s"]
        metrics[f"{p}_over_resident_peak_memory"] = runs[p]["peak_gb"] / base["peak_gb"]
    metrics["offloaded_logits_max_abs_diff"] = float((runs["offloaded"]["probe"] - base["probe"]).abs().max())
    metrics.update(cut_from_offloaded_matches(blocks))
    metrics["offloaded_same_losses"] = float(runs["offloaded"]["first_loss"] == base["first_loss"]
                                             and runs["offloaded"]["last_loss"] == base["last_loss"])
    print_table([(p, f"{r['step_s'] * 1000:.0f} ms", f"{r['peak_gb']:.2f} GB", f"{r['teacher_gpu_gb']:.3f} GB",
                  f"{r['first_loss']:.4f}", f"{r['last_loss']:.4f}") for p, r in runs.items()],
                ("teacher", "step (8x512 tok)", "peak GPU memory", "teacher weights on GPU", "first loss", "last loss"))
    print(f"offloaded / resident: step time {metrics['offloaded_over_resident_step_time']:.2f}, peak memory "
          f"{metrics['offloaded_over_resident_peak_memory']:.2f}, logits max |diff| "
          f"{metrics['offloaded_logits_max_abs_diff']:.1e}; CPU teacher / resident: step time "
          f"{metrics['cpu_over_resident_step_time']:.2f}, peak memory {metrics['cpu_over_resident_peak_memory']:.2f}; "
          f"student cut from the offloaded teacher equals the resident cut: "
          f"{bool(metrics['offloaded_cut_equals_resident_cut'])}")
    write_results("teacher_placement", metrics, {"steps": steps, "batch": 8, "seq_len": 512, "teacher_dtype": "bf16",
                                                 "device": torch.cuda.get_device_name(0)})


if __name__ == "__main__":
    main()
