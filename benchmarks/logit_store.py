"""The logit store on the real SmolLM2-135M teacher at k=64: size per token, capture speed, and the
error its 8-bit log-probs put into a KD loss.

    python benchmarks/logit_store.py [--quick]

kd_loss_rel_error: |L(store) / L(exact top-k) - 1| for forward KL (tail as a bucket) of a
half-depth student cut from the teacher, where "exact top-k" is the same teacher's top-k taken
live in fp32. Target: bytes_per_token <= 256 and kd_loss_rel_error < 1%.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time

import torch

from _common import print_table, spread, write_results

from distillery.data.sources import read_austen, to_blocks
from distillery.losses.divergences import token_kd_loss
from distillery.models.load import load_model
from distillery.models.student import cut_layers
from distillery.signals.capture import capture
from distillery.signals.online import OnlineTeacher
from distillery.signals.store import StoredTeacher

TEACHER = "builtin:smollm2-135m-instruct"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    n_blocks, repeats, k, block, batch = (16, 1, 64, 128, 4) if args.quick else (64, 3, 64, 128, 4)
    torch.manual_seed(0)
    loaded = load_model(TEACHER, device="cpu", dtype="float32")
    teacher = OnlineTeacher(loaded.model, model_id=TEACHER, tokenizer_fingerprint=loaded.fingerprint, top_k=k)
    train, _ = to_blocks(read_austen(["persuasion"]), loaded.tokenizer, block, 0.1)
    blocks = train[:n_blocks]

    rates, sizes = [], []
    for _ in range(repeats):
        out = tempfile.mkdtemp(prefix="logit-store-")
        t0 = time.perf_counter()
        store = capture(teacher, blocks, out, k=k, temperature=1.0, shard_tokens=4096, batch_size=batch,
                        progress=False)
        rates.append(blocks.numel() / (time.perf_counter() - t0))
        store.verify()
        sizes.append(store.bytes_on_disk() / blocks.numel())
        kept = out
        if len(rates) < repeats:
            shutil.rmtree(out)

    student = cut_layers(loaded.model, list(range(0, 30, 2))).eval()
    stored = StoredTeacher(kept)
    exact_losses, store_losses = [], []
    with torch.no_grad():
        for i in range(0, n_blocks, batch):
            x = blocks[i:i + batch]
            s_logits = student(input_ids=x).logits
            mask = torch.ones_like(x, dtype=torch.bool)
            exact_losses.append(token_kd_loss(s_logits, teacher(x), mask, tail="bucket"))
            store_losses.append(token_kd_loss(s_logits, stored(x, example_ids=range(i, i + len(x))), mask,
                                              tail="bucket"))
    exact, from_store = torch.stack(exact_losses).mean().item(), torch.stack(store_losses).mean().item()
    rel = abs(from_store / exact - 1)
    q = store.manifest["quantization_error"]
    shutil.rmtree(kept)

    metrics = {
        "bytes_per_token": sizes[-1],
        "dense_fp32_bytes_per_token": 4 * loaded.model.config.vocab_size,
        "capture_tokens_per_s": spread(rates)["median"],
        "capture_tokens_per_s_min": spread(rates)["min"],
        "capture_tokens_per_s_max": spread(rates)["max"],
        "kd_loss_exact_topk": exact,
        "kd_loss_from_store": from_store,
        "kd_loss_rel_error": rel,
        "logprob_mean_abs_error": q["mean_abs_logprob"],
        "logprob_max_abs_error": q["max_abs_logprob"],
    }
    print_table([(name, f"{v:.6g}") for name, v in metrics.items()], ("metric", "value"))
    print(f"targets: bytes_per_token <= 256 ({'ok' if sizes[-1] <= 256 else 'MISSED'}), "
          f"kd_loss_rel_error < 0.01 ({'ok' if rel < 0.01 else 'MISSED'})")
    write_results("logit_store", metrics, {"teacher": TEACHER, "k": k, "temperature": 1.0, "block_size": block,
                                           "blocks": n_blocks, "batch_size": batch, "repeats": repeats,
                                           "student": "teacher layers 0,2,...,28 (15 of 30)", "corpus": "austen/persuasion",
                                           "divergence": "forward_kl", "tail": "bucket"})


if __name__ == "__main__":
    main()
