"""Run a teacher over token blocks and stream its top-k output into a logit store.

Crash-safe: each shard is written under a temporary name, checksummed, renamed, and only then
listed in the manifest (itself replaced atomically). A re-run with the same teacher, settings and
blocks resumes after the last listed shard, so no example is missing or duplicated. With
``repair=True`` it first re-captures the listed shards whose bytes no longer match the manifest.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from distillery.io import atomic_write_bytes, atomic_write_json, read_json
from distillery.signals.base import Signal, TeacherSignal, tail_mass
from distillery.signals.store import (FORMAT_VERSION, HEADER, HEADER_SIZE, MAGIC, MANIFEST, LogitStore, StoreError,
                                      check_manifest, dequantize_logprobs, quantize_logprobs)

_log = logging.getLogger(__name__)

# How far a repairing teacher's top log-prob and tail mass may be from an intact shard's: far above
# the float noise of another thread count or machine (~1e-5), far below what another checkpoint gives.
CANARY_TOLERANCE = 1e-3

# Settings a resumed capture must share with the one that started the store.
_RESUME_KEYS = ("teacher", "k", "temperature", "vocab_size", "id_dtype", "block_size", "planned_examples",
                "examples_per_shard", "blocks_sha256")


def id_dtype(vocab_size: int) -> np.dtype:
    """The smallest integer dtype that holds every token id."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.int32)


def shard_name(i: int) -> str:
    return f"shard-{i:05d}.bin"


def blocks_sha256(blocks: torch.Tensor) -> str:
    return hashlib.sha256(blocks.cpu().contiguous().numpy().astype(np.int64).tobytes()).hexdigest()


def encode_shard(input_ids: torch.Tensor, topk_ids: torch.Tensor, topk_logprobs: torch.Tensor,
                 tail_mass: torch.Tensor, vocab_dtype: np.dtype) -> tuple[bytes, dict[str, float]]:
    """Bytes of one shard (the layout ``store.shard_layout`` reads) and the quantisation error it introduced."""
    n, t, k = topk_ids.shape
    codes, top, scale = quantize_logprobs(topk_logprobs)
    err = quantization_error(topk_logprobs, dequantize_logprobs(codes, top, scale))
    row = torch.stack([top, scale, tail_mass.float()], dim=-1)
    parts = [
        HEADER.pack(MAGIC, FORMAT_VERSION, n, t, k, vocab_dtype.itemsize, 0).ljust(HEADER_SIZE, b"\0"),
        input_ids.cpu().numpy().astype(vocab_dtype).tobytes(),
        topk_ids.cpu().numpy().astype(vocab_dtype).tobytes(),
        codes.cpu().numpy().tobytes(),
        row.cpu().numpy().astype(np.float32).tobytes(),
    ]
    return b"".join(parts), err


def quantization_error(exact: torch.Tensor, stored: torch.Tensor) -> dict[str, float]:
    """Sums (not means) so shards can be added up: |d log p|, |d p|, and KL(exact top-k || stored)."""
    p = exact.float().exp()
    kl = (p * (exact.float() - stored)).sum(-1)  # both are sub-distributions over the same k ids
    return {
        "rows": float(exact[..., 0].numel()),
        "sum_abs_logprob": float((exact.float() - stored).abs().mean(-1).sum()),
        "max_abs_logprob": float((exact.float() - stored).abs().max()) if exact.numel() else 0.0,
        "sum_abs_prob": float((p - stored.exp()).abs().sum(-1).sum()),
        "sum_kl": float(kl.sum()),
    }


