"""One function per section of the report, each from the run files it needs (report/inputs.py); a
section whose files are absent is not drawn. Each returns its HTML body, or "" when there is
nothing to show."""

from __future__ import annotations

from distillery.gate import higher_is_better
from distillery.report import plots
from distillery.report.tables import cell, esc, fmt, metrics_table, num, table, value_cell, verdict

QUALITY = ("accuracy", "exact_match", "token_f1", "top1_agreement", "kl_to_teacher", "perplexity")
_TASK_METRICS = {"multiple_choice": ("accuracy", "accuracy_norm", "ece", "mce"),
                 "generation": ("exact_match", "token_f1")}


def figures(images: list[str], alt: str) -> str:
    """Panels side by side where the screen is wide enough, stacked on a phone."""
    if not images:
        return ""
    tags = "".join(f'<img alt="{esc(alt)} ({i + 1} of {len(images)})" src="data:image/png;base64,{b64}">'
                   for i, b64 in enumerate(images))
    return f'<div class="figs">{tags}</div>'


_ORDER = ("teacher", "student_init", "student")


def ordered(by_variant: dict) -> dict:
    """Teacher, cut student, distilled student, then the other variants (compressed ones) by name."""
    first = [v for v in _ORDER if v in by_variant]
    return {v: by_variant[v] for v in first + sorted(v for v in by_variant if v not in _ORDER)}


def _task_results(tasks: dict) -> dict[str, dict[str, dict]]:
    """``{task: {variant: result}}`` from eval/tasks.json's ``{variant: [result, ...]}``."""
    out: dict[str, dict[str, dict]] = {}
    for variant, results in ordered(tasks).items():
        for res in results:
            out.setdefault(res["task"], {})[variant] = res
    return out


def pooled_task_metrics(tasks: dict) -> dict[str, dict[str, float]]:
    """``{variant: {metric: mean over every example of every task}}``: each task's mean weighted by
    its number of examples (what collect.gate_inputs pools from the examples themselves)."""
    out = {}
    for variant, results in tasks.items():
        sums: dict[str, list[float]] = {}
        for res in results:
            n = res["metrics"]["n"]
            for m in _TASK_METRICS[res["kind"]][:2]:
                s = sums.setdefault(m, [0.0, 0])
                s[0] += res["metrics"][m] * n
                s[1] += n
        out[variant] = {m: s[0] / s[1] for m, s in sums.items() if s[1]}
    return out


def variant_metrics(inputs: dict) -> dict[str, dict]:
    """Every variant's headline metrics: eval/summary.json, plus task metrics pooled from eval/tasks.json."""
    merged: dict[str, dict] = {v: dict(m) for v, m in inputs.get("summary", {}).items()}
    for v, m in pooled_task_metrics(inputs.get("tasks", {})).items():
        merged.setdefault(v, {}).update({k: x for k, x in m.items() if k not in merged[v]})
    return ordered(merged)


# ---------------------------------------------------------------- sections


def gate_section(gate: dict) -> str:
    status = "PASSED" if gate.get("passed") else "FAILED"
    head = (f'<p class="verdict {"pass" if gate.get("passed") else "fail"}">{status}'
            f' (exit code {esc(gate.get("exit_code", "?"))})</p>')
    rows = []
    for r in gate["rules"]:
        iv = r.get("interval")
        rule = r["rule"] + (f" ({r['error']})" if r.get("error") else "")
        rows.append([verdict(r["verdict"]), cell(rule, "rule"), cell(r.get("variant", "")),
                     num(r.get("value")), num(r.get("threshold")),
                     f'<td class="num">{f"[{fmt(iv[0])}, {fmt(iv[1])}]" if iv else "-"}</td>',
                     num(r.get("p_value"))])
    return head + table(["verdict", "rule", "variant", "value", "threshold", "interval", "p"], rows)


def metrics_section(inputs: dict) -> str:
    summary = inputs["summary"]
    out = metrics_table(variant_metrics(inputs), preferred=("perplexity", "kl_to_teacher", "top1_agreement"),
                        caption="Held-out text (teacher-forced) and task metrics pooled over every task; "
                                "[low, high] = 95% bootstrap interval where present")
    return out + figures(plots.variants(ordered(summary)), "perplexity and KL per variant")


