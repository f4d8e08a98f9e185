"""The CUDA paths on a GPU: bf16 autocast distillation vs fp32, a bf16 teacher beside an fp32
student, the KD loss on bf16 logits against a float64 reference, and on-policy (GKD) steps whose
batches the student samples on the GPU, against off-policy steps of the same shape.

Models have the real SmolLM2-135M architecture (30 layers, width 576, vocab 49152) with random
weights, so the script needs no download; the student keeps 15 of the teacher's layers.

    python benchmarks/cuda_paths.py [--quick]
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import torch

from _common import gpu_args, print_table, write_results

from distillery.losses.divergences import token_kd_loss
from distillery.models.student import cut_layers, evenly_spaced
from distillery.recipe import DistillConfig
from distillery.signals.base import Signal, TeacherIdentity
from distillery.signals.online import OnlineTeacher
from distillery.train.loop import train
from distillery.train.onpolicy import OnPolicyBatches


def smollm2_like(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                      num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
                      tie_word_embeddings=True, rms_norm_eps=1e-5, rope_theta=100000.0)
    return LlamaForCausalLM(cfg)


def timed_run(teacher, blocks, precision: str, steps: int, teacher_dtype, on_policy: dict | None = None) -> dict:
    student = cut_layers(teacher, evenly_spaced(30, 15)).float().cuda()
    signal = OnlineTeacher(teacher, model_id="random-smollm2", tokenizer_fingerprint="-", dtype=teacher_dtype)
    cfg = DistillConfig(steps=steps, batch_size=8, lr=1e-4, warmup_steps=0, precision=precision,
                        checkpoint_every=10_000, on_policy=on_policy)
    # No EOS: every sample runs to max_new_tokens, so on- and off-policy batches have the same shape.
    transform = OnPolicyBatches(student, cfg.on_policy, seed=0, eos_token_id=None) if on_policy else None
    torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory() as out:
        records = train(student, signal, blocks, cfg, out_dir=Path(out), progress=False, log=lambda m: None,
                        batch_transform=transform)
    times = [r["tokens"] / r["tokens_per_s"] for r in records[2:]]  # skip warm-up steps
    return {"step_s": statistics.median(times), "peak_gb": torch.cuda.max_memory_allocated() / 2**30,
            "first_loss": records[0]["loss"], "last_loss": records[-1]["loss"],
            "finite": all(torch.isfinite(torch.tensor(r["loss"])) for r in records)}


def loss_bf16_error() -> float:
    """Relative error of the KD loss on bf16 logits (fp32 math inside) vs float64 on the same values."""
    torch.manual_seed(1)
    s = (torch.randn(4, 256, 49152, device="cuda") * 3).bfloat16()
    t = (torch.randn(4, 256, 49152, device="cuda") * 3).bfloat16()
    mask = torch.ones(4, 256, dtype=torch.bool, device="cuda")
    got = token_kd_loss(s, Signal(TeacherIdentity("t", "-"), logits=t), mask).item()
    ls, lt = torch.log_softmax(s.double(), -1), torch.log_softmax(t.double(), -1)
    ref = (lt.exp() * (lt - ls)).sum(-1).mean().item()
    return abs(got - ref) / ref


def main() -> None:
    args = gpu_args("cuda_paths", __doc__)
    steps = 6 if args.quick else 20
    teacher = smollm2_like().cuda().eval()
    blocks = torch.randint(0, 49152, (steps * 8, 512))
    runs = {}
    for name, precision, tdtype in (("fp32", "fp32", None), ("bf16", "bf16", "bfloat16")):
        t = teacher if tdtype is None else smollm2_like().cuda().eval()
        runs[name] = timed_run(t, blocks, precision, steps, tdtype)
    # On-policy: 64 prompt tokens + 128 sampled by the student, vs off-policy blocks of 192 tokens.
    short = blocks[:, :192].contiguous()
    op = {"lam": 1.0, "prompt_tokens": 64, "max_new_tokens": 128, "kv_cache": "dynamic"}
    bf16_teacher = smollm2_like().cuda().eval()
    runs["bf16_offpolicy_192"] = timed_run(bf16_teacher, short, "bf16", steps, "bfloat16")
    runs["bf16_onpolicy_64+128"] = timed_run(bf16_teacher, short, "bf16", steps, "bfloat16", on_policy=op)
    runs["bf16_onpolicy_static_cache"] = timed_run(bf16_teacher, short, "bf16", steps, "bfloat16",
                                                   on_policy={**op, "kv_cache": "static"})
    metrics = {f"{k}_{m}": float(v) for k, r in runs.items() for m, v in r.items()}
    metrics["onpolicy_over_offpolicy_step_time"] = runs["bf16_onpolicy_64+128"]["step_s"] / runs["bf16_offpolicy_192"]["step_s"]
    metrics["static_cache_over_dynamic_onpolicy_step_time"] = (runs["bf16_onpolicy_static_cache"]["step_s"]
                                                               / runs["bf16_onpolicy_64+128"]["step_s"])
    metrics["bf16_over_fp32_step_time"] = runs["bf16"]["step_s"] / runs["fp32"]["step_s"]
    metrics["bf16_over_fp32_peak_memory"] = runs["bf16"]["peak_gb"] / runs["fp32"]["peak_gb"]
    metrics["first_loss_rel_diff"] = abs(runs["bf16"]["first_loss"] - runs["fp32"]["first_loss"]) / runs["fp32"]["first_loss"]
    metrics["kd_loss_bf16_rel_error"] = loss_bf16_error()
    print_table([(k, f"{r['step_s'] * 1000:.0f} ms", f"{r['peak_gb']:.2f} GB", f"{r['first_loss']:.4f}",
                  f"{r['last_loss']:.4f}") for k, r in runs.items()],
                ("run", "step (8 examples)", "peak memory", "first loss", "last loss"))
    print(f"bf16/fp32 step time {metrics['bf16_over_fp32_step_time']:.2f}, peak memory "
          f"{metrics['bf16_over_fp32_peak_memory']:.2f}; KD loss on bf16 logits vs float64: "
          f"{metrics['kd_loss_bf16_rel_error']:.2e} relative; on-policy (student samples 128 tokens) / "
          f"off-policy step time {metrics['onpolicy_over_offpolicy_step_time']:.2f}, with a static KV cache "
          f"{metrics['static_cache_over_dynamic_onpolicy_step_time']:.2f}x the dynamic one")
    write_results("cuda_paths", metrics, {"steps": steps, "batch": 8, "seq_len": 512, "device": torch.cuda.get_device_name(0)})


if __name__ == "__main__":
    main()
