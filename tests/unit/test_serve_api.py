"""The OpenAI-compatible server over a tiny trained model: the official openai client against uvicorn
on a loopback port, vLLM's prompt log-probs (a served teacher round trip), metrics, and 4xx for bad
input with messages naming the field."""

from __future__ import annotations

import asyncio
import threading
import time

import httpx
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from distillery.serve.app import ServerThread, close_app, create_app
from distillery.serve.config import ServeConfig

@pytest.fixture(scope="module")
def served(trained_tiny_teacher, chatml_tokenizer):
    """(model, tokenizer with a ChatML template)."""
    return trained_tiny_teacher, chatml_tokenizer


def make_app(served, **overrides):
    cfg = {"models": [{"name": "tiny", "path": "unused", "batching": {"max_batch_size": 4, "max_wait_ms": 20}}],
           "limits": {"max_tokens": 24, "max_n": 3, "max_logprobs": 20}, **overrides}
    return create_app(ServeConfig(**cfg), preloaded={"tiny": served})


@pytest.fixture(scope="module")
def server(served):
    with ServerThread(make_app(served)) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    import openai

    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def test_openai_client_completions_chat_and_stream(client, served):
    model, tok = served
    c = client.completions.create(model="tiny", prompt="The prime minister said", max_tokens=6, temperature=0)
    assert c.choices[0].finish_reason in ("stop", "length")
    assert c.usage.prompt_tokens == len(tok("The prime minister said")["input_ids"])
    # Greedy text equals the model's own greedy generate on the same prompt.
    ids = tok("The prime minister said", return_tensors="pt")["input_ids"]
    ref = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                         pad_token_id=0, eos_token_id=0)[0, ids.shape[1]:].tolist()
    ref = ref[: ref.index(0)] if 0 in ref else ref
    assert c.choices[0].text == tok.decode(ref, skip_special_tokens=True)
    assert c.usage.completion_tokens == len(ref) + (c.choices[0].finish_reason == "stop")

    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hello"}], max_tokens=5,
                                          temperature=0)
    assert chat.choices[0].message.role == "assistant"
    full = chat.choices[0].message.content

    stream = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hello"}],
                                            max_tokens=5, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    pieces, finish, usage = [], None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for ch in chunk.choices:
            pieces.append(ch.delta.content or "")
            finish = ch.finish_reason or finish
    assert "".join(pieces) == full  # the stream spells the same greedy answer
    assert finish == chat.choices[0].finish_reason
    assert usage.completion_tokens == chat.usage.completion_tokens


def test_models_health_and_header(server):
    models = httpx.get(server.url + "/v1/models").json()
    assert [m["id"] for m in models["data"]] == ["tiny"]
    assert httpx.get(server.url + "/health").json()["status"] == "ok"
    r = httpx.post(server.url + "/v1/completions", json={"model": "tiny", "prompt": "Hi", "max_tokens": 2})
    assert r.headers["x-distillery-model"] == "tiny"


def test_seeded_sampling_is_reproducible_and_n_choices(client):
    kw = dict(model="tiny", prompt="Police said", max_tokens=8, temperature=1.0, seed=7, n=3)
    a, b = client.completions.create(**kw), client.completions.create(**kw)
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert len({c.text for c in a.choices}) > 1  # seed + j per sample: not three copies


def test_metrics_parse_with_vllm_style_names(server, client):
    client.completions.create(model="tiny", prompt="Rain fell", max_tokens=4, temperature=0)
    text = httpx.get(server.url + "/metrics").text
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    for name in ("distillery:time_to_first_token_seconds", "distillery:inter_token_latency_seconds",
                 "distillery:e2e_request_latency_seconds", "distillery:request_queue_time_seconds",
                 "distillery:num_requests_running", "distillery:num_requests_waiting",
                 "distillery:prompt_tokens", "distillery:generation_tokens"):
        assert name in fams, name
    gen = [s for s in fams["distillery:generation_tokens"].samples if s.name.endswith("_total")]
    assert gen and gen[0].labels == {"model": "tiny", "route": "direct"} and gen[0].value >= 4
    e2e = [s for s in fams["distillery:e2e_request_latency_seconds"].samples if s.name.endswith("_count")]
    assert e2e[0].value >= 1


def test_served_teacher_round_trip_matches_local_logprobs(server, served):
    """distillery's ServedTeacher (vLLM's prompt_logprobs protocol) pointed at our server gets the
    top-k log-probs the model computes locally, at every real position of a padded batch."""
    from distillery.signals.served import ServedTeacher

    model, _ = served
    k = 5
    teacher = ServedTeacher(server.url, "tiny", tokenizer_fingerprint="fp", top_k=k)
    ids = torch.tensor([[5, 17, 300, 42, 9, 77], [0, 0, 11, 12, 13, 14]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1]])
    sig = teacher(ids, mask)
    for b in range(2):
        real = ids[b][mask[b].bool()]
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=real[None]).logits[0].float(), -1)
        vals, top = logp.topk(k, dim=-1)
        where = mask[b].nonzero().flatten()
        assert torch.equal(sig.topk_ids[b, where], top)
        torch.testing.assert_close(sig.topk_logprobs[b, where], vals, atol=1e-5, rtol=0)