def tasks_section(tasks: dict) -> str:
    out = []
    for name, by_variant in _task_results(tasks).items():
        kind = next(iter(by_variant.values()))["kind"]
        rows = {}
        for variant, res in by_variant.items():
            rows[variant] = {"n": res["metrics"]["n"]}
            for m in _TASK_METRICS[kind]:
                if m in res["metrics"]:
                    iv = res.get("intervals", {}).get(m)
                    rows[variant][m] = {"value": res["metrics"][m], "interval": iv} if iv else res["metrics"][m]
        out.append(f"<h3>{esc(name)} <small>({esc(kind.replace('_', ' '))})</small></h3>")
        out.append(metrics_table(rows, preferred=("n", *_TASK_METRICS[kind])))
        main = _TASK_METRICS[kind][0]
        tags = sorted({t for res in by_variant.values() for t in res.get("slices", {})})
        if tags:
            body = []
            for t in tags:
                n = next((res["slices"][t]["n"] for res in by_variant.values() if t in res.get("slices", {})), None)
                body.append([cell(t), num(n),
                             *(value_cell(res.get("slices", {}).get(t, {}).get(main)) for res in by_variant.values())])
            out.append(table(["slice", "n", *(f"{v} {main}" for v in by_variant)], body,
                             caption=f"{name}: {main} per slice (tag)"))
    return "".join(out)


def paired_section(inputs: dict) -> str:
    rows = []
    for r in inputs.get("paired", []):
        iv = r.get("interval")
        metric = r["metric"] + (f"[{r['slice']}]" if r.get("slice") else "")
        rows.append([cell(r["variant"]), cell(r["against"]), cell(metric),
                     value_cell({"value": r["difference"], "interval": iv}), num(r.get("p_value")),
                     cell(r.get("test", "")), num(r.get("n"))])
    for r in inputs.get("gate", {}).get("rules", []):
        if r.get("against") and r.get("verdict") != "error":
            rows.append([cell(r["variant"]), cell(r["against"]), cell(f"gate: {r['rule']}"),
                         value_cell({"value": r["value"], "interval": r.get("interval")}),
                         num(r.get("p_value")), cell(r.get("test", "")),
                         num(r.get("n"))])
    if not rows:
        return ""
    return table(["variant", "against", "metric", "difference (variant - against)", "p", "test", "n"], rows,
                 caption="Same examples, both variants: paired bootstrap interval of the difference; "
                         "McNemar's exact test for 0/1 scores")


def calibration_section(inputs: dict) -> str:
    panels: dict[str, dict[str, dict]] = {}
    out = []
    calibration = inputs.get("calibration", {})
    if calibration:
        table_rows = {v: {k: c[k] for k in ("ece", "mce", "n") if k in c} for v, c in ordered(calibration).items()}
        out.append(metrics_table(table_rows, caption="Next-token confidence, 15 bins"))
        panels["next-token confidence"] = {v: c["bins"] for v, c in ordered(calibration).items()}
    for name, by_variant in _task_results(inputs.get("tasks", {})).items():
        curves = {v: r["reliability"] for v, r in by_variant.items() if r.get("reliability")}
        if curves:
            panels[f"answer confidence: {name}"] = curves
    if not panels:
        return ""
    return "".join(out) + figures(plots.reliability(panels), "reliability diagrams")


def _machine_line(results: dict) -> str:
    first = next(iter(results.values()))
    m, cfg = first.get("machine", {}), first.get("config", {})
    threads = sorted({r.get("machine", {}).get("threads") for r in results.values()} - {None})
    load = m.get("load_average")
    parts = [f"Measured on <b>{esc(m.get('cpu', '?'))}</b>",
             f"{esc(m.get('cpus_usable', m.get('cpu_count', '?')))} CPUs usable",
             f"<b>{esc(', '.join(map(str, threads)) or '?')} torch threads</b>"
             f" (interop {esc(m.get('interop_threads', '?'))})",
             f"CUDA: {esc(m.get('cuda') or 'none')}", f"torch {esc(m.get('torch', '?'))}",
             f"transformers {esc(m.get('transformers', '?'))}"]
    if load:
        parts.append(f"load average {esc(', '.join(f'{x:.2f}' for x in load))} at the first variant")
    method = (f"Each setting: {esc(cfg.get('requests', '?'))}+ requests after {esc(cfg.get('warmup', '?'))} warm-up "
              f"batches, {esc(cfg.get('max_new_tokens', '?'))} new tokens"
              f"{' (EOS suppressed)' if cfg.get('ignore_eos') else ''}; concurrency c = c requests arriving together "
              f"and served as one batched generate call. Times in milliseconds.")
    return f'<p class="machine">{"; ".join(parts)}.</p><p>{method}</p>'


