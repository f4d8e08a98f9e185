"""The playground page at ``GET /`` in headless Chromium against a running server with a router and an
API key: it asks for the key, lists the models, and shows the answer, which model answered, its
confidence and the threshold; it loads nothing from anywhere but the server."""

from __future__ import annotations

import os

from distillery.serve.app import ServerThread, create_app
from distillery.serve.config import ServeConfig
from tests.helpers import tiny_llama
from tests.unit.test_report import _artifacts, _chromium


def test_playground_shows_who_answered(trained_tiny_teacher, chatml_tokenizer, tmp_path, monkeypatch):
    from playwright.sync_api import sync_playwright

    executable = _chromium()
    tok = chatml_tokenizer
    monkeypatch.setenv("PLAYGROUND_KEY", "k3y")
    cfg = ServeConfig(models=[{"name": "student", "path": "unused"}, {"name": "teacher", "path": "unused"}],
                      router={"student": "student", "teacher": "teacher", "threshold": 0.25},
                      limits={"max_tokens": 8}, api_key_env="PLAYGROUND_KEY")
    app = create_app(cfg, preloaded={"student": (tiny_llama(layers=2, seed=3), tok),
                                     "teacher": (trained_tiny_teacher, tok)})
    with ServerThread(app) as server, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable,
                                    args=["--no-sandbox"] if hasattr(os, "geteuid") and os.geteuid() == 0 else [])
        try:
            for name, viewport in (("desktop", {"width": 1280, "height": 900}),
                                   ("phone", {"width": 390, "height": 844})):
                page = browser.new_page(viewport=viewport)
                errors, requests = [], []
                page.on("pageerror", lambda e, errors=errors: errors.append(str(e)))
                page.on("request", lambda r, requests=requests: requests.append(r.url))
                page.goto(server.url + "/", wait_until="load")
                page.wait_for_function("document.getElementById('status').textContent.length > 0")
                assert "API key" in page.text_content("#status")  # the 401 explained, not a blank page
                page.fill("#key", "k3y")
                page.dispatch_event("#key", "change")
                page.wait_for_function("document.getElementById('model').options.length === 3")
                assert page.eval_on_selector("#model", "s => s.value") == "router"
                page.fill("#max_tokens", "5")
                page.fill("#prompt", "The minister said")
                page.click("#send")
                page.wait_for_function("document.getElementById('routed_to').textContent !== '-'", timeout=60_000)
                who = page.text_content("#routed_to")
                confidence = float(page.text_content("#confidence"))
                assert who in ("student", "teacher") and 0 <= confidence <= 1
                assert (who == "student") == (confidence >= 0.25)
                assert float(page.text_content("#threshold")) == 0.25
                assert page.text_content("#status") == ""
                widths = page.evaluate("[document.documentElement.scrollWidth, document.documentElement.clientWidth]")
                assert widths[0] <= widths[1], (name, widths)
                assert errors == []
                assert all(r.startswith(server.url) for r in requests), requests
                for folder in _artifacts(tmp_path):
                    page.screenshot(path=str(folder / f"playground-{name}.png"), full_page=True)
                page.close()
        finally:
            browser.close()
    registry = app.state.metrics.registry
    assert sum(registry.get_sample_value("distillery:router_requests_total", {"routed_to": r, "model": r}) or 0
               for r in ("student", "teacher")) == 2
