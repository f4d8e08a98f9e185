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
from distillery.signals.sampled import ENCODINGS, MAX_DRAWS, draw, example_generator
from distillery.signals.store import (FORMAT_VERSION, HEADER, HEADER_SIZE, MAGIC, MAGIC2, MANIFEST,
                                      SAMPLED_FORMAT_VERSION, SAMPLED_KEYS, LogitStore, StoreError, check_manifest,
                                      dequantize_logprobs, quantize_logprobs)

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


def encode_sampled_shard(input_ids: torch.Tensor, got: dict[str, torch.Tensor], vocab_dtype: np.dtype
                         ) -> tuple[bytes, dict[str, float]]:
    """Bytes of one version-2 shard (``store.sampled_layout``) from :func:`_run_teacher`'s sampled output."""
    n, t = input_ids.shape
    k = got["topk_ids"].shape[-1]
    counts = got["sample_counts"]
    live = counts > 0  # distinct ids are packed to the front of each token's slots
    nsamp = live.sum(-1)
    offsets = torch.zeros(n + 1, dtype=torch.int64)
    offsets[1:] = nsamp.sum(-1).cumsum(0)
    slots = int(offsets[-1])
    parts = [HEADER.pack(MAGIC2, SAMPLED_FORMAT_VERSION, n, t, k, vocab_dtype.itemsize, slots).ljust(HEADER_SIZE, b"\0"),
             input_ids.cpu().numpy().astype(vocab_dtype).tobytes()]
    err: dict[str, float] = {}
    if k > 0:
        codes, top, scale = quantize_logprobs(got["topk_logprobs"])
        err = quantization_error(got["topk_logprobs"], dequantize_logprobs(codes, top, scale))
        row = torch.stack([top, scale, got["tail"].float(), got["entropy"].float()], dim=-1)
        parts += [got["topk_ids"].numpy().astype(vocab_dtype).tobytes(), codes.numpy().tobytes()]
    else:
        row = got["entropy"].float().unsqueeze(-1)
    parts += [row.numpy().astype(np.float32).tobytes(), nsamp.numpy().astype(np.uint8).tobytes(),
              offsets.numpy().tobytes(), got["sample_ids"][live].numpy().astype(vocab_dtype).tobytes(),
              counts[live].numpy().astype(np.uint8).tobytes()]
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
    if not b:  # no top k in this encoding: nothing quantised
        return a
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
                  vocab_size: int, examples_per_shard: int, encoding: str = "topk", draws: int = 0,
                  seed: int = 0) -> dict:
    m = {
        "format_version": FORMAT_VERSION if encoding == "topk" else SAMPLED_FORMAT_VERSION,
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
    if encoding != "topk":  # a topk manifest stays exactly version 1's
        if k == 0:
            m["logprob_encoding"] = "none (no top k); float32 entropy per row"
        m.update(encoding=encoding, draws=int(draws), seed=int(seed),
                 sample_encoding="distinct drawn ids (id dtype) with uint8 counts, packed per token")
    return m


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
    # the encoding first: another encoding changes k too, and the encoding is what the user changed
    def value(m: dict, key: str):
        return m.get(key, "topk" if key == "encoding" else None)

    for key in SAMPLED_KEYS + _RESUME_KEYS:
        if value(old, key) != value(fresh, key):
            raise StoreError(f"{out}: cannot {verb}: {key} differs from the existing store "
                             f"({value(old, key)!r} vs {value(fresh, key)!r}); use a new folder or remove this one")
    return old


def _check_same_teacher(teacher: TeacherSignal, blocks: torch.Tensor, out: Path, manifest: dict, intact: int,
                        k: int, temperature: float, sampling: dict) -> None:
    """Re-run the teacher on the first example of an intact shard and compare with what is stored, so a
    repair never mixes shards from two teachers that share a name (a folder whose weights changed)."""
    store = LogitStore(out)
    info = store.shards[intact]
    stored = store.canary(store.example(info.first_example))
    x = blocks[info.first_example:info.first_example + 1]
    got = _run_teacher(teacher, x, k, temperature, 1, first=info.first_example, **sampling)
    if "entropy" in got:
        cols = [got["entropy"][0]] + ([got["topk_logprobs"][0, :, 0]] if k > 0 else [])
        what = "entropy" + (" and top log-prob" if k > 0 else "")
    else:
        cols, what = [got["topk_logprobs"][0, :, 0], got["tail"][0]], "top log-prob and tail mass"
    gap = float((torch.stack(cols, -1) - stored).abs().max())
    if gap > CANARY_TOLERANCE:
        raise StoreError(
            f"{out}: cannot repair: the teacher {manifest['teacher']['model_id']} no longer gives the outputs stored "
            f"in the intact {info.file} ({what} differ by up to {gap:.3g}); "
            "a repaired store would mix two teachers. Restore the original teacher, or remove the store folder "
            "and capture it again")


def _repair(teacher: TeacherSignal, blocks: torch.Tensor, out: Path, manifest: dict, *, k: int, temperature: float,
            batch_size: int, vdt: np.dtype, log: Callable[[str], None], sampling: dict) -> dict:
    """Re-capture, in place, every listed shard whose file is missing or differs from the manifest."""
    store = LogitStore(out)
    bad = store.damaged()
    if not bad:
        log(f"capture: {out}: all {len(store.shards)} shards match their checksums; nothing to repair")
        return manifest
    bad_ids = {i for i, _ in bad}
    intact = [i for i in range(len(store.shards)) if i not in bad_ids]
    if intact:
        _check_same_teacher(teacher, blocks, out, manifest, intact[0], k, temperature, sampling)
    changed = []
    for i, problem in bad:
        info = manifest["shards"][i]
        x = blocks[info["first_example"]:info["first_example"] + info["examples"]]
        got = _run_teacher(teacher, x, k, temperature, batch_size, first=info["first_example"], **sampling)
        payload, _ = _encode(x, got, vdt)
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


def _encode(x: torch.Tensor, got: dict[str, torch.Tensor], vdt: np.dtype) -> tuple[bytes, dict[str, float]]:
    if "entropy" in got:
        return encode_sampled_shard(x, got, vdt)
    return encode_shard(x, got["topk_ids"], got["topk_logprobs"], got["tail"], vdt)


@torch.no_grad()
def _run_teacher(teacher: TeacherSignal, blocks: torch.Tensor, k: int, temperature: float, batch_size: int, *,
                 first: int = 0, encoding: str = "topk", draws: int = 0, seed: int = 0) -> dict[str, torch.Tensor]:
    """The teacher's output over ``blocks`` (example ``first`` onwards) in ``encoding``'s terms: top-k
    ids, log-probs and tail; the sampled encodings add entropy and the ids drawn with their counts,
    from a generator per example (so a shard's draws do not depend on the batch size)."""
    parts: dict[str, list] = {}
    for i in range(0, blocks.shape[0], batch_size):
        x = blocks[i:i + batch_size]
        sig = teacher(x, torch.ones_like(x))
        if encoding == "topk":
            a, b, c = topk_signal(sig, k, temperature)
            got = {"topk_ids": a.cpu(), "topk_logprobs": b.cpu(), "tail": c.cpu()}
        else:
            if not sig.is_dense:
                raise ValueError(f"capture: encoding {encoding!r} draws tokens from the teacher's whole distribution "
                                 "and needs a dense teacher signal (this teacher gives top-k only); use encoding 'topk'")
            logp = torch.log_softmax(sig.logits.float() / temperature, dim=-1).cpu()
            rows = [draw(logp[j], k=k, draws=draws, generator=example_generator(seed, first + i + j))
                    for j in range(x.shape[0])]
            got = {key: torch.stack([r[key] for r in rows]) for key in rows[0]}
        for key, v in got.items():
            parts.setdefault(key, []).append(v)
    return {key: torch.cat(v) for key, v in parts.items()}


def capture(teacher: TeacherSignal, blocks: torch.Tensor, out_dir: str | os.PathLike, *, k: int,
            temperature: float = 1.0, shard_tokens: int = 1 << 20, batch_size: int = 8,
            vocab_size: int | None = None, progress: bool = True, repair: bool = False,
            log: Callable[[str], None] | None = None, encoding: str = "topk", draws: int = 0,
            seed: int = 0) -> LogitStore:
    """Capture the teacher's top-k over ``blocks [N, T]`` into ``out_dir``; resumes a partial store.

    ``encoding``: ``topk`` (format 1), ``sampled`` (``draws`` tokens drawn from the teacher per
    position with their counts; ``k`` must be 0) or ``topk_sampled`` (the exact top ``k`` plus
    ``draws`` tokens drawn from the rest); draws are deterministic given ``seed`` and the example.

    ``repair=True`` (``distillery capture RECIPE --repair``) first re-captures exactly the listed
    shards whose file is missing or whose sha256 differs from the manifest, after checking that the
    teacher, settings and blocks are the store's and that the teacher reproduces an intact shard;
    the manifest is rewritten atomically, and only when a shard's bytes changed."""
    if blocks.dim() != 2 or blocks.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"capture: blocks must be an [N, T] integer tensor, got {tuple(blocks.shape)} {blocks.dtype}")
    if encoding not in ENCODINGS:
        raise ValueError(f"capture: encoding must be one of {', '.join(ENCODINGS)}, got {encoding!r}")
    if encoding == "sampled" and k != 0:
        raise ValueError(f"capture: encoding 'sampled' keeps no top k; pass k=0 (got k={k}) or use 'topk_sampled'")
    if encoding != "sampled" and k < 1:
        raise ValueError(f"capture: k must be >= 1 for encoding {encoding!r}, got {k}")
    if encoding != "topk" and not 1 <= draws <= MAX_DRAWS:
        raise ValueError(f"capture: draws must be in 1..{MAX_DRAWS} for encoding {encoding!r}, got {draws}")
    sampling = {"encoding": encoding, "draws": draws if encoding != "topk" else 0, "seed": seed}
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
    manifest = _resume(out, _new_manifest(teacher, blocks, k, temperature, vocab_size, per_shard, **sampling),
                       "repair" if repair else "resume")
    vdt = id_dtype(vocab_size)
    if repair and manifest["shards"]:
        manifest = _repair(teacher, blocks, out, manifest, k=k, temperature=temperature, batch_size=batch_size,
                           vdt=vdt, log=log or _log.info, sampling=sampling)
    start = manifest["examples"]
    bar = _progress(progress, blocks.shape[0], start)
    for first in range(start, blocks.shape[0], per_shard):
        t0 = time.perf_counter()
        x = blocks[first:first + per_shard]
        got = _run_teacher(teacher, x, k, temperature, batch_size, first=first, **sampling)
        payload, err = _encode(x, got, vdt)
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
