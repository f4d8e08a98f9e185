"""HTML tables for the report: every table scrolls sideways on a narrow screen instead of widening
the page; values with an interval show it beside the value."""

from __future__ import annotations

import html
import math


def esc(x) -> str:
    return html.escape(str(x))


def fmt(x, unit: str = "") -> str:
    """A number for a table cell: ints with separators, floats to 4 significant digits, bytes in MB."""
    if x is None or isinstance(x, bool):
        return "-" if x is None else str(x)
    if not isinstance(x, (int, float)):
        return esc(x)
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if unit == "bytes":
        return f"{x / 2**20:,.1f} MB"
    if unit == "ms":
        return f"{1000 * x:,.3g}" if abs(1000 * x) < 1000 else f"{1000 * x:,.0f}"
    if isinstance(x, int):
        return f"{x:,}"
    return f"{x:,.4g}" if abs(x) < 1e6 else f"{x:,.0f}"


def value_cell(v, unit: str = "") -> str:
    """A metric value, a number or ``{"value", "interval": [lo, hi]}``, as a table cell."""
    interval = None
    if isinstance(v, dict):
        interval = v.get("interval")
        v = v.get("value")
    text = fmt(v, unit)
    if interval and len(interval) == 2 and all(isinstance(b, (int, float)) for b in interval):
        text += f' <span class="ci">[{fmt(interval[0], unit)}, {fmt(interval[1], unit)}]</span>'
    return f'<td class="num">{text}</td>'


def table(header: list[str], rows: list[list[str]], caption: str | None = None) -> str:
    """Rows are lists of ready ``<td>`` cells (see :func:`cell`, :func:`value_cell`)."""
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join(f"<tr>{''.join(r)}</tr>" for r in rows)
    # the caption sits outside the scrolling box so it wraps to the screen instead of scrolling away
    cap = f'<p class="caption">{esc(caption)}</p>' if caption else ""
    return f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>{cap}'


def num(x, unit: str = "") -> str:
    """A right-aligned number cell (see :func:`fmt`)."""
    return f'<td class="num">{fmt(x, unit)}</td>'


def cell(text, cls: str = "") -> str:
    return f'<td class="{cls}">{esc(text)}</td>' if cls else f"<td>{esc(text)}</td>"


def metric_columns(by_row: dict[str, dict], preferred: tuple[str, ...] = ()) -> list[str]:
    """The metric names present in any row, ``preferred`` first, the rest in the order seen."""
    seen: dict[str, None] = {m: None for m in preferred if any(m in r for r in by_row.values())}
    for r in by_row.values():
        for m, v in r.items():
            if isinstance(v, (int, float, dict)) and not isinstance(v, bool) and m not in seen:
                if not isinstance(v, dict) or "value" in v:
                    seen[m] = None
    return list(seen)


def metrics_table(by_row: dict[str, dict], first: str = "variant", preferred: tuple[str, ...] = (),
                  caption: str | None = None) -> str:
    """One row per key of ``by_row`` (a variant, a slice...), one column per metric."""
    cols = metric_columns(by_row, preferred)
    rows = [[cell(name), *(value_cell(m.get(c)) if c in m else '<td class="num">-</td>' for c in cols)]
            for name, m in by_row.items()]
    return table([first, *cols], rows, caption)


def verdict(v: str) -> str:
    return f'<td><span class="badge {esc(v)}">{esc(v.upper())}</span></td>'