def speed_section(speed: dict) -> str:
    results = ordered(speed)
    rows = []
    for variant, res in results.items():
        for name, s in res.get("settings", {}).items():
            rows.append([cell(variant), cell(name), num(s["requests"]),
                         *(num(s[w].get(q), "ms")
                           for w, qs in (("ttft_s", ("p50", "p95", "p99")), ("tpot_s", ("p50", "p95")),
                                         ("latency_s", ("min", "p50", "p95", "p99", "max"))) for q in qs),
                         num(s["tokens_per_s"])])
    out = [_machine_line(results), table(
        ["variant", "setting", "requests", "TTFT p50", "TTFT p95", "TTFT p99", "TPOT p50", "TPOT p95",
         "latency min", "latency p50", "latency p95", "latency p99", "latency max", "tokens/s"], rows)]
    ops = []
    for variant, res in results.items():
        size, cs, mem = res.get("size", {}), res.get("cold_start", {}), res.get("memory", {})
        ops.append([cell(variant), num(size.get("size_bytes"), "bytes"),
                    num(size.get("weights_bytes"), "bytes"),
                    num(cs.get("cold_start_s", {}).get("median")),
                    num(cs.get("peak_rss_bytes"), "bytes"),
                    num(mem.get("peak_rss_bytes"), "bytes"),
                    num(mem.get("peak_cuda_bytes"), "bytes")])
    out.append(table(["variant", "size on disk", "weights", "cold start (s, load to first token)",
                      "cold start peak RSS", "process peak RSS", "CUDA peak"], ops,
                     caption="Cold start: a fresh process loads the folder and produces one token; its peak RSS "
                             "is this variant's alone. Process peak RSS includes everything the measuring "
                             "process had loaded."))
    out.append(figures(plots.latency_cdf(results, "latency_s"), "request latency CDF"))
    out.append(figures(plots.latency_cdf(results, "ttft_s"), "time to first token CDF"))
    return "".join(out)


def pareto_section(inputs: dict) -> str:
    speed = ordered(inputs["speed"])
    quality = variant_metrics(inputs)
    # each variant's base setting (greedy at its lowest concurrency) is named in the file
    base = {v: r["settings"][r["base_setting"]] for v, r in speed.items() if r.get("base_setting")}
    latency = {v: s["latency_s"]["p50"] * 1000 for v, s in base.items()}
    levels = sorted({s["concurrency"] for s in base.values()})
    size = {v: r["size"]["size_bytes"] / 2**20 for v, r in speed.items() if "size" in r}
    for metric in QUALITY:
        have = {v: plots.number(m.get(metric)) for v, m in quality.items() if plots.number(m.get(metric)) is not None}
        if len([v for v in have if v in latency or v in size]) >= 2:
            break
    else:
        return ""
    where = f"concurrency {', '.join(map(str, levels))}, greedy"
    charts = [("Quality vs latency", f"request latency p50, {where} (ms)",
               {v: (latency[v], have[v]) for v in have if v in latency}),
              ("Quality vs size", "size on disk (MB)", {v: (size[v], have[v]) for v in have if v in size})]
    chart = plots.pareto(charts, metric, higher_is_better(metric))
    if not chart:
        return ""
    return (f"<p>Quality metric: <b>{esc(metric)}</b> (the first of {esc(', '.join(QUALITY))} that the variants "
            f"have). Circled points are on the Pareto frontier: no other variant is both cheaper and better.</p>"
            + figures(chart, "Pareto chart"))


