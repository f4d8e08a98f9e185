"""Run a teacher over token blocks and stream its top-k output into a logit store.

Crash-safe: each shard is written under a temporary name, checksummed, renamed, and only then
listed in the manifest (itself replaced atomically). A re-run with the same teacher, settings and
blocks resumes after the last listed shard, so no example is missing or duplicated.
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import torch

from distillery.io import read_json
from distillery.signals.base import Signal, TeacherSignal
from distillery.signals.store import (FORMAT_VERSION, MANIFEST, LogitStore, StoreError, blocks_sha256,
                                      encode_shard, id_dtype, merge_error, shard_name, summarize_error,
                                      write_manifest)

# Settings a resumed capture must share with the one that started the store.
_RESUME_KEYS = ("teacher", "k", "temperature", "vocab_size", "id_dtype", "block_size", "planned_examples",
                "examples_per_shard", "blocks_sha256")


def teacher_vocab_size(teacher) -> int | None:
    size = getattr(teacher, "vocab_size", None)
    if size is None and hasattr(teacher, "model"):
        size = getattr(getattr(teacher.model, "config", None), "vocab_size", None)
    return size


def topk_signal(signal: Signal, k: int, temperature: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids, log-probs, tail) at ``temperature`` from a dense signal, or a sparse one taken with the same k/T."""
    if signal.is_dense:
        logp = torch.log_softmax(signal.logits.float() / temperature, dim=-1)
        vals, ids = logp.topk(k, dim=-1)
        return ids, vals, (1.0 - vals.exp().sum(-1)).clamp_min(0.0)
    signal.identity.check_compatible(k=k, temperature=temperature, what="capture: teacher signal")
    return signal.topk_ids, signal.topk_logprobs.float(), signal.tail_mass.float()


def _new_manifest(teacher: TeacherSignal, blocks: torch.Tensor, k: int, temperature: float,
                  vocab_size: int, examples_per_shard: int) -> dict:
    return {
        "format_version": FORMAT_VERSION,
        "teacher": {"model_id": teacher.identity.model_id,
                    "tokenizer_fingerprint": teacher.identity.tokenizer_fingerprint},
        "k": k,
        "temperature": float(temperature),
        "vocab_size": int(vocab_size),
        "id_dtype": id_dtype(vocab_size).name,
        "logprob_encoding": "uint8 codes below the row's top log-prob, float32 (top, scale, tail) per row",
        "block_size": int(blocks.shape[1]),
        "planned_examples": int(blocks.shape[0]),
        "examples_per_shard": examples_per_shard,
        "blocks_sha256": blocks_sha256(blocks),
        "shards": [],
        "examples": 0,
        "tokens": 0,
        "complete": False,
        "quantization_error_sums": {},
        "quantization_error": {},
        "capture_seconds": 0.0,
    }


def _resume(out: Path, fresh: dict) -> dict:
    if not (out / MANIFEST).is_file():
        return fresh
    old = read_json(out / MANIFEST)
    if old.get("format_version") != FORMAT_VERSION:
        raise StoreError(f"{out / MANIFEST}: format_version {old.get('format_version')!r}; "
                         f"remove the folder to capture again with version {FORMAT_VERSION}")
    for key in _RESUME_KEYS:
        if old.get(key) != fresh[key]:
            raise StoreError(f"{out}: cannot resume: {key} differs from the existing store "
                             f"({old.get(key)!r} vs {fresh[key]!r}); use a new folder or remove this one")
    return old


def _write_shard(out: Path, index: int, payload: bytes) -> tuple[str, str]:
    """Write under a temporary name, fsync, rename; returns (file name, sha256)."""
    name = shard_name(index)
    tmp = out / f".{name}.tmp"
    with open(tmp, "wb") as f:
        f.write(payload)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, out / name)
    return name, hashlib.sha256(payload).hexdigest()


@torch.no_grad()
def _run_teacher(teacher: TeacherSignal, blocks: torch.Tensor, k: int, temperature: float, batch_size: int):
    ids, lps, tails = [], [], []
    for i in range(0, blocks.shape[0], batch_size):
        x = blocks[i:i + batch_size]
        sig = teacher(x, torch.ones_like(x))
        a, b, c = topk_signal(sig, k, temperature)
        ids.append(a.cpu()), lps.append(b.cpu()), tails.append(c.cpu())
    return torch.cat(ids), torch.cat(lps), torch.cat(tails)


def capture(teacher: TeacherSignal, blocks: torch.Tensor, out_dir: str | os.PathLike, *, k: int,
            temperature: float = 1.0, shard_tokens: int = 1 << 20, batch_size: int = 8,
            vocab_size: int | None = None, progress: bool = True) -> LogitStore:
    """Capture the teacher's top-k over ``blocks [N, T]`` into ``out_dir``; resumes a partial store."""
    if blocks.dim() != 2 or blocks.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"capture: blocks must be an [N, T] integer tensor, got {tuple(blocks.shape)} {blocks.dtype}")
    if k < 1:
        raise ValueError(f"capture: k must be >= 1, got {k}")
    vocab_size = vocab_size or teacher_vocab_size(teacher)
    if vocab_size is None:
        raise ValueError("capture: vocab_size is unknown for this teacher; pass vocab_size=")
    if k > vocab_size:
        raise ValueError(f"capture: k={k} is larger than the vocabulary ({vocab_size})")
    if int(blocks.max()) >= vocab_size or int(blocks.min()) < 0:
        raise ValueError(f"capture: blocks hold token ids outside 0..{vocab_size - 1}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob(".shard-*.tmp"):  # left by a killed run; never listed in the manifest
        stale.unlink()
    per_shard = max(1, shard_tokens // blocks.shape[1])
    manifest = _resume(out, _new_manifest(teacher, blocks, k, temperature, vocab_size, per_shard))
    vdt = id_dtype(vocab_size)
    start = manifest["examples"]
    bar = _progress(progress, blocks.shape[0], start)
    for first in range(start, blocks.shape[0], per_shard):
        t0 = time.perf_counter()
        x = blocks[first:first + per_shard]
        ids, lps, tails = _run_teacher(teacher, x, k, temperature, batch_size)
        payload, err = encode_shard(x, ids, lps, tails, vdt)
        name, digest = _write_shard(out, len(manifest["shards"]), payload)
        manifest["shards"].append({"file": name, "first_example": first, "examples": int(x.shape[0]),
                                   "tokens": int(x.numel()), "bytes": len(payload), "sha256": digest})
        manifest["examples"] += int(x.shape[0])
        manifest["tokens"] += int(x.numel())
        manifest["quantization_error_sums"] = merge_error(manifest["quantization_error_sums"], err)
        manifest["quantization_error"] = summarize_error(manifest["quantization_error_sums"])
        manifest["capture_seconds"] += time.perf_counter() - t0
        manifest["complete"] = manifest["examples"] == blocks.shape[0]
        write_manifest(out, manifest)
        if bar is not None:
            bar.update(int(x.shape[0]))
    if not manifest["complete"]:  # an empty blocks tensor, or a store finished before: record it
        manifest["complete"] = manifest["examples"] == blocks.shape[0]
        write_manifest(out, manifest)
    if bar is not None:
        bar.close()
    return LogitStore(out)


def _progress(enabled: bool, total: int, done: int):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=done, unit="ex", desc="capture")
