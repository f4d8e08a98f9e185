"""One self-contained HTML file per run (``report.html``): no script, no network, charts embedded as
base64 PNG, readable from a phone's width up (tables scroll sideways, images shrink).

Each section is drawn from the run files it reads (report/inputs.py names them, report/sections.py
draws them) and appears only when they exist, so the same page serves a quickstart run (metrics,
training curves) and a full one (gate, tasks, calibration, speed, Pareto charts, review...).
"""

from __future__ import annotations

import html
from pathlib import Path

from distillery.io import atomic_write_text
from distillery.report.inputs import FILES, LMEVAL_GLOB, ReportError, load_inputs
from distillery.report.sections import READS, SECTIONS

STYLE = """
*{box-sizing:border-box}
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;max-width:1100px;margin:0 auto;padding:0 12px 3em;
     color:#222;line-height:1.45;overflow-wrap:anywhere}
h1{font-size:1.6em;margin:.8em 0 .3em}h2{margin-top:1.6em;border-bottom:1px solid #ddd;padding-bottom:.2em}
nav{font-size:.9em;margin:.5em 0 1em}nav a{margin-right:.8em;white-space:nowrap}
.scroll{overflow-x:auto;-webkit-overflow-scrolling:touch;margin:.6em 0 1em;max-width:100%}
table{border-collapse:collapse;font-size:.9em}
.caption{font-size:.85em;color:#555;margin:-.6em 0 1em}
td,th{border:1px solid #ccc;padding:4px 8px;white-space:nowrap}th{background:#f3f3f3;text-align:left}
td.num{text-align:right;font-variant-numeric:tabular-nums}td.rule{white-space:normal;min-width:14em}
.ci{color:#666;font-size:.85em}
.figs{display:flex;flex-wrap:wrap;gap:10px;margin:.6em 0}
.figs img{flex:1 1 400px;min-width:0;max-width:min(100%,560px);height:auto;object-fit:contain;object-position:left top}
pre{background:#f7f7f7;padding:1em;overflow-x:auto;font-size:.85em}
.badge{padding:1px 6px;border-radius:3px;font-weight:600;font-size:.85em}
.badge.pass{background:#d9f2dc;color:#1d6b2a}.badge.fail{background:#f9d6d5;color:#9b1c1c}
.badge.error{background:#fde9c8;color:#8a4b00}
.verdict{font-size:1.2em;font-weight:700}.verdict.pass{color:#1d6b2a}.verdict.fail{color:#9b1c1c}
.machine{background:#f3f6fb;padding:.5em .8em;border-left:3px solid #6b8fd6}
.card{border:1px solid #ddd;padding:0 1em;border-radius:4px}.card table{display:block;overflow-x:auto}
@media (max-width:600px){body{font-size:15px}h1{font-size:1.3em}td,th{padding:3px 5px}}
"""


def _files_of(keys: tuple[str, ...]) -> str:
    return ", ".join(FILES.get(k, LMEVAL_GLOB) for k in keys)


def render(inputs: dict, title: str = "Distillery run") -> str:
    """The page for already loaded run files (``load_inputs``)."""
    bodies = []
    for anchor, heading, needs, draw in SECTIONS:
        if not all(k in inputs for k in needs):
            continue
        try:
            body = draw(inputs)
        except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
            what = f"missing field {e}" if isinstance(e, KeyError) else f"{type(e).__name__}: {e}"
            raise ReportError(f"report: {_files_of(READS.get(anchor, needs))}: unexpected content ({what})") from e
        if body:
            bodies.append((anchor, heading, body))
    nav = " ".join(f'<a href="#{a}">{html.escape(h)}</a>' for a, h, _ in bodies)
    sections = "".join(f'<section id="{a}"><h2>{html.escape(h)}</h2>{b}</section>' for a, h, b in bodies)
    return ("<!doctype html><html lang='en'><head><meta charset='utf-8'>"
            "<meta name='viewport' content='width=device-width, initial-scale=1'>"
            f"<title>{html.escape(title)}</title><style>{STYLE}</style></head><body>"
            f"<h1>{html.escape(title)}</h1><nav>{nav}</nav>{sections}</body></html>")


def write_report(run: Path, title: str = "Distillery run") -> Path:
    """Write ``run/report.html`` from the files present in the run folder."""
    run = Path(run)
    return atomic_write_text(run / "report.html", render(load_inputs(run), title))
