"""The run folder's manifest: what each stage read, what it wrote, and whether that is still true.

A stage's *input hash* covers the recipe sections it reads, the content of every local file or folder
those sections name (teacher folders, data files, the builtin teacher's GGUF), and the recorded outputs
of the stages it reads from. Each output file is recorded with its size, modification time and
SHA-256, so a stage is skipped only when its inputs are unchanged *and* its outputs are still exactly
what it wrote. File hashes are cached by (path, size, mtime), so checking a finished run is cheap.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

from distillery.io import atomic_write_json, read_json, sha256_file, sha256_json

FORMAT_VERSION = 2
# Recipe keys whose paths a run writes rather than reads: never fingerprinted as inputs.
_WRITTEN_PATHS = {"sync_dir", "cache_dir", "run_dir"}


class ManifestError(ValueError):
    """A manifest that cannot be trusted; the message names the file and what to do."""


# ---------------------------------------------------------------- file fingerprints


class HashCache:
    """SHA-256 of files, remembered by (path, size, mtime_ns) in a JSON file, so an unchanged file is
    hashed once. A file rewritten in place gets a new mtime, hence a new hash."""

    def __init__(self, path: Path | None):
        self.path = path
        self.entries: dict[str, list] = {}
        self.dirty = False
        if path is not None and path.is_file():
            try:
                loaded = read_json(path)
                self.entries = loaded if isinstance(loaded, dict) else {}
            except ValueError:
                self.entries = {}  # a damaged cache only costs re-hashing

    def sha256(self, path: Path) -> tuple[int, int, str]:
        st = path.stat()
        key = str(path.resolve())
        cached = self.entries.get(key)
        if isinstance(cached, list) and len(cached) == 3 and cached[:2] == [st.st_size, st.st_mtime_ns]:
            return st.st_size, st.st_mtime_ns, cached[2]
        digest = sha256_file(path)
        self.entries[key] = [st.st_size, st.st_mtime_ns, digest]
        self.dirty = True
        return st.st_size, st.st_mtime_ns, digest

    def save(self) -> None:
        if self.dirty and self.path is not None:
            try:
                atomic_write_json(self.path, self.entries)
            except OSError:
                pass  # a read-only cache folder: the next run hashes again
            self.dirty = False


def files_under(path: Path) -> list[Path]:
    """The file itself, or every file in a folder (sorted; temporary ``.*.tmp`` leftovers excluded)."""
    if path.is_file():
        return [path]
    return sorted(p for p in path.rglob("*") if p.is_file() and not (p.name.startswith(".") and p.name.endswith(".tmp")))


def content_fingerprint(path: Path, cache: HashCache) -> str:
    """One hash of a file's or a folder's content (relative names and bytes)."""
    return sha256_json([[str(p.relative_to(path)) if p != path else p.name, cache.sha256(p)[2]]
                        for p in files_under(path)])


def input_fingerprints(sections: dict[str, Any], cache: HashCache) -> dict[str, str]:
    """Content fingerprints of every existing local path named anywhere in ``sections`` (by its
    dotted field), and of the builtin teacher's GGUF for ``builtin:`` models."""
    out: dict[str, str] = {}

    def walk(node, where: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                if k not in _WRITTEN_PATHS:
                    walk(v, f"{where}.{k}" if where else str(k))
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, f"{where}[{i}]")
        elif isinstance(node, str) and node:
            if node.startswith("builtin:"):
                from distillery.models.load import builtin_gguf

                try:
                    out[where] = content_fingerprint(builtin_gguf(node.removeprefix("builtin:")), cache)
                except Exception:  # noqa: BLE001 - not installed: loading the teacher says so, clearly
                    pass
            elif ("/" in node or os.sep in node or node.endswith((".gguf", ".txt", ".jsonl", ".json"))) \
                    and len(node) < 4096:
                p = Path(node).expanduser()
                try:
                    if p.exists():
                        out[where] = content_fingerprint(p, cache)
                except OSError:
                    pass

    walk(sections, "")
    return out


# ---------------------------------------------------------------- outputs


def record_outputs(run: Path, outputs: list[str], cache: HashCache) -> dict[str, list]:
    """``{relative file: [size, mtime_ns, sha256]}`` for every file of every output (files or folders)."""
    files: dict[str, list] = {}
    for out in outputs:
        target = run / out
        if not target.exists():
            raise ManifestError(f"{target}: the stage reported this output but did not write it")
        for p in files_under(target):
            files[str(p.relative_to(run))] = list(cache.sha256(p))
    return files


def outputs_problem(run: Path, entry: dict, cache: HashCache) -> str | None:
    """Why a completed stage's outputs are no longer what it wrote (None when they are)."""
    files = entry.get("files")
    if not isinstance(files, dict) or not files:
        return "its outputs were not recorded (a manifest from an older version)"
    for rel, (size, _, digest) in files.items():
        p = run / rel
        if not p.is_file():
            return f"{rel} is missing"
        if p.stat().st_size != size or cache.sha256(p)[2] != digest:
            return f"{rel} changed since the stage wrote it"
    return None


def outputs_digest(entry: dict) -> str | None:
    """One hash of a stage's recorded outputs: what a downstream stage actually read."""
    files = entry.get("files")
    return sha256_json({k: v[2] for k, v in sorted(files.items())}) if isinstance(files, dict) else None


# ---------------------------------------------------------------- the manifest file


def new_manifest() -> dict:
    return {"format_version": FORMAT_VERSION, "stages": {}}


def load_manifest(run: Path) -> dict:
    """The run folder's manifest, or a new one; a manifest of the wrong shape is refused by name."""
    path = run / "manifest.json"
    if not path.is_file():
        return new_manifest()
    try:
        data = read_json(path)
    except (ValueError, OSError) as e:
        raise ManifestError(f"{e}; move it away (the stages then run again) or fix it") from None
    stages = data.get("stages") if isinstance(data, dict) else None
    if not isinstance(stages, dict) or not all(isinstance(v, dict) for v in stages.values()):
        raise ManifestError(f"{path}: not a Distillery manifest (expected {{\"stages\": {{name: {{...}}}}}}); "
                            "move it away (the stages then run again) or fix it")
    data.setdefault("format_version", 1)
    return data


def versions() -> dict:
    import torch
    import transformers

    import distillery

    return {"distillery": distillery.__version__, "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version()}