def sequence_section(seq: dict) -> str:
    cfg = seq.get("config", {})
    sm = cfg.get("sampling", {})
    out = [f"<p>{esc(cfg.get('prompts', '?'))} held-out prompts (the first {esc(cfg.get('prompt_tokens', '?'))} "
           f"tokens of held-out blocks), up to {esc(cfg.get('new_tokens', '?'))} new tokens, greedy and sampled "
           f"(temperature {esc(sm.get('temperature', '?'))}, top-p {esc(sm.get('top_p', '?'))}, top-k "
           f"{esc(sm.get('top_k') or 'off')}; from {esc(cfg.get('sampling_source', '?'))}). Teacher and variant "
           "draw with the same random numbers, so a variant with the teacher's distributions samples its text.</p>",
           metrics_table(ordered(seq["metrics"]), caption="Each variant's continuation against the teacher's: "
                         "ROUGE-L F-measure and exact match; [low, high] = 95% bootstrap interval over prompts")]
    for name, sl in seq.get("slices", {}).items():
        out.append(f"<h3>{esc(name)}</h3>" + metrics_table(ordered(sl["metrics"])))
    samples = seq.get("samples", {})
    greedy = ordered(samples.get("greedy", {}))
    if samples.get("prompts") and greedy:
        rows = [[cell(p), *(cell(texts[i]) for texts in greedy.values())]
                for i, p in enumerate(samples["prompts"][:3])]
        out.append(table(["prompt", *(f"{v} (greedy)" for v in greedy)], rows, caption="The first prompts"))
    return "".join(out)


def robustness_section(robustness: dict) -> str:
    rows = []
    for variant, kinds in ordered(robustness).items():
        for kind, metrics in kinds.items():
            for metric, ch in metrics.items():
                rows.append([cell(variant), cell(kind), cell(metric), num(ch["before"]),
                             num(ch["after"]),
                             value_cell({"value": ch["change"], "interval": ch.get("interval")}),
                             num(ch.get("p_value")), num(ch.get("n"))])
    return table(["variant", "perturbation", "metric", "before", "after", "change", "p", "n"], rows,
                 caption="Each metric on perturbed copies of held-out rows against the same rows unperturbed "
                         "(task metrics as task/metric)")


def review_section(review: dict) -> str:
    rows = [[cell(r["subject"]), cell(r["against"]), value_cell({"value": r["value"], "interval": r.get("interval")}),
             *(num(r.get(k)) for k in ("wins", "losses", "ties", "items", "ratings", "unrated"))]
            for r in review.values()]
    return table(["variant", "against", "win rate", "wins", "losses", "ties", "items", "ratings", "unrated"], rows,
                 caption="Human ratings of paired samples, sides hidden; tie = half a win; interval over items")


def lmeval_section(inputs: dict) -> str:
    ours = _task_results(inputs.get("tasks", {}))
    rows = []
    for variant, by_task in ordered(inputs["lmeval"]).items():
        for task, res in by_task.items():
            mine = ours.get(task, {}).get(variant, {}).get("metrics", {})
            rows.append([cell(variant), cell(task), num(res["metrics"]["accuracy"]),
                         num(mine.get("accuracy")),
                         num(res["metrics"].get("accuracy_norm")),
                         num(mine.get("accuracy_norm")),
                         num(res["metrics"].get("n")), cell(res.get("lm_eval_version", ""))])
    return table(["variant", "task", "lm-eval accuracy", "ours", "lm-eval acc_norm", "ours", "n", "lm-eval"], rows)


def slices_section(slices: dict) -> str:
    return "".join(f"<h3>{esc(name)}</h3>" + metrics_table(ordered(t), preferred=("perplexity", "kl_to_teacher"))
                   for name, t in slices.items())


def mixture_section(mixture: dict) -> str:
    """The training data mixture (data/mixture.json): each component's weight, share and size."""
    rows = [[cell(c["name"]), num(c["weight"]), f"<td class=\"num\">{c['share']:.1%}</td>", num(c["documents"]),
             num(c["train_blocks"]), num(c["heldout_blocks"])] for c in mixture["components"]]
    return table(["component", "weight", "share of examples", "documents", "training blocks", "held-out blocks"],
                 rows, caption="Each step's examples are drawn from the components by weight")


