"""Fuzzing the server's own OpenAPI schema with schemathesis (valid and deliberately invalid
requests, a bounded number of each) never yields a 5xx, and every 4xx has an OpenAI-style body."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings

from distillery.serve.app import close_app, create_app
from distillery.serve.config import ServeConfig

EXAMPLES = 30  # per operation and mode: bounded, a few seconds on the tiny model


@pytest.fixture(scope="module")
def app(trained_tiny_teacher, chatml_tokenizer):
    tok = chatml_tokenizer
    # Small limits keep each fuzzed generation short; the router is fuzzed along with the models.
    cfg = ServeConfig(models=[{"name": "tiny", "path": "unused"}, {"name": "other", "path": "unused"}],
                      router={"student": "other", "teacher": "tiny", "threshold": 0.5},
                      limits={"max_tokens": 4, "max_n": 2, "max_logprobs": 5})
    app = create_app(cfg, preloaded={"tiny": (trained_tiny_teacher, tok), "other": (trained_tiny_teacher, tok)})
    yield app
    close_app(app)


@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_schema_fuzzing_never_gives_5xx(app, mode):
    import schemathesis
    from schemathesis import GenerationMode

    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    operations = [op.ok() for op in schema.get_all_operations()]
    assert {f"{o.method.upper()} {o.path}" for o in operations} >= {"POST /v1/completions", "POST /v1/chat/completions",
                                                                   "GET /v1/models", "GET /health", "GET /metrics"}
    seen, seen_bodies = set(), []
    for op in operations:
        if mode == "negative" and op.method.upper() != "POST":
            continue  # an endpoint without parameters has no invalid input to generate
        @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
        @given(op.as_strategy(GenerationMode(mode)))
        def check(case):
            if mode == "positive" and isinstance(case.body, dict) and "model" in case.body:
                # A random model name is just a 404; name a served one so the fuzzed fields reach generation.
                case.body["model"] = ("tiny", "router", "other", case.body["model"])[len(seen_bodies) % 4]
            seen_bodies.append(case.body)
            r = case.call()
            assert r.status_code < 500, (case.body, r.status_code, r.text[:500])
            seen.add(r.status_code)
            if r.status_code >= 400:
                err = r.json()["error"]
                assert err["message"] and err["type"]

        check()
    assert seen & {400, 404} if mode == "negative" else 200 in seen
