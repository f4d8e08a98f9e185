"""Atomic, verifiable file writes: every artifact is written to a temporary name and renamed.

Temporary files and folders are created owner-only (``mkstemp`` 0600, ``mkdtemp`` 0700); before a
temporary name becomes the final one its permissions are set from the process umask, so a finished
artifact is exactly as readable as a file written with a plain ``open`` (a teammate or a server
running as another user can read ``student/`` and ``report.html`` under the usual umask 022)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

_UMASK_LOCK = threading.Lock()


def _umask_from_proc() -> int | None:
    """The umask as Linux reports it (``Umask:`` in /proc/self/status, since 4.7): read without changing it."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return None


def _umask_by_setting() -> int:
    # The only portable way to read the umask is to set it and put it back; another thread creating a
    # file in between would get mode 0, so it is done once, at import, under a lock.
    with _UMASK_LOCK:
        old = os.umask(0o077)
        os.umask(old)
    return old


_IMPORT_UMASK = _umask_from_proc()
_HAVE_PROC = _IMPORT_UMASK is not None
if not _HAVE_PROC:
    _IMPORT_UMASK = _umask_by_setting()


def current_umask() -> int:
    """The process umask: read fresh from /proc where Linux has it (cheap, race-free, sees a later
    ``os.umask``), else the value read once at import."""
    if _HAVE_PROC:
        got = _umask_from_proc()
        if got is not None:
            return got
    return _IMPORT_UMASK


def file_mode() -> int:
    """The mode ``open(path, "w")`` would give a new file under the current umask."""
    return 0o666 & ~current_umask()


def folder_mode() -> int:
    """The mode ``mkdir`` would give a new folder under the current umask."""
    return 0o777 & ~current_umask()


def apply_umask(path: str | os.PathLike) -> None:
    """Give ``path`` (a file, or a folder and everything under it) the modes a plain write would have:
    used on temporary names, which are created owner-only, just before they become final."""
    path = Path(path)
    fmode, dmode = file_mode(), folder_mode()
    if not path.is_dir() or path.is_symlink():
        os.chmod(path, fmode)
        return
    os.chmod(path, dmode)
    for root, dirs, files in os.walk(path):
        for d in dirs:
            if not os.path.islink(os.path.join(root, d)):
                os.chmod(os.path.join(root, d), dmode)
        for f in files:
            if not os.path.islink(os.path.join(root, f)):
                os.chmod(os.path.join(root, f), fmode)


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary name beside ``path`` for a library that writes by file name (safetensors'
    ``save_file``); it becomes ``path`` when the block ends, or is removed if the block fails.
    Temporary names are ``.<name>.<random>.tmp``, so a folder's leftovers glob as ``.*.tmp``.
    The final file has the umask's mode, not mkstemp's 0600."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        apply_umask(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


@contextmanager
def atomic_folder(folder: str | os.PathLike, swap: Literal["folder", "files"] = "folder") -> Iterator[Path]:
    """A temporary folder beside ``folder`` to fill; when the block ends it is put in place with the
    umask's modes (files and sub-folders included), or removed if the block fails.

    ``swap="folder"`` replaces the whole folder (files an earlier version held and this one does not
    are gone). ``swap="files"`` moves the new files into ``folder`` one by one, for a folder a server
    reads from: it never goes missing and never holds half a file."""
    if swap not in ("folder", "files"):
        raise ValueError(f"atomic_folder: swap must be 'folder' or 'files', got {swap!r}")
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
    try:
        yield tmp
        apply_umask(tmp)
        if swap == "files":
            folder.mkdir(exist_ok=True)
            for f in tmp.iterdir():
                if f.is_dir() and (folder / f.name).is_dir():
                    shutil.rmtree(folder / f.name)
                os.replace(f, folder / f.name)
        else:
            if folder.exists():
                shutil.rmtree(folder)
            os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=_jsonable) + "\n")


def save_model_folder(model, folder: str | os.PathLike, tokenizer=None, *, state_dict: dict | None = None,
                      swap: Literal["folder", "files"] = "folder") -> Path:
    """``save_pretrained`` the model (and tokenizer) into a temporary folder beside ``folder``, then
    put it in place (``atomic_folder``), so a killed save never leaves half a model.

    ``swap="folder"`` replaces the whole folder (files a previous save left and this one does not
    write are gone). ``swap="files"`` renames file by file into it, for a folder a server is serving
    from: it never goes missing and never holds half a file. ``state_dict`` overrides the model's
    own weights (a state gathered from the ranks of a sharded model)."""
    if swap not in ("folder", "files"):
        raise ValueError(f"save_model_folder: swap must be 'folder' or 'files', got {swap!r}")
    with atomic_folder(folder, swap) as tmp:
        model.save_pretrained(tmp, state_dict=state_dict)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return Path(folder)


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text("utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def _jsonable(o: Any) -> Any:
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "item"):
        return o.item()
    if hasattr(o, "tolist"):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=_jsonable).encode()).hexdigest()