def generations_section(generations: list) -> str:
    return metrics_table({f"generation {g['generation']}": {k: v for k, v in g.items() if k != "generation"}
                          for g in generations}, first="generation",
                         caption="Born-again generations, against the original teacher")


def training_section(records: list) -> str:
    terms = plots.loss_terms(records)
    last = records[-1] if records else {}
    note = (f"<p>{len(records)} steps; loss terms: {esc(', '.join(terms))}; last step: "
            + ", ".join(f"{esc(k)} {fmt(last[k])}" for k in terms if k in last) + "</p>") if terms else ""
    return note + figures(plots.training(records), "training curves")


def card_section(card: str) -> str:
    from markdown_it import MarkdownIt

    # raw HTML in the card is shown as text, never rendered: the card quotes generated data
    return f'<div class="card">{MarkdownIt("commonmark", {"html": False}).enable("table").render(card)}</div>'


def stages_section(manifest: dict) -> str:
    rows = [[cell(n), cell(e.get("status", "")), num(e.get("seconds"))]
            for n, e in manifest.get("stages", {}).items()]
    return table(["stage", "status", "seconds"], rows) if rows else ""


def router_section(router: dict) -> str:
    """The confidence router's calibration (router.json, written by `distillery route calibrate`)."""
    goal = router["target"] * router.get("teacher_quality", 1.0)
    text = (f"<p>Score {esc(router['score'])}, metric {esc(router['metric'])}, {router['n']} calibration prompts: "
            f"threshold {num(router.get('threshold'))} sends {router['teacher_share']:.0%} of queries to the "
            f"teacher for an expected quality of {router['expected_quality']:.3f} (target {goal:.3f}).</p>")
    return text + figures(plots.router_curve(router["curve"], router.get("threshold"), goal), "router cost-quality")


def recipe_section(recipe: str) -> str:
    return f"<pre>{esc(recipe)}</pre>"


# (anchor, title, the input keys it needs (every one present), function of all the inputs -> HTML)
SECTIONS = [
    ("gate", "Release gate", ("gate",), lambda i: gate_section(i["gate"])),
    ("metrics", "Metrics per variant", ("summary",), metrics_section),
    ("tasks", "Tasks", ("tasks",), lambda i: tasks_section(i["tasks"])),
    ("paired", "Paired comparisons", (), paired_section),
    ("calibration", "Calibration", (), calibration_section),
    ("speed", "Speed, memory and size", ("speed",), lambda i: speed_section(i["speed"])),
    ("pareto", "Quality against cost", ("speed",), pareto_section),
    ("router", "Confidence router", ("router",), lambda i: router_section(i["router"])),
    ("sequence", "Generations against the teacher's", ("sequence",), lambda i: sequence_section(i["sequence"])),
    ("robustness", "Robustness", ("robustness",), lambda i: robustness_section(i["robustness"])),
    ("review", "Human review", ("review",), lambda i: review_section(i["review"])),
    ("lmeval", "Peer evaluator (lm-evaluation-harness)", ("lmeval",), lmeval_section),
    ("slices", "Held-out slices", ("slices",), lambda i: slices_section(i["slices"])),
    ("mixture", "Training data mixture", ("mixture",), lambda i: mixture_section(i["mixture"])),
    ("generations", "Born-again generations", ("generations",), lambda i: generations_section(i["generations"])),
    ("training", "Training", ("train",), lambda i: training_section(i["train"])),
    ("card", "Dataset card", ("card",), lambda i: card_section(i["card"])),
    ("stages", "Stages", ("manifest",), lambda i: stages_section(i["manifest"])),
    ("recipe", "Recipe", ("recipe",), lambda i: recipe_section(i["recipe"])),
]
# which files a section reads, to name them when one has an unexpected shape
READS = {"metrics": ("summary", "tasks"), "paired": ("paired", "gate"), "calibration": ("calibration", "tasks"),
         "pareto": ("speed", "summary", "tasks"), "lmeval": ("lmeval", "tasks")}
