"""The logit store: the teacher's top-k output, captured once, stored compactly, streamed back.

Encodings (``manifest["encoding"]``, docs/logit-store.md): ``topk`` (format version 1, below; a
manifest without the key is one), and the sampled encodings of ``signals/sampled.py`` (format
version 2: ``sampled``, N tokens drawn from the teacher with their counts; ``topk_sampled``, an
exact small top-k plus N draws from the rest), read back as a sampled :class:`Signal`.

Layout of a store folder (format version 1, documented in docs/logit-store.md)::

    manifest.json          format version, teacher identity, k, temperature, dtypes, counts,
                           quantisation error, and one entry per complete shard (file, first
                           example, examples, tokens, bytes, sha256)
    shard-00000.bin ...    fixed-size shards of whole examples

A shard is a 32-byte header followed by five C-ordered arrays, each over ``[n, T]`` tokens::

    input_ids  [n, T]     id dtype   the tokens the teacher saw (checked when training reads them)
    topk_ids   [n, T, k]  id dtype   uint16 when the vocabulary fits, else int32
    codes      [n, T, k]  uint8      log-prob j = top - scale * code (code 0 = the top entry)
    row        [n, T, 3]  float32    (top log-prob, scale, tail mass)

Log-probs are quantised per row: top-k log-probs are sorted, so the top one is kept exactly and the
others are coded in 255 steps down to the k-th. At k=64 and vocabulary 49152 that is
2 + 128 + 64 + 12 = 206 bytes per token, against 196,608 for dense fp32 logits.

A version-2 shard (header magic ``DLSTORE2``, the last header field the number M of drawn slots)
holds, over ``[n, T]`` tokens, with k the exact top-k (0 for ``sampled``)::

    input_ids   [n, T]      id dtype
    topk_ids    [n, T, k]   id dtype
    codes       [n, T, k]   uint8     as in version 1
    row         [n, T, R]   float32   (top log-prob, scale, tail mass, entropy), R = 4; (entropy), R = 1 at k = 0
    nsamp       [n, T]      uint8     distinct ids drawn at each token
    offsets     [n + 1]     int64     where each example's drawn slots start in the two arrays below
    sample_ids  [M]         id dtype  the distinct drawn ids, token by token, ascending within a token
    counts      [M]         uint8     how often each was drawn (of N = manifest["draws"])

Only distinct ids are kept, so a confident teacher (most draws on one token) costs 3 bytes a token
for its draws, not 3 N.
"""

from __future__ import annotations

import bisect
import os
import struct
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from distillery.io import read_json, sha256_file
from distillery.signals.base import Signal, TeacherIdentity

FORMAT_VERSION = 1  # the topk encoding's format, written and read as before
SAMPLED_FORMAT_VERSION = 2  # the sampled encodings
FORMAT_VERSIONS = (FORMAT_VERSION, SAMPLED_FORMAT_VERSION)
MAGIC = b"DLSTORE1"
MAGIC2 = b"DLSTORE2"
HEADER = struct.Struct("<8sIIIIII")  # magic, version, n, T, k, id itemsize, reserved
HEADER_SIZE = 32
MANIFEST = "manifest.json"
CODE_LEVELS = 255


# What every message about a damaged shard tells the user to do (the CLI's `capture --repair` calls
# capture.capture(..., repair=True), which re-captures exactly the shards whose checksum fails).
REPAIR_HINT = "repair it with `distillery capture RECIPE --repair` (re-captures only the damaged shards)"

# Keys a manifest must have for the store to be read; a manifest without them is refused by name.
MANIFEST_KEYS = ("format_version", "teacher", "k", "temperature", "vocab_size", "id_dtype", "block_size",
                 "planned_examples", "examples_per_shard", "shards", "examples", "tokens")
TEACHER_KEYS = ("model_id", "tokenizer_fingerprint")
SHARD_KEYS = ("file", "first_example", "examples", "tokens", "bytes", "sha256")
SAMPLED_KEYS = ("encoding", "draws", "seed")  # also required in a version-2 manifest


class StoreError(ValueError):
    """A logit store that cannot be used; the message names the file or field."""


# ---------------------------------------------------------------- quantisation


