"""One training step of a half-depth SmolLM2 student, three ways, on the same batch:

- ce:     plain next-token cross-entropy (the floor: no teacher at all)
- store:  forward KL to the teacher's top-64 read from the logit store (the teacher's cost is gone)
- online: the same loss with the live teacher run in the step

    python benchmarks/kd_step.py [--quick]

Steps are interleaved (ce, store, online, ce, store, ...) so drifting machine load hits all three
alike. store_step_over_ce_step is the median of the per-round ratios; target at most 1.15.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F

from _common import print_table, spread, write_results

from distillery.data.sources import read_austen, to_blocks
from distillery.losses.divergences import token_kd_loss
from distillery.models.load import load_model
from distillery.models.student import cut_layers
from distillery.signals.capture import capture
from distillery.signals.online import OnlineTeacher
from distillery.signals.store import StoredTeacher

TEACHER = "builtin:smollm2-135m-instruct"


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    rounds, batch, block, k = (3, 4, 128, 64) if args.quick else (7, 4, 128, 64)
    torch.manual_seed(0)
    loaded = load_model(TEACHER, device="cpu", dtype="float32")
    teacher = OnlineTeacher(loaded.model, model_id=TEACHER, tokenizer_fingerprint=loaded.fingerprint, top_k=k)
    train, _ = to_blocks(read_austen(["persuasion"]), loaded.tokenizer, block, 0.1)
    x = train[:batch]
    out = tempfile.mkdtemp(prefix="kd-step-")
    stored = StoredTeacher(capture(teacher, x, out, k=k, progress=False))
    student = cut_layers(loaded.model, list(range(0, 30, 2))).train()
    opt = torch.optim.AdamW(student.parameters(), lr=1e-5)
    mask = torch.ones_like(x, dtype=torch.bool)

    def step(loss_fn) -> None:
        logits = student(input_ids=x).logits
        loss_fn(logits).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    steps = {
        "ce": lambda: step(lambda lg: F.cross_entropy(lg[:, :-1].flatten(0, 1), x[:, 1:].flatten())),
        "store": lambda: step(lambda lg: token_kd_loss(lg, stored(x, example_ids=range(batch)), mask, tail="bucket")),
        "online": lambda: step(lambda lg: token_kd_loss(lg, teacher(x), mask, tail="bucket")),
    }
    for fn in steps.values():  # warm-up: allocator, optimizer state
        fn()
    times = {name: [] for name in steps}
    for _ in range(rounds):
        for name, fn in steps.items():
            times[name].append(timed(fn))
    shutil.rmtree(out)

    store_ratio = [s / c for s, c in zip(times["store"], times["ce"])]
    online_ratio = [o / c for o, c in zip(times["online"], times["ce"])]
    metrics = {f"{name}_step_s": statistics.median(t) for name, t in times.items()}
    metrics |= {f"{name}_step_s_{key}": v for name, t in times.items() for key, v in spread(t).items() if key != "median"}
    metrics |= {"store_step_over_ce_step": statistics.median(store_ratio),
                "store_step_over_ce_step_min": min(store_ratio), "store_step_over_ce_step_max": max(store_ratio),
                "online_step_over_ce_step": statistics.median(online_ratio)}
    rows = [(name, f"{statistics.median(t):.3f}", f"{min(t):.3f}", f"{max(t):.3f}",
             f"{statistics.median([a / c for a, c in zip(t, times['ce'])]):.3f}") for name, t in times.items()]
    print_table(rows, ("step", "median s", "min s", "max s", "x ce (median of rounds)"))
    r = metrics["store_step_over_ce_step"]
    print(f"target: store_step_over_ce_step <= 1.15 ({'ok' if r <= 1.15 else 'MISSED'}: {r:.3f})")
    write_results("kd_step", metrics, {"teacher": TEACHER, "student": "teacher layers 0,2,...,28 (15 of 30)",
                                       "batch_size": batch, "block_size": block, "k": k, "rounds": rounds,
                                       "divergence": "forward_kl", "tail": "bucket", "optimizer": "AdamW",
                                       "threads": torch.get_num_threads()})


if __name__ == "__main__":
    main()