def test_echo_logprobs_with_max_tokens_zero_scores_the_prompt(server, served):
    model, tok = served
    r = httpx.post(server.url + "/v1/completions", json={"model": "tiny", "prompt": "Fire crews were", "echo": True,
                                                         "logprobs": 2, "max_tokens": 0}).json()
    ch = r["choices"][0]
    ids = tok("Fire crews were")["input_ids"]
    assert ch["text"] == "Fire crews were" and r["usage"]["completion_tokens"] == 0
    lp = ch["logprobs"]
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None and len(lp["tokens"]) == len(ids)
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), -1)
    want = [float(logp[t - 1, ids[t]]) for t in range(1, len(ids))]
    assert lp["token_logprobs"][1:] == pytest.approx(want, abs=1e-5)
    assert all(len(d) >= 2 for d in lp["top_logprobs"][1:])


BAD = [
    ({"model": "tiny"}, 400, "prompt"),
    ({"model": "tiny", "prompt": "x", "max_tokens": -1}, 400, "max_tokens"),
    ({"model": "tiny", "prompt": "x", "max_tokens": 10**9}, 400, "max_tokens"),
    ({"model": "tiny", "prompt": "x", "n": 50}, 400, "n"),
    ({"model": "tiny", "prompt": "x", "logprobs": 999}, 400, "logprobs"),
    ({"model": "tiny", "prompt": "x", "prompt_logprobs": 999, "max_tokens": 1}, 400, "prompt_logprobs"),
    ({"model": "tiny", "prompt": [10**7]}, 400, "prompt"),
    ({"model": "tiny", "prompt": ["a", 3]}, 400, "prompt"),
    ({"model": "tiny", "prompt": "x", "temperature": -1}, 400, "temperature"),
    ({"model": "tiny", "prompt": "x", "bogus": 1}, 400, "bogus"),
    ({"model": "tiny", "prompt": "x " * 400}, 400, "prompt"),  # longer than the model's 256 positions
    ({"model": "nope", "prompt": "x"}, 404, "model"),
]


@pytest.mark.parametrize("body,status,param", BAD)
def test_bad_requests_get_4xx_naming_the_field(server, body, status, param):
    r = httpx.post(server.url + "/v1/completions", json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param and param in err["message"] and err["type"]


def test_malformed_json_and_bad_chat(server):
    r = httpx.post(server.url + "/v1/completions", content=b'{"model": "tiny",',
                   headers={"content-type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    r = httpx.post(server.url + "/v1/chat/completions", json={"model": "tiny", "messages": [{"role": "robot",
                                                                                              "content": "x"}]})
    assert r.status_code == 400 and "messages" in r.json()["error"]["message"]
    r = httpx.post(server.url + "/v1/chat/completions", json={"model": "tiny", "messages": []})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    assert httpx.get(server.url + "/v1/nothing").status_code == 404
    # still serving after all that
    ok = httpx.post(server.url + "/v1/completions", json={"model": "tiny", "prompt": "ok", "max_tokens": 1})
    assert ok.status_code == 200


def test_oversized_body_and_request(served):
    from fastapi.testclient import TestClient

    app = make_app(served, limits={"max_body_bytes": 2048, "max_tokens": 4},
                   models=[{"name": "tiny", "path": "unused", "batching": {"max_queue": 4}}])
    c = TestClient(app)
    r = c.post("/v1/completions", json={"model": "tiny", "prompt": "x" * 5000})
    assert r.status_code == 413 and "2048" in r.json()["error"]["message"]
    r = c.post("/v1/completions", json={"model": "tiny", "prompt": ["a", "b", "c"], "n": 2})
    assert r.status_code == 400 and "3 prompts x n=2" in r.json()["error"]["message"]
    close_app(app)


def test_api_key_on_every_endpoint_but_health(served, monkeypatch):
    monkeypatch.setenv("TEST_SERVE_KEY", "s3cret")
    with ServerThread(make_app(served, api_key_env="TEST_SERVE_KEY")) as s:
        body = {"model": "tiny", "prompt": "x", "max_tokens": 1}
        assert httpx.get(s.url + "/health").status_code == 200
        for path in ("/v1/models", "/metrics"):
            assert httpx.get(s.url + path).status_code == 401
        r = httpx.post(s.url + "/v1/completions", json=body, headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert httpx.post(s.url + "/v1/completions", json=body,
                          headers={"Authorization": "Bearer s3cret"}).status_code == 200
        import openai

        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=s.url + "/v1", api_key="wrong", max_retries=0).models.list()