def quantize_logprobs(logprobs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``[..., k]`` log-probs sorted high to low -> (uint8 codes, top [...], scale [...])."""
    lp = logprobs.float()
    top = lp[..., 0]
    # -inf entries (k > support) are clamped to a very small probability instead of breaking the scale
    lp = torch.maximum(lp, top.unsqueeze(-1) - 60.0)
    scale = ((top - lp[..., -1]) / CODE_LEVELS).clamp_min(1e-8)
    codes = ((top.unsqueeze(-1) - lp) / scale.unsqueeze(-1)).round().clamp(0, CODE_LEVELS).to(torch.uint8)
    return codes, top, scale


def dequantize_logprobs(codes: torch.Tensor, top: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return top.unsqueeze(-1) - scale.unsqueeze(-1) * codes.float()


# ---------------------------------------------------------------- shards


def shard_layout(n: int, t: int, k: int, vocab_dtype: np.dtype) -> dict[str, tuple[int, np.dtype, tuple]]:
    """name -> (byte offset, dtype, shape) of each array in a shard."""
    out, off = {}, HEADER_SIZE
    for name, dt, shape in (("input_ids", vocab_dtype, (n, t)), ("topk_ids", vocab_dtype, (n, t, k)),
                            ("codes", np.dtype(np.uint8), (n, t, k)), ("row", np.dtype(np.float32), (n, t, 3))):
        out[name] = (off, dt, shape)
        off += int(np.prod(shape)) * dt.itemsize
    out["_size"] = (off, None, ())
    return out


def row_columns(k: int) -> int:
    return 4 if k > 0 else 1


def sampled_layout(n: int, t: int, k: int, m: int, vocab_dtype: np.dtype) -> dict[str, tuple[int, np.dtype, tuple]]:
    """name -> (byte offset, dtype, shape) of each array in a version-2 shard with ``m`` drawn slots."""
    out, off = {}, HEADER_SIZE
    u8, f32 = np.dtype(np.uint8), np.dtype(np.float32)
    for name, dt, shape in (("input_ids", vocab_dtype, (n, t)), ("topk_ids", vocab_dtype, (n, t, k)),
                            ("codes", u8, (n, t, k)), ("row", f32, (n, t, row_columns(k))), ("nsamp", u8, (n, t)),
                            ("offsets", np.dtype(np.int64), (n + 1,)), ("sample_ids", vocab_dtype, (m,)),
                            ("counts", u8, (m,))):
        out[name] = (off, dt, shape)
        off += int(np.prod(shape)) * dt.itemsize
    out["_size"] = (off, None, ())
    return out


# ---------------------------------------------------------------- reading


@dataclass
class ShardInfo:
    file: str
    first_example: int
    examples: int
    tokens: int
    bytes: int
    sha256: str


# Shards whose bytes were hashed and matched the manifest in this process (inherited by forked
# DataLoader workers), keyed by what changes when the file does: a rewritten or replaced shard is
# hashed again, an untouched one only once however many LogitStore objects open it.
_VERIFIED: set[tuple] = set()
_VERIFIED_LOCK = threading.Lock()


def _stat_key(f: Path, info: ShardInfo) -> tuple:
    st = f.stat()
    return (str(f.resolve()), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, info.sha256)


def shard_problem(f: Path, info: ShardInfo) -> str | None:
    """Why the shard file ``f`` does not hold the bytes the manifest recorded, or None when it does.
    The sha256 is computed once per file version per process."""
    if not f.is_file():
        return "missing"
    size = f.stat().st_size
    if size != info.bytes:
        return f"{size} bytes, the manifest recorded {info.bytes} (truncated or overwritten)"
    key = _stat_key(f, info)
    with _VERIFIED_LOCK:
        if key in _VERIFIED:
            return None
    try:
        digest = sha256_file(f)
    except OSError as e:
        return f"unreadable ({e.strerror or e})"
    if digest != info.sha256:
        return "sha256 mismatch (the file changed after capture: damaged)"
    with _VERIFIED_LOCK:
        _VERIFIED.add(key)
    return None


def resolve_store_path(path: str | os.PathLike) -> Path:
    """``path`` itself, or ``path/logits`` when ``path`` is a run folder (what users pass to
    ``distillery logits verify`` after a run); a run folder without a store is refused by name."""
    path = Path(path)
    mpath = path / MANIFEST
    run_folder = (path / "recipe.yaml").is_file()
    if mpath.is_file() and not run_folder:
        try:
            run_folder = "stages" in read_json(mpath)
        except (ValueError, TypeError, OSError):
            run_folder = False
    if not run_folder:
        return path
    if (path / "logits" / MANIFEST).is_file():
        return path / "logits"
    raise StoreError(f"{path} is a run folder, not a logit store, and it has none ({path / 'logits'} is missing); "
                     "a recipe captures one with `capture:` and `distill.teacher_source: store` "
                     "(`distillery capture RECIPE`)")


def check_manifest(mpath: Path, m) -> None:
    """Refuse a manifest of the wrong shape, naming every missing key, before anything indexes it."""
    redo = f"remove {mpath.parent} and capture again (`distillery capture RECIPE`)"
    if not isinstance(m, dict):
        raise StoreError(f"{mpath}: not a logit store manifest (a JSON {type(m).__name__}, not an object); {redo}")
    if "format_version" in m and m["format_version"] not in FORMAT_VERSIONS:
        raise StoreError(f"{mpath}: format_version {m['format_version']!r} is not supported "
                         f"(this reader: {', '.join(map(str, FORMAT_VERSIONS))}); {redo}")
    missing = [key for key in MANIFEST_KEYS if key not in m]
    if m.get("format_version") == SAMPLED_FORMAT_VERSION:
        missing += [key for key in SAMPLED_KEYS if key not in m]
    if isinstance(m.get("teacher"), dict):
        missing += [f"teacher.{key}" for key in TEACHER_KEYS if key not in m["teacher"]]
    elif "teacher" in m:
        missing += [f"teacher.{key}" for key in TEACHER_KEYS]
    if isinstance(m.get("shards"), list):
        for i, sh in enumerate(m["shards"]):
            if not isinstance(sh, dict):
                missing.append(f"shards[{i}] (not an object)")
                continue
            missing += [f"shards[{i}].{key}" for key in SHARD_KEYS if key not in sh]
    elif "shards" in m:
        missing.append("shards (not a list)")
    if missing:
        raise StoreError(f"{mpath}: the manifest is damaged, missing {', '.join(missing)}; {redo}")
    for i, sh in enumerate(m["shards"]):
        name = sh["file"]
        # A manifest names files inside its own folder only: never a path that reaches outside it.
        if not isinstance(name, str) or Path(name).name != name or name.startswith("."):
            raise StoreError(f"{mpath}: shards[{i}].file {name!r} is not a file name in the store folder; {redo}")


class LogitStore:
    """Random access to a logit store by example index. Shards are memory-mapped lazily, per process,
    so a store can be handed to DataLoader workers (each opens its own maps after the fork).

    Each shard's sha256 is checked against the manifest the first time it is opened (once per
    process), so a shard damaged after capture is refused, naming the file and the repair command,
    before any of its data is read. ``path`` may be a run folder; its ``logits/`` is opened."""

    def __init__(self, path: str | os.PathLike):
        self.path = resolve_store_path(path)
        mpath = self.path / MANIFEST
        if not mpath.is_file():
            raise StoreError(f"{self.path}: not a logit store (no {MANIFEST}); pass the store folder "
                             "(runs/NAME/logits) or the run folder that holds it")
        try:
            self.manifest = read_json(mpath)
        except (ValueError, UnicodeDecodeError) as e:
            raise StoreError(f"{mpath}: the manifest is not readable JSON ({e}); remove {self.path} and capture "
                             "again (`distillery capture RECIPE`)") from None
        check_manifest(mpath, self.manifest)
        try:
            self.shards = [ShardInfo(**{key: s[key] for key in SHARD_KEYS}) for s in self.manifest["shards"]]
            self.block_size = int(self.manifest["block_size"])
            self.k = int(self.manifest["k"])
            self.vocab_dtype = np.dtype(self.manifest["id_dtype"])
            self.version = int(self.manifest["format_version"])
            self.encoding = str(self.manifest.get("encoding", "topk"))
            self.draws = int(self.manifest.get("draws", 0))
        except (TypeError, ValueError) as e:
            raise StoreError(f"{mpath}: a field has the wrong type ({e}); remove {self.path} and capture "
                             "again") from None
        self._starts = [s.first_example for s in self.shards]
        self._maps: dict[int, dict[str, np.ndarray]] = {}
        self._pid = os.getpid()

    @property
    def identity(self) -> TeacherIdentity:
        m = self.manifest
        return TeacherIdentity(m["teacher"]["model_id"], m["teacher"]["tokenizer_fingerprint"],
                               float(m["temperature"]), int(m["k"]))

    @property
    def complete(self) -> bool:
        return bool(self.manifest.get("complete"))

    def __len__(self) -> int:
        """Examples held in complete shards."""
        return sum(s.examples for s in self.shards)

    def check_compatible(self, *, tokenizer_fingerprint: str | None = None, k: int | None = None,
                         temperature: float | None = None) -> None:
        """Refuse a student tokenizer, k or temperature that differs from the store's, naming the field."""
        self.identity.check_compatible(tokenizer_fingerprint=tokenizer_fingerprint, k=k, temperature=temperature,
                                       what=f"logit store {self.path}")

    def damaged(self) -> list[tuple[int, str]]:
        """(shard index, what is wrong) for every shard whose file is missing or differs from the manifest."""
        out = []
        for i, s in enumerate(self.shards):
            problem = shard_problem(self.path / s.file, s)
            if problem is not None:
                out.append((i, problem))
        return out

    def verify(self) -> None:
        """Check every shard's size and sha256 against the manifest; raise naming every bad shard and
        the repair command."""
        bad = self.damaged()
        if bad:
            what = "; ".join(f"{self.path / self.shards[i].file}: {problem}" for i, problem in bad)
            raise StoreError(f"logit store {self.path}: {what}; {REPAIR_HINT}")

    def _shard(self, i: int) -> dict[str, np.ndarray]:
        if self._pid != os.getpid():  # forked into a worker: maps are not shared across processes
            self._maps, self._pid = {}, os.getpid()
        if i not in self._maps:
            s = self.shards[i]
            f = self.path / s.file
            problem = shard_problem(f, s)  # before any byte of it is handed to training
            if problem is not None:
                raise StoreError(f"{f}: {problem}; {REPAIR_HINT}")
            with f.open("rb") as fh:
                magic, version, n, t, k, isz, slots = HEADER.unpack(fh.read(HEADER.size))
            if self.version == SAMPLED_FORMAT_VERSION:
                layout = sampled_layout(s.examples, self.block_size, self.k, slots, self.vocab_dtype)
                want_magic = MAGIC2
            else:
                layout, want_magic = shard_layout(s.examples, self.block_size, self.k, self.vocab_dtype), MAGIC
            if f.stat().st_size != layout["_size"][0]:
                raise StoreError(f"{f}: {f.stat().st_size} bytes, expected {layout['_size'][0]} for "
                                 f"{s.examples} examples (the manifest does not match this shard); {REPAIR_HINT}")
            if magic != want_magic or version != self.version or (n, t, k) != (s.examples, self.block_size, self.k):
                raise StoreError(f"{f}: header does not match the manifest (magic {magic!r}, n/T/k {n}/{t}/{k}); "
                                 f"{REPAIR_HINT}")
            self._maps[i] = {name: np.memmap(f, dtype=dt, mode="r", offset=off, shape=shape)
                             for name, (off, dt, shape) in layout.items() if name != "_size"}
        return self._maps[i]

    def locate(self, example: int) -> tuple[int, int]:
        if not 0 <= example < len(self):
            raise IndexError(f"logit store {self.path}: example {example} out of range (0..{len(self) - 1})")
        si = bisect.bisect_right(self._starts, example) - 1
        return si, example - self.shards[si].first_example

    def example(self, i: int) -> dict[str, torch.Tensor]:
        """One example: input_ids [T], topk_ids [T, k] int64, topk_logprobs [T, k] float32, tail_mass [T];
        from a sampled store instead sample_ids and sample_weights [T, k + draws] (weight 0 on padding)
        and entropy [T] (``signals/sampled.py``)."""
        si, row = self.locate(i)
        m = self._shard(si)
        if self.version == SAMPLED_FORMAT_VERSION:
            return self._sampled_example(i, m, row)
        r = torch.from_numpy(np.array(m["row"][row]))
        codes = torch.from_numpy(np.array(m["codes"][row]))
        return {
            "example_id": torch.tensor(i),
            "input_ids": torch.from_numpy(m["input_ids"][row].astype(np.int64)),
            "topk_ids": torch.from_numpy(m["topk_ids"][row].astype(np.int64)),
            "topk_logprobs": dequantize_logprobs(codes, r[:, 0], r[:, 1]),
            "tail_mass": r[:, 2].clone(),
        }

    def _sampled_example(self, i: int, m: dict[str, np.ndarray], row: int) -> dict[str, torch.Tensor]:
        from distillery.signals.sampled import weights

        t, k, n_draws = self.block_size, self.k, self.draws
        r = torch.from_numpy(np.array(m["row"][row]))
        nsamp = torch.from_numpy(m["nsamp"][row].astype(np.int64))
        a, b = int(m["offsets"][row]), int(m["offsets"][row + 1])
        if not (0 <= a <= b <= m["sample_ids"].shape[0]) or b - a != int(nsamp.sum()) or int(nsamp.max()) > n_draws:
            raise StoreError(f"{self.path}: example {i}: drawn-slot offsets do not match the shard; {REPAIR_HINT}")
        # scatter the packed distinct ids of each token into a [T, draws] slot table
        tok = torch.repeat_interleave(torch.arange(t), nsamp)
        pos = torch.arange(b - a) - torch.repeat_interleave(nsamp.cumsum(0) - nsamp, nsamp)
        ids = torch.zeros(t, n_draws, dtype=torch.int64)
        counts = torch.zeros(t, n_draws, dtype=torch.float32)
        ids[tok, pos] = torch.from_numpy(m["sample_ids"][a:b].astype(np.int64))
        counts[tok, pos] = torch.from_numpy(m["counts"][a:b].astype(np.float32))
        if k > 0:
            top_ids = torch.from_numpy(m["topk_ids"][row].astype(np.int64))
            top_lp = dequantize_logprobs(torch.from_numpy(np.array(m["codes"][row])), r[:, 0], r[:, 1])
            tail, ent = r[:, 2].clone(), r[:, 3].clone()
        else:
            top_ids, top_lp = torch.zeros(t, 0, dtype=torch.int64), torch.zeros(t, 0)
            tail, ent = torch.ones(t), r[:, 0].clone()
        return {
            "example_id": torch.tensor(i),
            "input_ids": torch.from_numpy(m["input_ids"][row].astype(np.int64)),
            "sample_ids": torch.cat([top_ids, ids], -1),
            "sample_weights": weights(top_lp, tail, counts, n_draws),
            "entropy": ent,
        }

    def canary(self, example: dict[str, torch.Tensor]) -> torch.Tensor:
        """Per-token values a repairing teacher must reproduce: the top log-prob and tail mass (topk),
        the entropy (sampled; with a top k also the top log-prob via the first weight)."""
        if self.version == SAMPLED_FORMAT_VERSION:
            cols = [example["entropy"]]
            if self.k > 0:
                cols.append(example["sample_weights"][:, 0].clamp_min(1e-30).log())
            return torch.stack(cols, -1)
        return torch.stack([example["topk_logprobs"][:, 0], example["tail_mass"]], -1)

    def batch(self, example_ids) -> dict[str, torch.Tensor]:
        rows = [self.example(int(i)) for i in example_ids]
        return {key: torch.stack([r[key] for r in rows]) for key in rows[0]}

    def signal(self, batch: dict[str, torch.Tensor], device: torch.device | str | None = None) -> Signal:
        """A sparse (or, from a sampled store, sampled) Signal from a (collated) batch of store examples."""
        if "sample_ids" in batch:
            return Signal(self.identity, sample_ids=batch["sample_ids"].to(device),
                          sample_weights=batch["sample_weights"].to(device), entropy=batch["entropy"].to(device))
        return Signal(self.identity, topk_ids=batch["topk_ids"].to(device),
                      topk_logprobs=batch["topk_logprobs"].to(device), tail_mass=batch["tail_mass"].to(device))

    def bytes_on_disk(self) -> int:
        return sum(f.stat().st_size for f in self.path.iterdir() if f.is_file() and not f.name.startswith("."))