def merge_error(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
    out = {key: a.get(key, 0.0) + b[key] for key in b if key != "max_abs_logprob"}
    out["max_abs_logprob"] = max(a.get("max_abs_logprob", 0.0), b["max_abs_logprob"])
    return out


def summarize_error(sums: dict[str, float]) -> dict[str, float]:
    rows = max(sums.get("rows", 0.0), 1.0)
    return {"mean_abs_logprob": sums.get("sum_abs_logprob", 0.0) / rows,
            "max_abs_logprob": sums.get("max_abs_logprob", 0.0),
            "mean_abs_prob": sums.get("sum_abs_prob", 0.0) / rows,
            "mean_kl": sums.get("sum_kl", 0.0) / rows}


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
        return ids, vals, tail_mass(vals.exp())
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


def _resume(out: Path, fresh: dict, verb: str = "resume") -> dict:
    mpath = out / MANIFEST
    if not mpath.is_file():
        return fresh
    redo = "remove the folder (or use a new one) to capture again"
    try:
        old = read_json(mpath)
    except (ValueError, UnicodeDecodeError) as e:
        raise StoreError(f"{mpath}: the manifest is not readable JSON ({e}); {redo}") from None
    check_manifest(mpath, old)  # the wrong shape or format version is refused naming the keys
    for key in _RESUME_KEYS:
        if old.get(key) != fresh[key]:
            raise StoreError(f"{out}: cannot {verb}: {key} differs from the existing store "
                             f"({old.get(key)!r} vs {fresh[key]!r}); use a new folder or remove this one")
    return old


def _check_same_teacher(teacher: TeacherSignal, blocks: torch.Tensor, out: Path, manifest: dict, intact: int,
                        k: int, temperature: float) -> None:
    """Re-run the teacher on the first example of an intact shard and compare with what is stored, so a
    repair never mixes shards from two teachers that share a name (a folder whose weights changed)."""
    store = LogitStore(out)
    info = store.shards[intact]
    stored = store.example(info.first_example)
    x = blocks[info.first_example:info.first_example + 1]
    _, lps, tails = _run_teacher(teacher, x, k, temperature, 1)
    top_gap = float((lps[0, :, 0] - stored["topk_logprobs"][:, 0]).abs().max())
    tail_gap = float((tails[0] - stored["tail_mass"]).abs().max())
    if max(top_gap, tail_gap) > CANARY_TOLERANCE:
        raise StoreError(
            f"{out}: cannot repair: the teacher {manifest['teacher']['model_id']} no longer gives the outputs stored "
            f"in the intact {info.file} (top log-prob differs by up to {top_gap:.3g}, tail mass by {tail_gap:.3g}); "
            "a repaired store would mix two teachers. Restore the original teacher, or remove the store folder "
            "and capture it again")


def _repair(teacher: TeacherSignal, blocks: torch.Tensor, out: Path, manifest: dict, *, k: int, temperature: float,
            batch_size: int, vdt: np.dtype, log: Callable[[str], None]) -> dict:
    """Re-capture, in place, every listed shard whose file is missing or differs from the manifest."""
    store = LogitStore(out)
    bad = store.damaged()
    if not bad:
        log(f"capture: {out}: all {len(store.shards)} shards match their checksums; nothing to repair")
        return manifest
    bad_ids = {i for i, _ in bad}
    intact = [i for i in range(len(store.shards)) if i not in bad_ids]
    if intact:
        _check_same_teacher(teacher, blocks, out, manifest, intact[0], k, temperature)
    changed = []
    for i, problem in bad:
        info = manifest["shards"][i]
        x = blocks[info["first_example"]:info["first_example"] + info["examples"]]
        ids, lps, tails = _run_teacher(teacher, x, k, temperature, batch_size)
        payload, _ = encode_shard(x, ids, lps, tails, vdt)
        atomic_write_bytes(out / info["file"], payload)
        digest = hashlib.sha256(payload).hexdigest()
        same = digest == info["sha256"]
        log(f"capture: repaired {out / info['file']} ({problem}); "
            + ("the same bytes as captured" if same else "re-captured bytes differ slightly (float noise)"))
        if not same:
            info["sha256"], info["bytes"] = digest, len(payload)
            changed.append(info["file"])
    if changed:  # an unchanged manifest keeps everything downstream of the store up to date
        manifest.setdefault("repairs", []).append(
            {"shards": changed, "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
        atomic_write_json(out / MANIFEST, manifest)
    return manifest


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
            vocab_size: int | None = None, progress: bool = True, repair: bool = False,
            log: Callable[[str], None] | None = None) -> LogitStore:
    """Capture the teacher's top-k over ``blocks [N, T]`` into ``out_dir``; resumes a partial store.

    ``repair=True`` (``distillery capture RECIPE --repair``) first re-captures exactly the listed
    shards whose file is missing or whose sha256 differs from the manifest, after checking that the
    teacher, settings and blocks are the store's and that the teacher reproduces an intact shard;
    the manifest is rewritten atomically, and only when a shard's bytes changed."""
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
    manifest = _resume(out, _new_manifest(teacher, blocks, k, temperature, vocab_size, per_shard),
                       "repair" if repair else "resume")
    vdt = id_dtype(vocab_size)
    if repair and manifest["shards"]:
        manifest = _repair(teacher, blocks, out, manifest, k=k, temperature=temperature, batch_size=batch_size,
                           vdt=vdt, log=log or _log.info)
    start = manifest["examples"]
    bar = _progress(progress, blocks.shape[0], start)
    for first in range(start, blocks.shape[0], per_shard):
        t0 = time.perf_counter()
        x = blocks[first:first + per_shard]
        ids, lps, tails = _run_teacher(teacher, x, k, temperature, batch_size)
        payload, err = encode_shard(x, ids, lps, tails, vdt)
        name = atomic_write_bytes(out / shard_name(len(manifest["shards"])), payload).name
        digest = hashlib.sha256(payload).hexdigest()
        manifest["shards"].append({"file": name, "first_example": first, "examples": int(x.shape[0]),
                                   "tokens": int(x.numel()), "bytes": len(payload), "sha256": digest})
        manifest["examples"] += int(x.shape[0])
        manifest["tokens"] += int(x.numel())
        manifest["quantization_error_sums"] = merge_error(manifest["quantization_error_sums"], err)
        manifest["quantization_error"] = summarize_error(manifest["quantization_error_sums"])
        manifest["capture_seconds"] += time.perf_counter() - t0
        manifest["complete"] = manifest["examples"] == blocks.shape[0]
        atomic_write_json(out / MANIFEST, manifest)
        if bar is not None:
            bar.update(int(x.shape[0]))
    if not manifest["complete"]:  # an empty blocks tensor, or a store finished before: record it
        manifest["complete"] = manifest["examples"] == blocks.shape[0]
        atomic_write_json(out / MANIFEST, manifest)
    if bar is not None:
        bar.close()
    return LogitStore(out)


def _progress(enabled: bool, total: int, done: int):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=done, unit="ex", desc="capture")