def test_full_queue_answers_429_and_recovers(served, monkeypatch):
    app = make_app(served, models=[{"name": "tiny", "path": "unused",
                                    "batching": {"max_batch_size": 1, "max_wait_ms": 0, "max_queue": 2}}])
    batcher = app.state.backends["tiny"].batcher
    gate, real = threading.Event(), batcher.run

    def held(kind, jobs):  # the model is "busy" until the test lets it go
        gate.wait(30)
        return real(kind, jobs)

    monkeypatch.setattr(batcher, "run", held)
    body = {"model": "tiny", "prompt": "The", "max_tokens": 4, "temperature": 0}

    async def until(cond):
        deadline = time.monotonic() + 30
        while not cond() and time.monotonic() < deadline:
            await asyncio.sleep(0.01)

    with ServerThread(app) as s:
        async def scenario():
            async with httpx.AsyncClient(base_url=s.url, timeout=60) as c:
                running = asyncio.ensure_future(c.post("/v1/completions", json=body))
                await until(lambda: batcher.running == 1)
                queued = [asyncio.ensure_future(c.post("/v1/completions", json=body)) for _ in range(2)]
                await until(lambda: batcher.waiting == 2)
                refused = [await c.post("/v1/completions", json=body) for _ in range(3)]
                gate.set()
                return [await running, *[await q for q in queued]], refused

        served_ok, refused = asyncio.run(scenario())
        assert [r.status_code for r in refused] == [429] * 3
        assert all(r.json()["error"]["code"] == "queue_full" for r in refused)
        assert [r.status_code for r in served_ok] == [200] * 3
        r = httpx.post(s.url + "/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 1})
        assert r.status_code == 200


def test_concurrent_requests_share_batches(served, monkeypatch):
    app = make_app(served)  # batches of up to 4
    batcher = app.state.backends["tiny"].batcher
    gate, real = threading.Event(), batcher.run

    def held(kind, jobs):
        gate.wait(30)
        return real(kind, jobs)

    monkeypatch.setattr(batcher, "run", held)
    with ServerThread(app) as s:
        async def burst():
            async with httpx.AsyncClient(base_url=s.url, timeout=60) as c:
                reqs = [asyncio.ensure_future(c.post("/v1/completions", json={
                    "model": "tiny", "prompt": f"Story {i}", "max_tokens": 3 + i, "temperature": 0}))
                    for i in range(8)]
                deadline = time.monotonic() + 30
                while batcher.waiting + batcher.running < 8 and time.monotonic() < deadline:
                    await asyncio.sleep(0.01)
                gate.set()  # all 8 in: at most 4 in the held batch, the rest in batches of up to 4
                return await asyncio.gather(*reqs)

        rs = asyncio.run(burst())
    assert all(r.status_code == 200 for r in rs)
    assert batcher.jobs_run == 8 and batcher.batches_run in (2, 3)
    # per-row max_tokens in a shared batch: each got at most what it asked for
    assert all(r.json()["usage"]["completion_tokens"] <= 3 + i for i, r in enumerate(rs))


def test_client_disconnect_cancels_generation(served, monkeypatch):
    """A streaming client that goes away stops its row: far fewer tokens are generated than asked."""
    app = make_app(served, limits={"max_tokens": 200, "max_n": 1})
    backend = app.state.backends["tiny"]
    outputs, real_run, real_forward = [], backend.batcher.run, backend.model.forward

    def run(kind, jobs):
        outputs.extend(real_run(kind, jobs))
        return outputs[-len(jobs):]

    def slow_forward(*a, **kw):  # 200 steps take ~2 s, far longer than noticing the hang-up
        time.sleep(0.01)
        return real_forward(*a, **kw)

    monkeypatch.setattr(backend.batcher, "run", run)
    monkeypatch.setattr(backend.model, "forward", slow_forward)
    with ServerThread(app) as s:
        with httpx.Client(base_url=s.url, timeout=30) as c:
            with c.stream("POST", "/v1/completions", json={"model": "tiny", "prompt": "A", "max_tokens": 200,
                                                           "temperature": 1.0, "seed": 1, "stream": True}) as r:
                for line in r.iter_lines():
                    if line.startswith("data:"):
                        break  # first token seen: hang up
        deadline = time.monotonic() + 10
        while not outputs and time.monotonic() < deadline:
            time.sleep(0.05)
    assert outputs and outputs[0].finish_reason == "cancelled"
    assert len(outputs[0].token_ids) < 100


def test_failing_batch_does_not_take_the_server_down(served, monkeypatch):
    app = make_app(served)
    backend = app.state.backends["tiny"]
    calls = {"n": 0}
    real = backend._run

    def flaky(kind, jobs):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("simulated device failure")
        return real(kind, jobs)

    monkeypatch.setattr(backend.batcher, "run", flaky)
    with ServerThread(app) as s:
        r = httpx.post(s.url + "/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 2})
        assert r.status_code == 500 and "simulated device failure" in r.json()["error"]["message"]
        r = httpx.post(s.url + "/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 2})
        assert r.status_code == 200