# ---------------------------------------------------------------- training-side views


class StoreDataset(torch.utils.data.Dataset):
    """Map-style: works with any sampler, DataLoader workers and DistributedSampler."""

    def __init__(self, store: LogitStore | str | os.PathLike):
        self.store = store if isinstance(store, LogitStore) else LogitStore(store)

    def __len__(self) -> int:
        return len(self.store)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.store.example(i)


class StoreStream(torch.utils.data.IterableDataset):
    """Streams examples in store order (or a seeded permutation of it). Rank r of w with DataLoader
    worker j of m reads every (w*m)-th example from r*m + j: disjoint parts that together cover every
    example exactly once.
    ``rank``/``world_size`` default to torch.distributed's when it is initialised."""

    def __init__(self, store: LogitStore | str | os.PathLike, *, rank: int | None = None,
                 world_size: int | None = None, shuffle: bool = False, seed: int = 0, epoch: int = 0):
        self.store = store if isinstance(store, LogitStore) else LogitStore(store)
        dist = torch.distributed.is_available() and torch.distributed.is_initialized()
        self.rank = rank if rank is not None else (torch.distributed.get_rank() if dist else 0)
        self.world_size = world_size if world_size is not None else (torch.distributed.get_world_size() if dist else 1)
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"StoreStream: rank {self.rank} not in 0..{self.world_size - 1}")
        self.shuffle, self.seed, self.epoch = shuffle, seed, epoch

    def indices(self, worker: int = 0, num_workers: int = 1) -> list[int]:
        order = torch.arange(len(self.store))
        if self.shuffle:  # same permutation on every rank and worker, so the split stays disjoint
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            order = order[torch.randperm(len(order), generator=g)]
        part = self.rank * num_workers + worker
        return order[part::self.world_size * num_workers].tolist()

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        for i in self.indices(worker, workers):
            yield self.store.example(i)


