"""Run every shipped recipe on the real teacher and record its wall time and what it achieved.

    python benchmarks/recipes.py [--quick] [NAME ...]

Each recipe runs in a fresh run folder under a temporary directory (nothing reused), in its own
process, as a user would run it. --quick cuts every recipe to 4 steps (checks they run, not times).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import print_table, write_results

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("names", nargs="*", help="recipe names (file stems); default: all")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    paths = sorted((ROOT / "recipes").glob("*.yaml"))
    if args.names:
        paths = [p for p in paths if p.stem in args.names]
    metrics, rows = {}, []
    with tempfile.TemporaryDirectory() as tmp:
        for path in paths:
            sets = ["--set", f"run_dir={tmp}"]
            if args.quick:
                sets += ["--set", "distill.steps=4", "--set", "distill.warmup_steps=1", "--set", "evaluate.eval_blocks=4"]
            t0 = time.perf_counter()
            proc = subprocess.run([sys.executable, "-m", "distillery.cli", "run", str(path), *sets],
                                  capture_output=True, text=True, cwd=ROOT)
            seconds = time.perf_counter() - t0
            if proc.returncode != 0:
                print(proc.stdout[-2000:], proc.stderr[-4000:], file=sys.stderr)
                raise SystemExit(f"{path.name}: failed")
            run = next(Path(tmp).glob(f"{_name(path)}"))
            s = json.loads((run / "eval" / "summary.json").read_text())
            key = path.stem
            metrics[f"{key}_seconds"] = seconds
            metrics[f"{key}_kl_init"] = s["student_init"]["kl_to_teacher"]
            metrics[f"{key}_kl_student"] = s["student"]["kl_to_teacher"]
            metrics[f"{key}_ppl_student"] = s["student"]["perplexity"]
            # Each loss term's mean over the first and the last 5 steps: does every term go down?
            log = [json.loads(x) for x in (run / "train.jsonl").read_text().splitlines()]
            for term in ("kd", "ce", "hidden", "attention"):
                if term in log[0]:
                    metrics[f"{key}_{term}_first5"] = sum(r[term] for r in log[:5]) / len(log[:5])
                    metrics[f"{key}_{term}_last5"] = sum(r[term] for r in log[-5:]) / len(log[-5:])
            if (run / "eval" / "slices.json").is_file():
                for slice_name, table in json.loads((run / "eval" / "slices.json").read_text()).items():
                    for variant in ("student_init", "student"):
                        metrics[f"{key}_{slice_name}_kl_{variant}"] = table[variant]["kl_to_teacher"]
            weights = run / "student" / "model.safetensors"
            from safetensors import safe_open

            with safe_open(str(weights), "pt") as f:
                metrics[f"{key}_exported_extra_tensors"] = sum(
                    1 for k in f.keys() if any(w in k for w in ("projector", "fake_quant", "quantizer", "heads.")))
            rows.append((key, f"{seconds:.0f}", f"{s['student_init']['kl_to_teacher']:.3f}",
                         f"{s['student']['kl_to_teacher']:.3f}", f"{s['student']['perplexity']:.1f}",
                         f"{s['teacher']['perplexity']:.1f}"))
            print(f"{key}: {seconds:.0f}s", flush=True)
    print_table(rows, ("recipe", "seconds", "KL init", "KL distilled", "ppl distilled", "ppl teacher"))
    write_results("recipes" + ("_quick" if args.quick else ""), metrics, {"recipes": [p.stem for p in paths]})


def _name(path: Path) -> str:
    import yaml

    return yaml.safe_load(path.read_text())["name"]


if __name__ == "__main__":
    main()
