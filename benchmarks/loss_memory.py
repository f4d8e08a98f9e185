"""Peak memory and time of the KD loss's forward+backward, from the student's last hidden states
through its lm_head to the loss: naive dense vs chunked dense (fused with the lm_head) vs sparse top-64.

Memory is the process's peak RSS above what the inputs already hold (Linux: the peak is reset
through /proc/self/clear_refs before each run; tensors this large are mmapped, so freed memory goes
back to the OS and cannot hide a later peak). Variants run interleaved, in the same process.

    python benchmarks/loss_memory.py [--quick]
"""

from __future__ import annotations

import argparse
import gc
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from _common import print_table, spread, write_results

from distillery.losses.divergences import token_kd_loss_from_hidden
from distillery.signals.base import Signal, TeacherIdentity


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def naive(h, w, teacher_logits, mask, T):
    """What most KD code does: full student logits, both log-softmaxes over [N, V], one KL."""
    s = F.log_softmax((h @ w.T).float() / T, -1)
    t = F.log_softmax(teacher_logits.float() / T, -1)
    kl = (t.exp() * (t - s)).sum(-1)
    return kl[mask].sum() / mask.sum() * T * T


def measure(fn) -> tuple[float, float]:
    """(seconds, MiB of peak RSS above the start) of one forward+backward."""
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak-RSS high-water mark
    base = _status_kb("VmRSS")
    t0 = time.perf_counter()
    loss = fn()
    loss.backward()
    dt = time.perf_counter() - t0
    peak = _status_kb("VmHWM")
    del loss
    return dt, (peak - base) / 1024


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="one repeat instead of three")
    ap.add_argument("--chunk-size", type=int, default=512)
    args = ap.parse_args()
    B, L, V, H, K, T = 4, 1024, 49152, 576, 64, 1.0
    repeats = 1 if args.quick else 3
    torch.manual_seed(0)

    h = torch.randn(B, L, H, requires_grad=True)
    w = (torch.randn(V, H) * H**-0.5).requires_grad_(True)
    teacher_logits = torch.randn(B, L, V) * 3
    mask = torch.ones(B, L, dtype=torch.bool)
    mask[:, :8] = False  # a few prompt tokens that do not count
    ident = TeacherIdentity("bench", "fp")
    dense = Signal(ident, logits=teacher_logits)
    with torch.no_grad():
        vals, ids = F.log_softmax(teacher_logits / T, -1).topk(K, -1)
    sparse = Signal(TeacherIdentity("bench", "fp", T, K), topk_ids=ids, topk_logprobs=vals)

    variants = {
        "naive": lambda: naive(h, w, teacher_logits, mask, T),
        "chunked": lambda: token_kd_loss_from_hidden(h, w, dense, mask, temperature=T, chunk_size=args.chunk_size),
        "sparse_top64": lambda: token_kd_loss_from_hidden(h, w, sparse, mask, temperature=T, tail="bucket",
                                                          chunk_size=args.chunk_size),
    }
    # Same loss from naive and chunked, or the comparison means nothing.
    a, b = variants["naive"](), variants["chunked"]()
    assert abs(a.item() - b.item()) < 1e-4 * abs(a.item()), (a.item(), b.item())
    del a, b

    times = {k: [] for k in variants}
    mems = {k: [] for k in variants}
    for _ in range(repeats):
        for name, fn in variants.items():  # interleaved: drift hits every variant alike
            h.grad = w.grad = None
            dt, mib = measure(fn)
            times[name].append(dt)
            mems[name].append(mib)
    h.grad = w.grad = None

    rows = []
    for name in variants:
        t, m = spread(times[name]), spread(mems[name])
        rows.append((name, f"{t['median']:.2f} ({t['min']:.2f}-{t['max']:.2f})", f"{m['median']:.0f}"))
    print_table(rows, ("variant", "fwd+bwd s (min-max)", "peak MiB above inputs"))

    med = {k: spread(v)["median"] for k, v in times.items()}
    mem = {k: spread(v)["median"] for k, v in mems.items()}
    speed = [n / s for n, s in zip(times["naive"], times["sparse_top64"])]
    metrics = {
        "chunked_over_naive_extra_memory": mem["chunked"] / mem["naive"],
        "sparse_over_naive_extra_memory": mem["sparse_top64"] / mem["naive"],
        "sparse_speedup": med["naive"] / med["sparse_top64"],
        "sparse_speedup_min": min(speed),
        "sparse_speedup_max": max(speed),
        "chunked_speedup": med["naive"] / med["chunked"],
        **{f"{k}_seconds": v for k, v in med.items()},
        **{f"{k}_extra_mib": v for k, v in mem.items()},
    }
    print(f"\nchunked/naive extra memory: {metrics['chunked_over_naive_extra_memory']:.3f} (target <= 0.25)")
    print(f"sparse speedup: {metrics['sparse_speedup']:.2f} (spread {min(speed):.2f}-{max(speed):.2f}; target >= 1.25)")
    out = write_results("loss_memory", metrics, {"batch": B, "seq_len": L, "vocab": V, "hidden": H, "top_k": K,
                                                 "temperature": T, "chunk_size": args.chunk_size,
                                                 "repeats": repeats, "divergence": "forward_kl",
                                                 "tail": "bucket", "dtype": "float32"})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
