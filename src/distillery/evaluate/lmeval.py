"""A peer evaluator: lm-evaluation-harness (PyPI ``lm-eval``) on one of our local multiple-choice
task files, through its Python API, with no hub access.

The task file is copied into a temporary folder beside a task YAML that loads it with the
``json`` dataset builder (``dataset_path: json``, ``dataset_kwargs: {data_files: ...}``) and maps
our fields one to one (``doc_to_text: prompt``, ``doc_to_choice: choices``, ``doc_to_target:
answer``, ``target_delimiter`` as ours); a ``TaskManager(include_path=...)`` registers only that
folder. The model object and tokenizer are wrapped in lm-eval's ``HFLM``, so any variant in memory
(in the dtype it ships in) is scored as it is. lm-eval's per-example ``acc``/``acc_norm`` are kept
by our example ids so they can be compared with ours example by example.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path

import yaml

from distillery.evaluate.tasks import Task, TaskError, example_rows, read_task
from distillery.io import atomic_write_json, atomic_write_text


class LMEvalUnavailable(RuntimeError):
    """lm-eval is not installed; the message says how to install it."""


def _offline() -> None:
    # set before lm_eval (and with it datasets/huggingface_hub) is imported, so nothing asks a hub
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    os.environ["HF_HUB_OFFLINE"] = "1"


def task_yaml(name: str, data_file: Path, cache_dir: Path, delimiter: str = " ") -> dict:
    """The lm-eval task definition of one of our multiple-choice files."""
    return {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data_file)}, "cache_dir": str(cache_dir)},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "prompt",
        "doc_to_choice": "choices",
        "doc_to_target": "answer",
        "target_delimiter": delimiter,
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                        {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}],
        "metadata": {"version": 1.0},
    }


def run_lmeval(model, tokenizer, task: Task | str | Path, *, batch_size: int = 8, delimiter: str = " ",
               limit: int | None = None, workdir: str | Path | None = None, seed: int = 0) -> dict:
    """Score ``model`` on a multiple-choice task with lm-eval.

    Returns ``{"task", "metrics": {"accuracy", "accuracy_norm", "n"}, "examples": [{"id", "correct",
    "correct_norm", "loglik"}], "lm_eval_version"}``."""
    if not isinstance(task, Task):
        task = read_task(task)
    if task.kind != "multiple_choice":
        raise TaskError(f"task {task.name!r}: lm-eval adapter runs multiple-choice tasks, this one is {task.kind}")
    _offline()
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        raise LMEvalUnavailable(f"lm-eval is not installed ({e}); pip install 'distillery[lmeval]'") from None

    # lm-eval task names: letters, digits and underscores
    name = "distillery_" + re.sub(r"\W", "_", task.name)
    rows = example_rows(task)[:limit] if limit else example_rows(task)
    with tempfile.TemporaryDirectory(dir=workdir, prefix="lmeval-") as tmp:
        folder = Path(tmp)
        data = folder / f"{name}.jsonl"
        atomic_write_text(data, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        atomic_write_text(folder / f"{name}.yaml",
                          yaml.safe_dump(task_yaml(name, data, folder / "hf-cache", delimiter), sort_keys=False))
        manager = TaskManager(include_path=str(folder), include_defaults=False)
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        out = lm_eval.simple_evaluate(model=lm, tasks=[name], task_manager=manager, log_samples=True,
                                      bootstrap_iters=0, random_seed=seed, numpy_random_seed=seed,
                                      torch_random_seed=seed, fewshot_random_seed=seed)
    samples = sorted(out["samples"][name], key=lambda s: s["doc_id"])
    examples = [{"id": s["doc"]["id"], "correct": float(s["acc"]), "correct_norm": float(s["acc_norm"]),
                 "loglik": [float(r[0]) for r in s["filtered_resps"]]} for s in samples]
    res = out["results"][name]
    return {"task": task.name, "lm_eval_version": getattr(lm_eval, "__version__", "unknown"),
            "metrics": {"accuracy": float(res["acc,none"]), "accuracy_norm": float(res["acc_norm,none"]),
                        "n": len(examples)},
            "examples": examples}


def write_lmeval(path: str | Path, result: dict) -> Path:
    """Store an lm-eval result beside ours (e.g. ``eval/<variant>/lmeval_<task>.json``), atomically."""
    return atomic_write_json(path, result)
