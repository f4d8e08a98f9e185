"""report.html from a tiny run whose files come from the real producers (evaluate_models, evaluate_task,
calibration, speed, gate, robustness, review), checked as text and in headless Chromium."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch

from distillery.io import atomic_write_json, atomic_write_text
from distillery.report.html import write_report
from distillery.report.inputs import ReportError
from distillery.report.plots import frontier, loss_terms
from tests.helpers import tiny_llama

RULES = ["accuracy >= 0.5 * teacher.accuracy", "latency_p99 <= 3 * teacher.latency_p99",
         "accuracy not worse than teacher (paired)", "kl_to_teacher <= 0.0001", "no_such_metric <= 1"]
CARD = """# Dataset card

Teacher generations from **SmolLM2**, curated.

| split | rows |
| --- | --- |
| train | 120 |
| valid | 12 |

<script>console.error("the card ran a script")</script>
"""


def _mc_rows(n: int = 8) -> list[dict]:
    words = ["splendid", "dreadful", "moving", "tedious", "charming", "clumsy", "careful", "hollow"]
    return [{"id": f"s{i}", "prompt": f"Review: the film was {words[i % 8]} from start to end. Answer:",
             "choices": ["negative", "positive"], "answer": (i + 1) % 2,
             "tags": ["sentiment", "label:pos" if (i + 1) % 2 else "label:neg"]} for i in range(n)]


def _train_records(steps: int = 30) -> list[dict]:
    recs = []
    for s in range(1, steps + 1):
        kd, ce, hidden = 3.0 / s ** 0.5, 4.0 - s / 20, 0.05 / s
        rec = {"step": s, "kd": kd, "ce": ce, "hidden": hidden, "kd_weighted": kd, "loss": kd + 0.5 * ce + hidden,
               "lr": 1e-3, "grad_norm": 1.0, "tokens": 128, "tokens_per_s": 900.0, "peak_rss_gb": 0.5}
        if s % 10 == 0:
            rec.update(eval_kl_to_teacher=kd * 0.8, eval_perplexity=40 + 100 / s)
        recs.append(rec)
    return recs


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_tokenizer, lee_text) -> Path:
    # one thread: on a loaded machine two threads make each tiny matmul wait on the other (100x slower)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _make_run(tmp_path_factory.mktemp("run"), tiny_tokenizer, lee_text)
    finally:
        torch.set_num_threads(threads)


def _make_run(run: Path, tok, lee_text: str) -> Path:
    from distillery.evaluate.calibration import next_token_calibration
    from distillery.evaluate.collect import gate_inputs
    from distillery.evaluate.quality import evaluate_models
    from distillery.evaluate.review import export_review, import_ratings
    from distillery.evaluate.robustness import changes_by_perturbation, perturbation_slice
    from distillery.evaluate.speed import folder_size, measure_speed, speed_metrics
    from distillery.evaluate.stats import mcnemar, paired_bootstrap
    from distillery.evaluate.tasks import evaluate_task, read_task, write_task
    from distillery.gate import evaluate_rules, write_gate

    models = {"teacher": tiny_llama(layers=2, seed=0), "student_init": tiny_llama(layers=1, seed=1),
              "student": tiny_llama(layers=1, seed=2)}
    ids = tok(lee_text[:20_000])["input_ids"]
    blocks = torch.tensor(ids[: 8 * 32]).view(8, 32)
    students = {k: v for k, v in models.items() if k != "teacher"}
    summary = evaluate_models(students, blocks[:4], teacher=models["teacher"])
    atomic_write_json(run / "eval" / "summary.json", summary)
    atomic_write_json(run / "eval" / "slices.json",
                      {"lee-tail": evaluate_models(students, blocks[4:], teacher=models["teacher"])})
    atomic_write_json(run / "eval" / "calibration.json",
                      {k: next_token_calibration(m, blocks[:4]) for k, m in models.items()})

    rows = _mc_rows()
    mc = read_task(write_task(run / "tasks" / "sentiment.jsonl", rows))
    gen = read_task(write_task(run / "tasks" / "arithmetic.jsonl", [
        {"id": f"a{i}", "prompt": f"What is {i} + {i}?", "answer": str(2 * i), "answer_type": "number",
         "tags": ["arithmetic"]} for i in range(4)]))
    tasks = {k: [evaluate_task(m, tok, mc), evaluate_task(m, tok, gen, max_new_tokens=4)] for k, m in models.items()}
    atomic_write_json(run / "eval" / "tasks.json", tasks)

    pert = read_task(write_task(run / "tasks" / "sentiment_perturbed.jsonl",
                                perturbation_slice(rows, kinds=("uppercase", "typos"))))
    atomic_write_json(run / "eval" / "robustness.json", {
        k: changes_by_perturbation(tasks[k][0]["examples"], evaluate_task(m, tok, pert)["examples"], n_resamples=200)
        for k, m in models.items() if k != "teacher"})

    from distillery.evaluate.sequence import sequence_divergence

    seq = sequence_divergence(students, models["teacher"], tok, blocks, prompts=2, prompt_tokens=6, new_tokens=3)
    atomic_write_json(run / "eval" / "sequence.json", {"config": {"prompts": 2, "sampling": {"temperature": 0.7}},
                                                       "metrics": seq["metrics"], "samples": seq["samples"]})

    speed = {}
    for k, m in models.items():
        folder = run / ("student" if k == "student" else f"models/{k}")
        m.save_pretrained(folder)
        speed[k] = measure_speed(m, tok, ["The minister said", "Rain fell on the town of"], concurrency=(1, 2),
                                 requests=6, warmup=1, max_new_tokens=3)
        speed[k]["size"] = folder_size(folder)
    atomic_write_json(run / "eval" / "speed.json", speed)

    metrics, per_example = gate_inputs(tasks, n_resamples=200)
    for k in models:
        metrics[k].update(speed_metrics(speed[k]), **{m: v for m, v in summary.get(k, {}).items()})
    write_gate(run / "gate.json", evaluate_rules(RULES, metrics, "student", per_example, n_resamples=200))
    a, b = per_example["student"]["accuracy"], per_example["student_init"]["accuracy"]
    keys = sorted(a)
    pb = paired_bootstrap([a[x] for x in keys], [b[x] for x in keys], n_resamples=200)
    atomic_write_json(run / "eval" / "paired.json", [
        {"variant": "student", "against": "student_init", "metric": "accuracy", "difference": pb["difference"],
         "interval": [pb["low"], pb["high"]], "n": pb["n"], "test": "mcnemar",
         "p_value": mcnemar([a[x] for x in keys], [b[x] for x in keys])["p_value"]}])

    paths = export_review([{"id": f"r{i}", "prompt": f"p{i}", "teacher": "t", "student": "s"} for i in range(6)],
                          run / "review", seed=0)
    key = json.loads(paths["key"].read_text())["key"]
    filled = [json.loads(line) for line in paths["jsonl"].read_text().splitlines()]
    for i, r in enumerate(filled):  # the student wins 3, loses 2, ties 1
        winner = "student" if i < 3 else "teacher"
        r["rating"] = "tie" if i == 5 else next(side for side, v in key[r["id"]].items() if v == winner)
    atomic_write_text(paths["jsonl"], "".join(json.dumps(r) + "\n" for r in filled))
    atomic_write_json(run / "eval" / "review.json", {"student": import_ratings(paths["jsonl"], paths["key"])})

    atomic_write_json(run / "eval" / "student" / "lmeval_sentiment.json",
                      {"task": "sentiment", "lm_eval_version": "0.4.9", "examples": [],
                       "metrics": {**{m: tasks["student"][0]["metrics"][m] for m in ("accuracy", "accuracy_norm")},
                                   "n": 8}})
    atomic_write_json(run / "eval" / "generations.json",
                      [{"generation": g, **summary["student"]} for g in (1, 2)])
    atomic_write_text(run / "train.jsonl", "".join(json.dumps(r) + "\n" for r in _train_records()))
    atomic_write_text(run / "data" / "card.md", CARD)
    atomic_write_text(run / "recipe.yaml", "name: tiny\nteacher: {model: tiny}\n")
    atomic_write_json(run / "manifest.json", {"stages": {"distill": {"status": "done", "seconds": 12.5},
                                                         "evaluate": {"status": "done", "seconds": 3.0}}})
    write_report(run, title="Tiny run")
    return run


def _images(page: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r'src="data:image/png;base64,([^"]+)"', page)]


def test_every_section_drawn_from_its_file(tiny_run):
    page = (tiny_run / "report.html").read_text()
    for anchor in ("gate", "metrics", "tasks", "paired", "calibration", "speed", "pareto", "sequence", "robustness",
                   "review", "lmeval", "slices", "generations", "training", "card", "stages", "recipe"):
        assert f'<section id="{anchor}">' in page, anchor
    imgs = _images(page)
    # two panels each: variants (perplexity, KL), reliability (next token, answers), latency and TTFT CDFs
    # (concurrency 1, 2), Pareto (latency, size), training (loss terms, held-out KL)
    assert len(imgs) == 12 and all(i.startswith(b"\x89PNG\r\n\x1a\n") for i in imgs)
    assert page.count("<img") == 12
    # nothing fetched from anywhere: no URL outside the page itself
    assert not re.search(r'(src|href)="(?!data:|#)', page)
    assert "<script" not in page  # the card's script is shown as text
    assert "&lt;script&gt;" in page


def test_tables_carry_the_numbers(tiny_run):
    page = (tiny_run / "report.html").read_text()
    gate = json.loads((tiny_run / "gate.json").read_text())
    assert [r["verdict"] for r in gate["rules"]].count("error") == 1
    assert page.count('class="badge error"') == 1 and "FAILED (exit code 2)" in page
    for r in gate["rules"]:
        assert f'<td class="rule">{r["rule"].replace(">", "&gt;").replace("<", "&lt;")}' in page
    tasks = json.loads((tiny_run / "eval" / "tasks.json").read_text())
    acc = tasks["student"][0]["metrics"]["accuracy"]
    lo, hi = tasks["student"][0]["intervals"]["accuracy"]
    assert f'{acc:,.4g} <span class="ci">[{lo:,.4g}, {hi:,.4g}]</span>' in page
    speed = json.loads((tiny_run / "eval" / "speed.json").read_text())
    p99 = speed["student"]["settings"]["c2_sampling"]["latency_s"]["p99"]
    assert f"{1000 * p99:,.3g}" in page
    threads = speed["student"]["machine"]["threads"]
    assert f"{threads} torch threads" in page and speed["student"]["machine"]["cpu"] in page
    review = json.loads((tiny_run / "eval" / "review.json").read_text())["student"]
    assert (review["wins"], review["losses"], review["ties"]) == (3, 2, 1)
    assert f"{review['value']:,.4g}" in page
    assert "Quality metric: <b>accuracy</b>" in page
    seq = json.loads((tiny_run / "eval" / "sequence.json").read_text())["metrics"]["student"]["seq_rouge_l_greedy"]
    assert f'{seq["value"]:,.4g} <span class="ci">[{seq["interval"][0]:,.4g}, {seq["interval"][1]:,.4g}]' in page


def test_sections_appear_only_with_their_files(tmp_path, tiny_run):
    shutil.copy(tiny_run / "eval" / "summary.json", tmp_path / "summary.json")
    run = tmp_path / "r"
    (run / "eval").mkdir(parents=True)
    shutil.copy(tmp_path / "summary.json", run / "eval" / "summary.json")
    page = write_report(run, title="Only a summary").read_text()
    assert re.findall(r'<section id="(\w+)">', page) == ["metrics"]
    assert len(_images(page)) == 2
    empty = tmp_path / "empty"
    empty.mkdir()
    page = write_report(empty).read_text()
    assert "<section" not in page and "<h1>Distillery run</h1>" in page


def test_a_bad_file_is_named(tmp_path, tiny_run):
    run = tmp_path / "r"
    shutil.copytree(tiny_run, run)
    atomic_write_json(run / "eval" / "speed.json", {"teacher": {"settings": {"c1_greedy": {"requests": 3}}}})
    with pytest.raises(ReportError, match=r"eval/speed.json.*missing field 'ttft_s'"):
        write_report(run)
    atomic_write_text(run / "eval" / "speed.json", "{not json")
    with pytest.raises(ReportError, match=r"eval/speed.json: not valid JSON"):
        write_report(run)


def test_train_log_torn_last_line_is_dropped_a_bad_middle_line_named(tmp_path, tiny_run):
    run = tmp_path / "r"
    shutil.copytree(tiny_run, run)
    lines = (run / "train.jsonl").read_text().splitlines()
    # a run killed while appending leaves its last line half written: the report reads up to it
    atomic_write_text(run / "train.jsonl", "\n".join(lines) + '\n{"step": 9')
    assert 'id="training"' in write_report(run).read_text()
    atomic_write_text(run / "train.jsonl", "\n".join([lines[0], '{"step": 9', *lines[1:]]) + "\n")
    with pytest.raises(ReportError, match=r"train.jsonl:2: not valid JSON"):
        write_report(run)


def test_loss_terms_and_frontier():
    assert loss_terms(_train_records()) == ["kd", "ce", "hidden", "kd_weighted", "loss"]
    pts = {"teacher": (100.0, 0.9), "student": (40.0, 0.85), "int8": (30.0, 0.70), "bad": (50.0, 0.80),
           "tie": (40.0, 0.85)}
    assert sorted(frontier(pts, higher_is_better=True)) == ["int8", "student", "teacher", "tie"]
    assert sorted(frontier({"a": (1.0, 3.0), "b": (2.0, 2.0), "c": (3.0, 4.0)}, higher_is_better=False)) == ["a", "b"]


# ---------------------------------------------------------------- in a real browser


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    if Path("/usr/bin/chromium").is_file():
        return "/usr/bin/chromium"
    pytest.skip("no Chromium on this machine (make install puts Debian's chromium there: apt-get install chromium)")


def _artifacts(tmp_path: Path) -> list[Path]:
    out = [tmp_path]
    if os.environ.get("DISTILLERY_ARTIFACTS"):
        out.append(Path(os.environ["DISTILLERY_ARTIFACTS"]))
    for d in out:
        d.mkdir(parents=True, exist_ok=True)
    return out


def test_report_in_headless_chromium(tiny_run, tmp_path):
    from playwright.sync_api import sync_playwright

    executable = _chromium()
    url = (tiny_run / "report.html").as_uri()
    with sync_playwright() as p:
        # Chromium's sandbox cannot start as root (CI containers); the page runs no script anyway
        browser = p.chromium.launch(executable_path=executable,
                                    args=["--no-sandbox"] if hasattr(os, "geteuid") and os.geteuid() == 0 else [])
        try:
            for name, viewport in (("desktop", {"width": 1280, "height": 900}),
                                   ("phone", {"width": 390, "height": 844})):
                page = browser.new_page(viewport=viewport, device_scale_factor=1)
                errors, requests = [], []
                page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
                page.on("pageerror", lambda e: errors.append(str(e)))
                page.on("request", lambda r: requests.append(r.url))
                page.goto(url, wait_until="load")
                images = page.evaluate("Array.from(document.images).map(i => [i.alt, i.complete, i.naturalWidth])")
                assert len(images) == 12
                assert all(done and width > 0 for _, done, width in images), images
                assert errors == [], errors
                assert [r for r in requests if not r.startswith(("file:", "data:"))] == []
                widths = page.evaluate("[document.documentElement.scrollWidth, document.documentElement.clientWidth,"
                                       " document.body.scrollWidth]")
                assert widths[0] <= widths[1] and widths[2] <= widths[1], (name, widths)
                if name == "phone":
                    # wide tables scroll inside their own box instead of widening the page
                    boxes = page.evaluate("Array.from(document.querySelectorAll('.scroll')).map("
                                          "d => [d.scrollWidth, d.clientWidth])")
                    assert any(sw > cw for sw, cw in boxes) and all(cw <= 390 for _, cw in boxes)
                    sizes = page.evaluate("Array.from(document.images).map(i => i.getBoundingClientRect().width)")
                    assert all(0 < w <= 390 for w in sizes), sizes
                for folder in _artifacts(tmp_path):
                    page.screenshot(path=str(folder / f"report-{name}.png"), full_page=True)
                page.close()
        finally:
            browser.close()
    assert (tmp_path / "report-phone.png").stat().st_size > 10_000
