"""Operational metrics of a model as it would be served: latency, throughput, memory, size, cold start.

What is measured, per *setting* (a concurrency level and a decoding mode):

- **time to first token** (TTFT): from the moment the request arrives (before tokenization) to the
  moment ``generate`` hands its first new token to a streamer;
- **time per output token** (TPOT): ``(t_last - t_first) / (n - 1)`` over the request's own tokens;
- **request latency**: arrival to the request's last token (its first EOS, or ``max_new_tokens``);
- **tokens/s**: every output token of the setting over the wall time of its batches.

Times come from a ``transformers`` :class:`BaseStreamer` hooked into ``generate``: it is called once
with the prompt and then once per decoding step with that step's token of every sequence, and it
stamps each call with ``time.perf_counter()``. On CUDA the streamer's ``.cpu()`` copy synchronises,
so the stamps are when tokens exist on the host, as a server would see them.

**Concurrency** ``c`` means ``c`` requests arriving at the same moment and served together as one
batched ``generate`` call (left-padded, ``c`` prompts per forward), which is what a server with
static batching does; it is not ``c`` threads taking turns on one model behind a lock. Each request
of a batch is one latency sample, so at ``c = 8`` a slow batch shows in eight samples. Every setting
runs ``ceil(requests / c)`` batches (at least ``requests`` samples) after ``warmup`` batches that are
not recorded.

By default EOS is suppressed (``min_new_tokens = max_new_tokens``) so every request produces the
same number of tokens and variants are timed on the same work: a student that stops early would
otherwise look faster than it is.

Memory: the process's peak resident set (``ru_maxrss``, a high-water mark of the whole process,
which includes whatever else it loaded) and, on CUDA, ``torch.cuda.max_memory_allocated`` over the
measured settings. The per-variant number to compare is the cold start's: a fresh Python process
loads the folder and produces one token, and its own peak RSS is what loading and first use of
that model cost. Size on disk is the sum of the folder's file sizes.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from transformers import GenerationConfig
from transformers.generation.streamers import BaseStreamer

CONCURRENCY = (1, 4, 8)
DECODING = ("greedy", "sampling")
DEFAULT_LOADER = "transformers:AutoModelForCausalLM.from_pretrained"
# any folder a run writes, in the numeric format it was saved in (plain, factored or quantized)
VARIANT_LOADER = "distillery.compress.variants:load_variant"
PERCENTILES = (50, 95, 99)
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


class SpeedError(ValueError):
    """Bad arguments to a speed measurement, or a cold start that failed; the message says which."""


def machine_info() -> dict:
    """What the numbers were measured on (also the ``machine`` of every benchmarks/results/*.json)."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import transformers

    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu": cpu, "cpu_count": os.cpu_count(), "cpus_usable": affinity, "threads": torch.get_num_threads(),
            "interop_threads": torch.get_num_interop_threads(), "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version(),
            "platform": platform.platform(),
            # a shared machine's load is part of why two runs' latencies differ
            "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def distribution(samples) -> dict:
    """Percentiles (numpy's default, linear interpolation) and the spread of a list of samples."""
    v = np.asarray(samples, dtype=np.float64)
    if v.size == 0:
        return {"n": 0}
    p = np.percentile(v, PERCENTILES)
    return {**{f"p{q}": float(x) for q, x in zip(PERCENTILES, p)}, "min": float(v.min()),
            "median": float(np.median(v)), "max": float(v.max()), "mean": float(v.mean()), "n": int(v.size)}


class _Stamps(BaseStreamer):
    """Stamps every ``put`` after the first (the prompt) with the time and keeps the step's tokens."""

    def __init__(self):
        self.prompt_seen = False
        self.times: list[float] = []
        self.tokens: list[list[int]] = []

    def put(self, value):
        now = time.perf_counter()
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        self.times.append(now)
        self.tokens.append(value.reshape(-1).tolist())

    def end(self):
        pass


def _eos_ids(model, tokenizer) -> set[int]:
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    return set(eos) if isinstance(eos, (list, tuple)) else ({eos} if eos is not None else set())


def _generation_config(model, tokenizer, decoding: str, max_new_tokens: int, ignore_eos: bool,
                       sampling: dict) -> GenerationConfig:
    if decoding not in DECODING:
        raise SpeedError(f"speed: decoding must be one of {', '.join(DECODING)}, got {decoding!r}")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos = sorted(_eos_ids(model, tokenizer)) or None
    # built from scratch so a model's own defaults (repetition penalty, its sampling settings) do not
    # change what is timed between variants
    return GenerationConfig(max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens if ignore_eos else 0,
                            do_sample=decoding == "sampling", pad_token_id=pad, eos_token_id=eos,
                            **(sampling if decoding == "sampling" else {}))


@torch.no_grad()
def time_batch(model, tokenizer, prompts: list[str], gen_config: GenerationConfig,
               eos: set[int] | None = None) -> dict:
    """One batched request of ``len(prompts)`` prompts. Returns ``{"wall_s", "requests": [{"ttft_s",
    "tpot_s" (None for a single token), "latency_s", "tokens"}]}``, one entry per prompt."""
    dev = next(model.parameters()).device
    pad = gen_config.pad_token_id
    stamps = _Stamps()
    t0 = time.perf_counter()
    enc = [tokenizer(p)["input_ids"] for p in prompts]
    width = max(len(e) for e in enc)
    ids = torch.tensor([[pad] * (width - len(e)) + e for e in enc], device=dev)
    mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in enc], device=dev)
    model.generate(input_ids=ids, attention_mask=mask, generation_config=gen_config, streamer=stamps)
    wall = time.perf_counter() - t0
    if not stamps.times:
        raise SpeedError("speed: generate produced no token (max_new_tokens must be at least 1)")
    eos = set() if eos is None or gen_config.min_new_tokens >= gen_config.max_new_tokens else eos
    out = []
    for j in range(len(prompts)):
        column = [step[j] for step in stamps.tokens]
        # a sequence is done at its first EOS (counted: it cost a decoding step); later steps only pad it
        n = next((i + 1 for i, t in enumerate(column) if t in eos), len(column))
        first, last = stamps.times[0], stamps.times[n - 1]
        out.append({"ttft_s": first - t0, "tpot_s": (last - first) / (n - 1) if n > 1 else None,
                    "latency_s": last - t0, "tokens": n})
    return {"wall_s": wall, "requests": out}


def measure_setting(model, tokenizer, prompts: list[str], *, concurrency: int, decoding: str = "greedy",
                    requests: int = 20, warmup: int = 2, max_new_tokens: int = 32, ignore_eos: bool = True,
                    sampling: dict | None = None, seed: int = 0) -> dict:
    """Latency distributions and throughput of one setting; raw samples kept under ``samples``."""
    if concurrency < 1 or requests < 1 or warmup < 0 or max_new_tokens < 1:
        raise SpeedError(f"speed: concurrency, requests and max_new_tokens must be at least 1 and warmup at "
                         f"least 0 (got {concurrency}, {requests}, {max_new_tokens}, {warmup})")
    if not prompts:
        raise SpeedError("speed: no prompts to time")
    cfg = _generation_config(model, tokenizer, decoding, max_new_tokens, ignore_eos,
                             sampling or {"temperature": 0.7, "top_p": 0.95})
    eos = _eos_ids(model, tokenizer)
    batches = math.ceil(requests / concurrency)
    torch.manual_seed(seed)  # sampling draws the same tokens in every run of this setting
    samples: dict[str, list] = {"ttft_s": [], "tpot_s": [], "latency_s": [], "tokens": []}
    walls, k = [], 0
    for b in range(warmup + batches):
        batch = [prompts[(k + i) % len(prompts)] for i in range(concurrency)]
        k += concurrency
        res = time_batch(model, tokenizer, batch, cfg, eos)
        if b < warmup:
            continue
        walls.append(res["wall_s"])
        for r in res["requests"]:
            for key in samples:
                if r[key] is not None:
                    samples[key].append(r[key])
    tokens = int(sum(samples["tokens"]))
    return {"concurrency": concurrency, "decoding": decoding, "requests": len(samples["latency_s"]),
            "batches": batches, "warmup_batches": warmup, "max_new_tokens": max_new_tokens,
            "ignore_eos": ignore_eos, "output_tokens": tokens, "wall_s": float(sum(walls)),
            "tokens_per_s": tokens / sum(walls),
            "ttft_s": distribution(samples["ttft_s"]), "tpot_s": distribution(samples["tpot_s"]),
            "latency_s": distribution(samples["latency_s"]), "batch_wall_s": distribution(walls),
            "samples": samples}


def setting_name(concurrency: int, decoding: str) -> str:
    return f"c{concurrency}_{decoding}"


def measure_speed(model, tokenizer, prompts: list[str], *, concurrency=CONCURRENCY, decoding=DECODING,
                  requests: int = 20, warmup: int = 2, max_new_tokens: int = 32, ignore_eos: bool = True,
                  sampling: dict | None = None, seed: int = 0) -> dict:
    """Every setting (concurrency x decoding) of one model held in memory, as it is (float or
    quantized). Returns ``{"machine", "config", "settings": {"c1_greedy": ..., ...}, "memory",
    "base_setting"}``."""
    dev = next(model.parameters()).device
    was_training = model.training
    model.eval()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    settings = {}
    try:
        for c in concurrency:
            for d in decoding:
                settings[setting_name(c, d)] = measure_setting(
                    model, tokenizer, prompts, concurrency=c, decoding=d, requests=requests, warmup=warmup,
                    max_new_tokens=max_new_tokens, ignore_eos=ignore_eos, sampling=sampling, seed=seed)
    finally:
        model.train(was_training)
    config = {"concurrency": list(concurrency), "decoding": list(decoding), "requests": requests, "warmup": warmup,
              "max_new_tokens": max_new_tokens, "ignore_eos": ignore_eos, "prompts": len(prompts),
              "sampling": sampling or {"temperature": 0.7, "top_p": 0.95}, "seed": seed, "device": str(dev)}
    out = {"machine": machine_info(), "config": config, "settings": settings, "memory": memory_info(dev)}
    out["base_setting"] = base_setting(out)  # named in the file, so readers need not know the rule
    return out


def memory_info(device: torch.device | str | None = None) -> dict:
    """The process's current and peak resident set, and CUDA's peak allocation on ``device``."""
    import psutil

    out = {"rss_bytes": psutil.Process().memory_info().rss, "peak_rss_bytes": _peak_rss()}
    dev = torch.device(device) if device is not None else None
    if dev is not None and dev.type == "cuda":
        out["peak_cuda_bytes"] = torch.cuda.max_memory_allocated(dev)
    return out


def _peak_rss() -> int:
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return kib if sys.platform == "darwin" else kib * 1024


def folder_size(folder: str | os.PathLike) -> dict:
    """``{"size_bytes", "weights_bytes", "files"}``: every file under ``folder`` and the weight files
    among them (safetensors, bin, pt, gguf). Symbolic links are not followed."""
    folder = Path(folder)
    if not folder.is_dir():
        raise SpeedError(f"speed: {folder} is not a folder")
    total = weights = files = 0
    for root, _, names in os.walk(folder):
        for name in names:
            path = Path(root) / name
            if path.is_symlink():
                continue
            size = path.stat().st_size
            total += size
            files += 1
            if name.endswith(WEIGHT_SUFFIXES):
                weights += size
    return {"size_bytes": total, "weights_bytes": weights, "files": files}


def _resolve(spec: str):
    """``"module:attr.attr"`` -> the object."""
    module, _, attr = spec.partition(":")
    if not module or not attr:
        raise SpeedError(f"speed: a loader is 'module:function', got {spec!r}")
    obj = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def cold_start(folder: str | os.PathLike, prompt: str = "Hello", *, loader: str = DEFAULT_LOADER,
               threads: int | None = None, repeats: int = 1, timeout: float = 600) -> dict:
    """Load ``folder`` in a fresh Python process and produce one token, ``repeats`` times.

    ``loader`` is ``"module:callable"`` taking the folder (e.g.
    ``distillery.compress.quantize:load_quantized`` for a quantized variant). Each run reports
    ``import_s`` (process start to the loader imported: the interpreter, torch, transformers),
    ``load_s`` (model and tokenizer), ``first_token_s`` (tokenize and generate one token),
    ``cold_start_s = load_s + first_token_s`` and the process's ``peak_rss_bytes``."""
    runs = []
    threads = threads or torch.get_num_threads()
    for _ in range(repeats):
        cmd = [sys.executable, "-m", "distillery.evaluate.speed", "cold-start", str(folder), "--loader", loader,
               "--threads", str(threads), "--prompt", prompt]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise SpeedError(f"speed: cold start of {folder} failed: {tail}")
        runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    out = {key: distribution([r[key] for r in runs]) for key in ("import_s", "load_s", "first_token_s", "cold_start_s")}
    return {**out, "peak_rss_bytes": max(r["peak_rss_bytes"] for r in runs), "repeats": repeats, "loader": loader,
            "threads": threads, "runs": runs}


def _cold_start_child(folder: str, loader: str, threads: int, prompt: str) -> dict:
    import psutil

    t0 = time.perf_counter()
    # the interpreter and the imports of this module (torch, transformers) happened before t0
    started = time.time() - psutil.Process().create_time()
    torch.set_num_threads(threads)
    from transformers import AutoTokenizer

    load = _resolve(loader)
    t1 = time.perf_counter()
    model = load(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model.eval()
    t2 = time.perf_counter()
    cfg = _generation_config(model, tokenizer, "greedy", 1, True, {})
    first = time_batch(model, tokenizer, [prompt], cfg)["requests"][0]["ttft_s"]
    return {"import_s": started + t1 - t0, "load_s": t2 - t1, "first_token_s": first, "cold_start_s": t2 - t1 + first,
            "peak_rss_bytes": _peak_rss()}


def measure_folder(folder: str | os.PathLike, prompts: list[str], *, loader: str = DEFAULT_LOADER,
                   with_cold_start: bool = True, cold_start_repeats: int = 1, **speed_kwargs) -> dict:
    """Everything for one saved variant: :func:`measure_speed` of the loaded model, its size on disk
    and (unless ``with_cold_start`` is False) its cold start."""
    from transformers import AutoTokenizer

    model = _resolve(loader)(str(folder)).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    out = measure_speed(model, tokenizer, prompts, **speed_kwargs)
    out["size"] = folder_size(folder)
    if with_cold_start:
        out["cold_start"] = cold_start(folder, prompts[0], loader=loader, repeats=cold_start_repeats)
    return out


def default_prompts(tokenizer, n: int = 16, seed: int = 0) -> list[str]:
    """Short requests as a served instruct model receives them: the package's checkable prompts
    (arithmetic, copy, format; data/prompts.py) through the tokenizer's chat template, if it has one."""
    from distillery.data.prompts import make_tasks, render

    return [render(p, tokenizer, chat=True) for p in make_tasks(n, ["arithmetic", "copy", "format"], seed)]


def measure_variants(models: dict, tokenizer, cfg=None, *, prompts: list[str] | None = None,
                     run: str | os.PathLike | None = None, folders: dict | None = None,
                     loader: str = VARIANT_LOADER, warmup: int = 2, seed: int = 0, log=None) -> dict:
    """:func:`measure_speed` of every variant held in memory, plus size on disk and cold start of
    those with a folder, and ``metrics`` (:func:`speed_metrics`) for the gate: ``{variant: result}``,
    what ``eval/speed.json`` holds.

    ``cfg`` is the recipe's ``evaluate.speed`` (``requests``, ``new_tokens``, ``concurrency``,
    ``sampling``: also time sampled decoding; ``cold_start``, default True); None means this module's
    defaults. A variant's folder is ``folders[variant]``, else (with ``run``) ``run/student_init``,
    ``run/student`` or ``run/compressed/<variant>`` when it exists; the teacher has one only if
    ``folders`` names it. ``prompts`` default to :func:`default_prompts`."""
    from distillery.compress.variants import variant_folder

    requests = getattr(cfg, "requests", 20)
    kwargs = {"concurrency": tuple(getattr(cfg, "concurrency", CONCURRENCY)),
              "decoding": DECODING if getattr(cfg, "sampling", True) else ("greedy",),
              "requests": requests, "warmup": warmup, "max_new_tokens": getattr(cfg, "new_tokens", 32), "seed": seed}
    prompts = prompts or default_prompts(tokenizer, n=max(8, min(requests, 32)), seed=seed)
    folders = dict(folders or {})
    out = {}
    for name, model in models.items():
        result = measure_speed(model, tokenizer, prompts, **kwargs)
        folder = folders.get(name) or (variant_folder(run, name) if run is not None else None)
        if folder is not None and Path(folder).is_dir():
            result["size"] = folder_size(folder)
            if getattr(cfg, "cold_start", True):
                result["cold_start"] = cold_start(folder, prompts[0], loader=loader)
        result["metrics"] = speed_metrics(result)
        if log is not None and base_setting(result):
            m = result["metrics"]
            log(f"speed: {name:13s} {base_setting(result)}: latency p50 {1000 * m['latency_p50']:.1f} ms, "
                f"p99 {1000 * m['latency_p99']:.1f} ms, {m['tokens_per_s']:.1f} tokens/s")
        out[name] = result
    return out


def base_setting(result: dict) -> str | None:
    """The setting a variant's unsuffixed speed metrics come from: greedy at the lowest concurrency."""
    greedy = [(s["concurrency"], name) for name, s in result.get("settings", {}).items() if s["decoding"] == "greedy"]
    return min(greedy)[1] if greedy else None


def speed_metrics(result: dict) -> dict[str, float]:
    """Flat metric names for the gate and the report from one variant's result.

    Each setting gives ``{ttft,tpot,latency}_{p50,p95,p99}_<setting>`` and ``tokens_per_s_<setting>``;
    the base setting (:func:`base_setting`: greedy at the lowest concurrency, normally 1) also gives
    them without the suffix (``latency_p99``). Plus ``size_bytes``, ``weights_bytes``,
    ``cold_start_s``, ``peak_rss_bytes`` (the cold start's) and ``peak_cuda_bytes`` where present."""
    out: dict[str, float] = {}
    base = base_setting(result)
    for name, s in result.get("settings", {}).items():
        suffixes = [f"_{name}"] + ([""] if name == base else [])
        for suffix in suffixes:
            for what in ("ttft", "tpot", "latency"):
                for q in PERCENTILES:
                    if f"p{q}" in s[f"{what}_s"]:
                        out[f"{what}_p{q}{suffix}"] = s[f"{what}_s"][f"p{q}"]
            out[f"tokens_per_s{suffix}"] = s["tokens_per_s"]
    if "size" in result:
        out.update(size_bytes=result["size"]["size_bytes"], weights_bytes=result["size"]["weights_bytes"])
    if "cold_start" in result:
        out["cold_start_s"] = result["cold_start"]["cold_start_s"]["median"]
        out["peak_rss_bytes"] = result["cold_start"]["peak_rss_bytes"]
    if "peak_cuda_bytes" in result.get("memory", {}):
        out["peak_cuda_bytes"] = result["memory"]["peak_cuda_bytes"]
    return out


def _main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m distillery.evaluate.speed")
    sub = ap.add_subparsers(dest="command", required=True)
    cs = sub.add_parser("cold-start", help="load a folder and produce one token; print JSON (one line)")
    cs.add_argument("folder")
    cs.add_argument("--loader", default=DEFAULT_LOADER)
    cs.add_argument("--threads", type=int, default=torch.get_num_threads())
    cs.add_argument("--prompt", default="Hello")
    args = ap.parse_args(argv)
    print(json.dumps(_cold_start_child(args.folder, args.loader, args.threads, args.prompt)))


if __name__ == "__main__":
    _main()