class StoredTeacher:
    """The TeacherSignal protocol over a logit store, by example index.

    ``input_ids`` must be the stored examples' tokens: a batch that does not match is refused, since
    a misaligned cache would silently teach the wrong distribution."""

    def __init__(self, store: LogitStore | str | os.PathLike, *, check_tokens: bool = True):
        self.store = store if isinstance(store, LogitStore) else LogitStore(store)
        self.identity = self.store.identity
        self.check_tokens = check_tokens

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                 example_ids=None, **batch) -> Signal:
        if example_ids is None:
            raise ValueError("StoredTeacher: the batch needs example_ids (indices into the logit store)")
        ids = example_ids.tolist() if torch.is_tensor(example_ids) else list(example_ids)
        rows = self.store.batch(ids)
        if self.check_tokens:
            got = input_ids.cpu()
            if got.shape != rows["input_ids"].shape or not torch.equal(got, rows["input_ids"]):
                bad = [i for j, i in enumerate(ids) if j >= got.shape[0] or not torch.equal(got[j], rows["input_ids"][j])]
                raise StoreError(f"logit store {self.store.path}: input_ids differ from the stored tokens "
                                 f"for example(s) {bad[:5]} (was the data re-tokenised or re-ordered?)")
        return self.store.signal(rows, input_ids.device)


