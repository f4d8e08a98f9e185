"""The report's charts, each a list of PNGs (one per panel) as base64 text to embed in the page, empty
when there is nothing to draw. Figures are built on ``matplotlib.figure.Figure`` with the Agg canvas, never pyplot, so
nothing global (backend, open figures) changes in the caller's process."""

from __future__ import annotations

import base64
import io

from matplotlib.figure import Figure

from distillery.evaluate.robustness import number

# train.jsonl fields that are not loss terms
_NOT_LOSS = {"step", "lr", "grad_norm", "tokens", "tokens_per_s", "skipped"}
_NOT_LOSS_PREFIX = ("eval_", "peak_")
PANEL = (5.2, 3.9)  # inches; at DPI, 624 x 468 pixels before trimming
DPI = 120


def png(fig: Figure) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode()


def _figure() -> tuple[Figure, object]:
    """One panel per image, so a page lays panels side by side on a wide screen and stacks them on
    a phone, each at a readable size."""
    fig = Figure(figsize=PANEL)
    return fig, fig.subplots()


def _log_axis(ax, axis: str = "x") -> None:
    """A log scale labelled with plain numbers (1, 2, 5, 10, 20...) and no crowded minor labels."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    target = ax.xaxis if axis == "x" else ax.yaxis
    (ax.set_xscale if axis == "x" else ax.set_yscale)("log")
    target.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    target.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    target.set_minor_formatter(NullFormatter())


def loss_terms(records: list[dict]) -> list[str]:
    """Every numeric loss term logged in ``train.jsonl``, in the order first seen."""
    terms: dict[str, None] = {}
    for r in records:
        for k, v in r.items():
            if k not in _NOT_LOSS and not k.startswith(_NOT_LOSS_PREFIX) and number(v) is not None:
                terms[k] = None
    return list(terms)


def training(records: list[dict]) -> list[str]:
    """Every loss term per step and, where evaluated, held-out KL and perplexity."""
    terms = loss_terms(records)
    if not terms:
        return []
    fig, ax = _figure()
    for k in terms:
        pts = [(r["step"], number(r[k])) for r in records if number(r.get(k)) is not None]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], label=k, lw=1)
    ax.set(xlabel="step", ylabel="training loss (per token)", title="Training loss terms")
    values = [number(r.get(k)) for r in records for k in terms if number(r.get(k)) is not None]
    if min(values) > 0 and max(values) / min(values) > 100:  # terms orders of magnitude apart
        _log_axis(ax, "y")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    out = [png(fig)]
    evals = [r for r in records if number(r.get("eval_kl_to_teacher")) is not None]
    if evals:
        fig, ax = _figure()
        lines = ax.plot([r["step"] for r in evals], [r["eval_kl_to_teacher"] for r in evals], "o-",
                        label="KL to teacher")
        ax.set(xlabel="step", ylabel="held-out KL (nats/token)", title="Held-out KL to the teacher")
        if any(number(r.get("eval_perplexity")) is not None for r in evals):
            ax2 = ax.twinx()
            lines += ax2.plot([r["step"] for r in evals], [r.get("eval_perplexity") for r in evals], "s--",
                              color="C1", label="perplexity (right)")
            ax2.set_ylabel("held-out perplexity")
        ax.legend(lines, [ln.get_label() for ln in lines], fontsize=8)
        ax.grid(alpha=0.3)
        out.append(png(fig))
    return out


def variants(summary: dict) -> list[str]:
    """Held-out perplexity and KL to the teacher of every variant, as bars."""
    names = [n for n in summary if number(summary[n].get("perplexity")) is not None]
    if not names:
        return []
    out = []
    for metric, title, ylabel, color in (("perplexity", "Held-out perplexity", "perplexity (log)", "C0"),
                                         ("kl_to_teacher", "KL(teacher || model)", "nats/token", "C2")):
        fig, ax = _figure()
        ax.bar(names, [number(summary[n].get(metric)) or 0 for n in names], color=color)
        if metric == "perplexity":
            _log_axis(ax, "y")
        ax.set(ylabel=ylabel, title=title)
        ax.tick_params(axis="x", labelrotation=20)
        out.append(png(fig))
    return out


def reliability(panels: dict[str, dict[str, dict]]) -> list[str]:
    """Reliability diagrams: one image per title, one line per variant, from calibration bins
    (``lower, upper, count, confidence, accuracy``); marker area follows the bin's count."""
    out = []
    for title, curves in panels.items():
        if not curves:
            continue
        fig, ax = _figure()
        ax.plot([0, 1], [0, 1], color="0.6", lw=1, ls=":", label="perfect")
        for i, (variant, bins) in enumerate(curves.items()):
            pts = [(c, a, n) for c, a, n in zip(bins["confidence"], bins["accuracy"], bins["count"]) if n]
            if not pts:
                continue
            total = sum(p[2] for p in pts)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "-", color=f"C{i}", lw=1, label=variant)
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=[12 + 300 * p[2] / total for p in pts],
                       color=f"C{i}", alpha=0.6)
        ax.set(xlim=(0, 1.02), ylim=(0, 1.02), xlabel="confidence", ylabel="accuracy", title=title)
        ax.legend(fontsize=8, loc="upper left")
        ax.grid(alpha=0.3)
        out.append(png(fig))
    return out


