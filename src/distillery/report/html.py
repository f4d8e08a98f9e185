"""One self-contained HTML file per run: training curves, eval table, plots embedded as PNG."""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

from distillery.io import atomic_write_text, read_json


def _figure_png(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def plot_training(records: list[dict]) -> str | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not records:
        return None
    terms = [k for k in ("loss", "kd", "ce") if k in records[0]]
    evals = [r for r in records if "eval_kl_to_teacher" in r]
    fig, axes = plt.subplots(1, 2 if evals else 1, figsize=(11 if evals else 6, 3.8), squeeze=False)
    ax = axes[0][0]
    steps = [r["step"] for r in records]
    for k in terms:
        ax.plot(steps, [r[k] for r in records], label=k, lw=1)
    ax.set(xlabel="step", ylabel="training loss (per token)", title="Training loss terms")
    ax.legend()
    ax.grid(alpha=0.3)
    if evals:
        ax = axes[0][1]
        ax.plot([r["step"] for r in evals], [r["eval_kl_to_teacher"] for r in evals], "o-", label="KL to teacher")
        ax.set(xlabel="step", ylabel="held-out KL (nats/token)", title="Held-out KL to the teacher")
        ax2 = ax.twinx()
        ax2.plot([r["step"] for r in evals], [r["eval_perplexity"] for r in evals], "s--", color="C1",
                 label="perplexity")
        ax2.set_ylabel("held-out perplexity")
        ax.grid(alpha=0.3)
    return _figure_png(fig)


def plot_variants(summary: dict) -> str | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not summary:
        return None
    names = list(summary)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    axes[0].bar(names, [summary[n]["perplexity"] for n in names], color="C0")
    axes[0].set(yscale="log", ylabel="perplexity (log)", title="Held-out perplexity")
    axes[1].bar(names, [summary[n].get("kl_to_teacher", 0) for n in names], color="C2")
    axes[1].set(ylabel="nats/token", title="KL(teacher || model)")
    return _figure_png(fig)


def _table(summary: dict) -> str:
    cols = ["perplexity", "kl_to_teacher", "top1_agreement", "tokens"]
    head = "".join(f"<th>{c}</th>" for c in ["variant", *cols])
    rows = []
    for name, m in summary.items():
        cells = "".join(f"<td>{m[c]:,.4g}</td>" if isinstance(m.get(c), (int, float)) else "<td>-</td>" for c in cols)
        rows.append(f"<tr><td>{html.escape(name)}</td>{cells}</tr>")
    return f"<table><tr>{head}</tr>{''.join(rows)}</table>"


def write_report(run: Path, title: str = "Distillery run") -> Path:
    records = []
    log = run / "train.jsonl"
    if log.is_file():
        records = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    summary = read_json(run / "eval" / "summary.json") if (run / "eval" / "summary.json").is_file() else {}
    manifest = read_json(run / "manifest.json") if (run / "manifest.json").is_file() else {"stages": {}}
    sections = [f"<h1>{html.escape(title)}</h1>"]
    if summary:
        sections += ["<h2>Evaluation (held-out)</h2>", _table(summary)]
        if (png := plot_variants(summary)):
            sections.append(f'<img alt="variants" src="data:image/png;base64,{png}">')
    slices = run / "eval" / "slices.json"
    if slices.is_file():
        for name, table in read_json(slices).items():
            sections += [f"<h2>Slice: {html.escape(name)}</h2>", _table(table)]
    generations = run / "eval" / "generations.json"
    if generations.is_file():
        gens = {f"generation {g['generation']}": g for g in read_json(generations)}
        sections += ["<h2>Born-again generations (against the original teacher)</h2>", _table(gens)]
    if (png := plot_training(records)):
        sections += ["<h2>Training</h2>", f'<img alt="training curves" src="data:image/png;base64,{png}">']
    stage_rows = "".join(
        f"<tr><td>{html.escape(n)}</td><td>{html.escape(e.get('status', ''))}</td><td>{e.get('seconds', '')}</td></tr>"
        for n, e in manifest["stages"].items())
    sections += ["<h2>Stages</h2>", f"<table><tr><th>stage</th><th>status</th><th>seconds</th></tr>{stage_rows}</table>"]
    recipe = (run / "recipe.yaml").read_text() if (run / "recipe.yaml").is_file() else ""
    sections += ["<h2>Recipe</h2>", f"<pre>{html.escape(recipe)}</pre>"]
    style = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222}"
             "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 10px;"
             "text-align:right}th{background:#f3f3f3}img{max-width:100%}pre{background:#f7f7f7;padding:1em}")
    doc = (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
           f"<style>{style}</style></head><body>{''.join(sections)}</body></html>")
    return atomic_write_text(run / "report.html", doc)