# ---------------------------------------------------------------- inspect


def inspect(path: str | os.PathLike) -> str:
    """The manifest and size per token, for ``distillery logits inspect PATH``."""
    store = LogitStore(path)
    m = store.manifest
    tokens = m["tokens"]
    size = store.bytes_on_disk()
    q = m.get("quantization_error") or {}
    lines = [
        f"logit store      {store.path}",
        f"format version   {m['format_version']}",
        f"teacher          {m['teacher']['model_id']}",
        f"tokenizer        {m['teacher']['tokenizer_fingerprint'][:16]}",
        f"encoding         {store.encoding}" + (f" ({store.draws} draws per token, seed {m['seed']})"
                                                    if store.version == SAMPLED_FORMAT_VERSION else ""),
        f"k / temperature  {m['k']} / {m['temperature']}",
        f"dtypes           ids {m['id_dtype']}, log-probs {m.get('logprob_encoding', '?')}",
        f"examples         {len(store)} of {m['planned_examples']} x {m['block_size']} tokens"
        f" ({'complete' if store.complete else 'incomplete'})",
        f"tokens           {tokens}",
        f"shards           {len(store.shards)} (up to {m['examples_per_shard']} examples each)",
        f"size             {size:,} bytes, {size / max(tokens, 1):.1f} bytes/token"
        f" (dense fp32: {4 * m['vocab_size']:,})",
    ]
    if isinstance(q, dict) and all(key in q for key in ("mean_abs_logprob", "max_abs_logprob", "mean_kl")):
        lines.append(f"quantisation     mean |d log p| {q['mean_abs_logprob']:.2e}, max {q['max_abs_logprob']:.2e}, "
                     f"KL(exact||stored) {q['mean_kl']:.2e} nats/token")
    for r in m.get("repairs") or []:
        lines.append(f"repaired         {', '.join(r.get('shards', []))} at {r.get('at', '?')}")
    return "\n".join(lines)