def latency_cdf(speed: dict[str, dict], what: str = "latency_s") -> list[str]:
    """Empirical CDF of a per-request time (``latency_s`` or ``ttft_s``) of every variant, one image
    per concurrency; greedy solid, sampling dashed."""
    levels = sorted({s["concurrency"] for r in speed.values() for s in r.get("settings", {}).values()})
    label = {"latency_s": "request latency (ms)", "ttft_s": "time to first token (ms)"}.get(what, what)
    out = []
    for c in levels:
        fig, ax = _figure()
        for i, (variant, res) in enumerate(speed.items()):
            for s in res.get("settings", {}).values():
                xs = sorted(1000 * x for x in s.get("samples", {}).get(what, []))
                if s["concurrency"] != c or not xs:
                    continue
                ax.step(xs, [(k + 1) / len(xs) for k in range(len(xs))], where="post", color=f"C{i}",
                        ls="-" if s["decoding"] == "greedy" else "--", label=f"{variant} {s['decoding']}")
        ax.set(xlabel=label, ylabel="fraction of requests", ylim=(0, 1.02),
               title=f"{label.split(' (')[0].capitalize()}, concurrency {c}")
        _log_axis(ax, "x")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7, loc="lower right")
        out.append(png(fig))
    return out


def frontier(points: dict[str, tuple[float, float]], higher_is_better: bool) -> list[str]:
    """Names of the Pareto-optimal points: no other point is at least as cheap (x) and at least as
    good (y) and strictly better in one of them. Lower x is better."""
    def dominates(p, q):
        better_y = p[1] >= q[1] if higher_is_better else p[1] <= q[1]
        strictly = p[0] < q[0] or (p[1] > q[1] if higher_is_better else p[1] < q[1])
        return p[0] <= q[0] and better_y and strictly

    return [n for n, q in points.items() if not any(dominates(p, q) for m, p in points.items() if m != n)]


def pareto(charts: list[tuple[str, str, dict[str, tuple[float, float]]]], quality: str,
           higher_is_better: bool) -> list[str]:
    """Quality against cost (latency, size...) per variant, the Pareto frontier joined by a line.
    ``charts``: ``(title, x label, {variant: (cost, quality)})``; charts with fewer than 2 points are left out."""
    out = []
    for title, xlabel, points in charts:
        if len(points) < 2:
            continue
        best = frontier(points, higher_is_better)
        fig, ax = _figure()
        for i, (name, (x, y)) in enumerate(points.items()):
            # a legend, not labels beside the points: close variants would print over each other
            ax.scatter([x], [y], s=70, color=f"C{i}", edgecolor="black" if name in best else "none", linewidth=1.5,
                       zorder=3, label=name + (" *" if name in best else ""))
        line = sorted((points[n] for n in best), key=lambda p: p[0])
        ax.plot([p[0] for p in line], [p[1] for p in line], color="0.3", lw=1, ls="--", label="Pareto frontier")
        ax.set(xlabel=xlabel, ylabel=f"{quality} ({'higher' if higher_is_better else 'lower'} is better)",
               title=title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        out.append(png(fig))
    return out


def router_curve(curve: list[dict], threshold: float | None, target_quality: float | None) -> list[str]:
    """The router's cost-quality curve: the share of queries sent to the teacher against the quality
    expected (isotonic) and measured on the calibration prompts, with the chosen operating point."""
    fig, ax = _figure()
    share = [c["teacher_share"] for c in curve]
    ax.plot(share, [c["expected_quality"] for c in curve], label="expected (isotonic)")
    ax.plot(share, [c["quality"] for c in curve], linestyle="--", label="measured")
    if target_quality is not None:
        ax.axhline(target_quality, color="grey", linewidth=0.8, label="target")
    chosen = [c for c in curve if threshold is not None and c["threshold"] == threshold]
    if chosen:
        ax.scatter([chosen[0]["teacher_share"]], [chosen[0]["expected_quality"]], color="black", zorder=3,
                   label=f"threshold {threshold:.3g}")
    ax.set_xlabel("share of queries answered by the teacher")
    ax.set_ylabel("quality")
    ax.legend(fontsize="small")
    return [png(fig)]
