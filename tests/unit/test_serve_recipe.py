"""`distillery route calibrate` and the served recipe on the tiny teacher: the threshold lands in the run
folder, and a server built from the recipe answers through the router with the calibrated threshold."""

from __future__ import annotations

import json

import yaml
from openai import OpenAI
from typer.testing import CliRunner

from distillery.cli import app
from distillery.recipe import load_recipe
from distillery.serve.app import ServerThread, create_app
from distillery.serve.from_recipe import serve_config
from tests.helpers import tiny_recipe


def test_route_calibrate_then_serve_the_recipe(tiny_teacher_dir, lee_file, tmp_path):
    recipe = tiny_recipe(tmp_path, tiny_teacher_dir, lee_file,
                         distill={"steps": 4, "eval_every": 4, "eval_blocks": 2, "checkpoint_every": 4,
                                  "warmup_steps": 1},
                         evaluate={"eval_blocks": 2, "calibration": False},
                         serve={"port": 0, "calibrate": {"prompts": {"kind": "tasks", "limit": 12},
                                                         "max_tokens": 6, "chat": False}})
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    runner = CliRunner()
    refused = runner.invoke(app, ["serve", str(path)])
    assert refused.exit_code == 2 and "distillery run" in refused.output, refused.output
    assert runner.invoke(app, ["run", str(path)]).exit_code == 0
    refused = runner.invoke(app, ["serve", str(path)])
    assert refused.exit_code == 2 and "route calibrate" in refused.output, refused.output
    result = runner.invoke(app, ["route", "calibrate", str(path)])
    assert result.exit_code == 0, result.output
    cal = json.loads((tmp_path / "runs" / "v" / "router.json").read_text())
    assert 0.0 <= cal["teacher_share"] <= 1.0 and "threshold" in cal
    from distillery.report.html import write_report

    page = write_report(tmp_path / "runs" / "v").read_text()
    assert 'id="router"' in page and "calibration prompts" in page  # the cost-quality curve is in the report
    config, preloaded = serve_config(load_recipe(path))
    with ServerThread(create_app(config, preloaded=preloaded)) as server:
        client = OpenAI(base_url=f"{server.url}/v1", api_key="unused")
        names = {m.id for m in client.models.list()}
        assert {"student", "teacher", "router"} <= names
        answer = client.completions.create(model="router", prompt="The news today", max_tokens=4)
        routed = answer.model_extra["distillery"]
        assert routed["routed_to"] in ("student", "teacher") and routed["threshold"] == cal["threshold"]
