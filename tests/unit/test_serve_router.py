"""The confidence cascade over two tiny models, its calibration (against a brute-force threshold
search), staged rollout with state on disk, drift, and forwarding to another OpenAI-compatible server."""

from __future__ import annotations

import json
import logging
import math
import random

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from distillery.serve.app import ServerThread, close_app, create_app
from distillery.serve.calibration import Calibration, choose_threshold, fit_isotonic
from distillery.serve.config import ServeConfig
from distillery.serve.drift import DriftMonitor, psi
from distillery.serve.router import calibrate_config, confidence
from tests.helpers import tiny_llama


@pytest.fixture(scope="module")
def pair(trained_tiny_teacher, chatml_tokenizer):
    """teacher = the trained tiny model; student = an untrained 2-layer one (unsure of everything)."""
    tok = chatml_tokenizer
    return {"student": (tiny_llama(layers=2, seed=3), tok), "teacher": (trained_tiny_teacher, tok)}


def config(**over) -> ServeConfig:
    base = {"models": [{"name": "student", "path": "unused", "price_completion_per_1k": 1.0},
                       {"name": "teacher", "path": "unused", "price_completion_per_1k": 10.0}],
            "router": {"student": "student", "teacher": "teacher", "threshold": 0.5},
            "limits": {"max_tokens": 16}}
    for k, v in over.items():
        base[k] = {**base[k], **v} if isinstance(v, dict) and k in base else v
    return ServeConfig(**base)


# ---------------------------------------------------------------- confidence scores


def test_confidence_scores_from_steps():
    steps = {"logprob": [math.log(0.5), math.log(0.25)], "margin": [0.3, 0.1], "entropy": [1.0, 2.0]}
    assert confidence(steps, "geo_mean_prob") == pytest.approx(math.sqrt(0.5 * 0.25))
    assert confidence(steps, "mean_prob") == pytest.approx(0.375)
    assert confidence(steps, "min_prob") == pytest.approx(0.25)
    assert confidence(steps, "mean_margin") == pytest.approx(0.2)
    assert confidence(steps, "min_margin") == pytest.approx(0.1)
    assert confidence(steps, "neg_entropy") == pytest.approx(math.exp(-1.5))
    assert confidence({"logprob": []}, "geo_mean_prob") == 0.0
    # length-normalised: repeating the same steps does not change any score
    double = {k: v * 2 for k, v in steps.items()}
    for s in ("geo_mean_prob", "mean_prob", "min_prob", "mean_margin", "min_margin", "neg_entropy"):
        assert confidence(double, s) == pytest.approx(confidence(steps, s))


# ---------------------------------------------------------------- calibration


def test_isotonic_fit_pools_violators_and_weights_ties():
    x, y = fit_isotonic([1, 2, 3, 4], [1, 3, 2, 4])
    assert x.tolist() == [1, 2, 3, 4] and y.tolist() == [1, 2.5, 2.5, 4]
    # a tied confidence enters once with its mean label, weighted by its count
    x, y = fit_isotonic([0.2, 0.5, 0.5, 0.5, 0.9], [1, 0, 0, 1, 1])
    assert x.tolist() == [0.2, 0.5, 0.9]
    assert y.tolist() == pytest.approx([0.5, 0.5, 1.0])  # (1 + 0+0+1) / 4 pooled
    assert np.all(np.diff(y) >= 0)


def _brute_force(conf, sq, tq, target):
    """Every distinct way of splitting the prompts by a threshold, quality summed prompt by prompt."""
    x, y = fit_isotonic(conf, sq)
    iso = {c: float(np.interp(c, x, y)) for c in conf}
    cands = [0.0] + [(a + b) / 2 for a, b in zip(sorted(set(conf)), sorted(set(conf))[1:])] + [math.inf]
    best = None
    for t in cands:
        q = sum(iso[c] if c >= t else tqi for c, tqi in zip(conf, tq)) / len(conf)
        share = sum(c < t for c in conf) / len(conf)
        if q >= target * sum(tq) / len(tq) - 1e-12 and (best is None or share < best[1]):
            best = (t, share, q)
    return best


def test_threshold_equals_brute_force_on_real_student_confidences(pair):
    """Confidences of the tiny student's own greedy answers; labels drawn with P(correct) rising with
    confidence (seeded), so the data are noisy the way real agreement labels are."""
    import asyncio

    from distillery.serve.backends import LocalBackend
    from distillery.serve.config import LimitsConfig
    from distillery.serve.metrics import ServeMetrics
    from distillery.serve.router import collect_answers

    model, tok = pair["teacher"]
    backend = LocalBackend("t", model, tok, limits=LimitsConfig(), metrics=ServeMetrics())
    backend.start()
    prompts = [f"Report {i}: the minister said" if i % 2 else f"Fire {i} near Sydney" for i in range(40)]
    try:
        answers = asyncio.run(collect_answers(backend, prompts, chat=False, max_tokens=6, want_scores=True))
    finally:
        backend.batcher.stop()
    conf = [confidence(a["steps"], "geo_mean_prob") for a in answers]
    assert len(set(conf)) > 20  # real, spread-out scores
    lo, hi = min(conf), max(conf)
    rng = random.Random(0)
    for trial in range(5):
        sq = [float(rng.random() < 0.2 + 0.8 * (c - lo) / (hi - lo)) for c in conf]
        tq = [float(rng.random() < 0.9) for _ in conf] if trial % 2 else [1.0] * len(conf)
        for target in (0.6, 0.8, 0.95, 1.0):
            r = choose_threshold(conf, sq, tq, target=target)
            t, share, q = _brute_force(conf, sq, tq, target)
            assert r["threshold"] == t and r["teacher_share"] == pytest.approx(share)
            assert r["expected_quality"] == pytest.approx(q)
            # the curve has a point for every split, shares rising from 0 (student only) to 1 (teacher only)
            shares = [p["teacher_share"] for p in r["curve"]]
            assert shares[0] == 0 and shares[-1] == 1 and shares == sorted(shares)


def test_calibration_round_trips_through_disk(tmp_path):
    cal = Calibration.fit([0.1, 0.4, 0.8, 0.9], [0, 0, 1, 1], score="geo_mean_prob", target=1.0, metric="rouge_l",
                          prompt_tokens=[3, 4, 5, 6])
    assert cal.threshold == pytest.approx(0.6) and cal.teacher_share == 0.5
    cal.save(tmp_path / "router.json")
    back = Calibration.load(tmp_path / "router.json")
    assert back == cal
    # "the teacher always" is +inf in Python and null in the (standard) JSON
    always = Calibration.fit([0.1, 0.2], [0, 0], score="geo_mean_prob", target=0.9, metric="rouge_l")
    always.save(tmp_path / "t.json")
    assert json.loads((tmp_path / "t.json").read_text())["threshold"] is None
    assert math.isinf(Calibration.load(tmp_path / "t.json").threshold)
    (tmp_path / "bad.json").write_text('{"version": 1}')
    with pytest.raises(ValueError, match="missing fields"):
        Calibration.load(tmp_path / "bad.json")


# ---------------------------------------------------------------- the cascade


def _routed(url, prompt="The minister said", **kw):
    r = httpx.post(url + "/v1/completions", json={"model": "router", "prompt": prompt, "max_tokens": 6,
                                                  "temperature": 0, **kw}, timeout=60)
    assert r.status_code == 200, r.text
    return r


def test_cascade_routes_by_threshold_and_says_who_answered(pair):
    # the student's confidence on this prompt, asked directly with scores
    with ServerThread(create_app(config(), preloaded=pair)) as s:
        r = _routed(s.url)
        conf = r.json()["distillery"]["confidence"]
        student_text = httpx.post(s.url + "/v1/completions", json={"model": "student", "prompt": "The minister said",
                                                                   "max_tokens": 6, "temperature": 0}).json()
        teacher_text = httpx.post(s.url + "/v1/completions", json={"model": "teacher", "prompt": "The minister said",
                                                                   "max_tokens": 6, "temperature": 0}).json()
    assert 0 < conf < 1
    for threshold, who, text in ((conf - 1e-9, "student", student_text), (conf + 1e-9, "teacher", teacher_text)):
        app = create_app(config(router={"threshold": threshold}), preloaded=pair)
        with ServerThread(app) as s:
            r = _routed(s.url)
            body = r.json()
            assert r.headers["x-distillery-model"] == who
            assert body["distillery"] == {"routed_to": who, "confidence": pytest.approx(conf),
                                          "threshold": threshold, "usage": body["distillery"]["usage"]}
            assert body["choices"][0]["text"] == text["choices"][0]["text"]
            assert body["model"] == "router" and "_steps" not in body["choices"][0]
            fams = {f.name: f for f in text_string_to_metric_families(httpx.get(s.url + "/metrics").text)}
        routed = {(x.labels["routed_to"], x.labels["model"]): x.value
                  for x in fams["distillery:router_requests"].samples if x.name.endswith("_total")}
        assert routed == {("teacher" if who == "teacher" else "student", who): 1.0}
        cost = {x.labels["route"]: x.value for x in fams["distillery:cost"].samples if x.name.endswith("_total")}
        # the student always generates (price 1/1k), the teacher only when asked (price 10/1k)
        assert cost["student"] == pytest.approx(body["distillery"]["usage"]["student"]["completion_tokens"] / 1000)
        if who == "teacher":
            assert cost["teacher"] == pytest.approx(body["distillery"]["usage"]["teacher"]["completion_tokens"] / 100)


def test_cascade_per_prompt_and_streaming(pair):
    import openai

    app = create_app(config(router={"threshold": 0.0}), preloaded=pair)
    with ServerThread(app) as s:
        client = openai.OpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0)
        # several prompts: each decided alone; with threshold 0 the student answers all
        r = _routed(s.url, prompt=["Fire crews", "The minister", "Police said"]).json()
        assert [c["distillery"]["routed_to"] for c in r["choices"]] == ["student"] * 3
        assert [c["index"] for c in r["choices"]] == [0, 1, 2]
        full = client.chat.completions.create(model="router", messages=[{"role": "user", "content": "Hello"}],
                                              max_tokens=5, temperature=0)
        streamed = client.chat.completions.create(model="router", messages=[{"role": "user", "content": "Hello"}],
                                                  max_tokens=5, temperature=0, stream=True)
        text = "".join(ch.delta.content or "" for chunk in streamed for ch in chunk.choices)
        assert text == full.choices[0].message.content
    app = create_app(config(router={"threshold": 2.0}), preloaded=pair)  # above any confidence: the teacher
    with ServerThread(app) as s:
        with httpx.stream("POST", s.url + "/v1/chat/completions", json={
                "model": "router", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 5,
                "temperature": 0, "stream": True}) as r:
            assert r.headers["x-distillery-model"] == "teacher"
            chunks = [json.loads(line[5:]) for line in r.iter_lines()
                      if line.startswith("data:") and "[DONE]" not in line]
        assert chunks[0]["distillery"]["routed_to"] == "teacher" and chunks[0]["model"] == "router"


def test_calibrate_writes_the_file_the_server_reads(pair, tmp_path):
    cfg = config()
    prompts = [f"Question {i}: what did the minister say about fires?" for i in range(12)]
    cal = calibrate_config(cfg, prompts, out=tmp_path / "router.json", preloaded=pair, max_tokens=6, target=0.5)
    on_disk = json.loads((tmp_path / "router.json").read_text())
    assert on_disk["n"] == 12 and len(on_disk["reference"]["confidence"]) == 12
    assert on_disk["student"] == "student" and on_disk["teacher"] == "teacher"
    assert 0 <= cal.teacher_share <= 1 and cal.expected_quality >= 0.5 * cal.teacher_quality - 1e-12
    served = config(router={"threshold": None, "calibration": str(tmp_path / "router.json")})
    app = create_app(served, preloaded=pair)
    state = app.state.router.state()
    close_app(app)
    assert state["threshold"] == (None if math.isinf(cal.threshold) else cal.threshold)
    assert state["calibration"]["teacher_share"] == cal.teacher_share


# ---------------------------------------------------------------- rollout and drift


def test_rollout_rolls_back_a_failing_candidate_and_remembers(pair, tmp_path):
    state = tmp_path / "rollout.json"
    over = dict(models=[*config().model_dump()["models"],
                        {"name": "candidate", "kind": "openai", "base_url": "http://127.0.0.1:9", "timeout_s": 2}],
                rollout={"candidate": "candidate", "share": 1.0, "state": str(state), "seed": 0,
                         "gate": {"min_requests": 3}})
    app = create_app(config(**over), preloaded=pair)
    with ServerThread(app) as s:
        for _ in range(4):  # the candidate cannot be reached: every query still answered, by the teacher
            assert _routed(s.url).json()["distillery"]["routed_to"] in ("teacher", "student")
        fams = {f.name: f for f in text_string_to_metric_families(httpx.get(s.url + "/metrics").text)}
    saved = json.loads(state.read_text())
    assert saved["status"] == "rolled_back" and saved["events"][-1]["gate"] == "error_rate"
    arms = {x.labels["arm"]: x.value for x in fams["distillery:rollout_requests"].samples if x.name.endswith("_total")}
    assert arms["candidate"] == 3 and arms["current"] == 1  # rolled back after the gate's 3 failures
    rb = [x for x in fams["distillery:rollout_rollbacks"].samples if x.name.endswith("_total")]
    assert rb[0].labels == {"candidate": "candidate", "reason": "error_rate"} and rb[0].value == 1
    # a restarted server keeps the decision: no traffic to the candidate
    again = create_app(config(**over), preloaded=pair)
    assert again.state.router.rollout.share == 0.0 and again.state.router.rollout.pick() == "current"
    close_app(again)


def test_rollout_gate_on_confidence_and_latency(tmp_path):
    from distillery.serve.config import RolloutConfig
    from distillery.serve.rollout import Rollout

    cfg = RolloutConfig(candidate="c", share=0.5, state=tmp_path / "s.json",
                        gate={"min_requests": 5, "max_confidence_drop": 0.1, "max_latency_ratio": 2.0})
    r = Rollout(cfg, "cur")
    for _ in range(5):
        r.record("current", confidence=0.8, latency_s=1.0)
    for _ in range(4):
        r.record("candidate", confidence=0.75, latency_s=1.5)  # within both gates
    r.record("candidate", confidence=0.75, latency_s=1.5)
    assert r.active and r.regression() is None
    for _ in range(10):
        r.record("candidate", confidence=0.5, latency_s=1.5)
    assert not r.active and r.state["events"][-1]["gate"] == "confidence"
    r2 = Rollout(RolloutConfig(candidate="c", share=0.5, state=tmp_path / "l.json", gate={"min_requests": 3}), "cur")
    for _ in range(3):
        r2.record("current", confidence=0.8, latency_s=1.0)
        r2.record("candidate", confidence=0.8, latency_s=3.0)
    assert not r2.active and "latency" in r2.state["events"][-1]["reason"]


def test_psi_and_drift_warning(caplog):
    rng = np.random.default_rng(0)
    ref = rng.normal(0, 1, 2000)
    assert psi(ref, rng.normal(0, 1, 2000)) < 0.02
    shifted = psi(ref, rng.normal(1, 1, 2000))
    assert shifted > 0.5
    # by hand: two equal halves against a 90/10 split, two bins at the median
    assert psi([0, 0, 1, 1], [0] * 9 + [1], bins=2) == pytest.approx((0.9 - 0.5) * math.log(0.9 / 0.5)
                                                                      + (0.1 - 0.5) * math.log(0.1 / 0.5))
    from distillery.serve.metrics import ServeMetrics

    m = ServeMetrics()
    mon = DriftMonitor({"confidence": ref.tolist()}, window=200, min_samples=50, gauge=m.drift,
                       warnings=m.drift_warnings)
    with caplog.at_level(logging.WARNING, logger="distillery.serve.drift"):
        for v in rng.normal(0, 1, 100):
            mon.observe(confidence=float(v))
        assert not caplog.records
        for v in rng.normal(2, 1, 300):
            mon.observe(confidence=float(v))
    assert len(caplog.records) == 1 and "confidence" in caplog.records[0].getMessage()
    assert m.registry.get_sample_value("distillery:drift_psi", {"signal": "confidence"}) > 0.2
    assert m.registry.get_sample_value("distillery:drift_warnings_total", {"signal": "confidence"}) == 1


# ---------------------------------------------------------------- forwarding


def test_remote_backend_forwards_to_another_server(pair):
    upstream_cfg = ServeConfig(models=[{"name": "teacher", "path": "unused"}], limits={"max_tokens": 16})
    with ServerThread(create_app(upstream_cfg, preloaded={"teacher": pair["teacher"]})) as up:
        cfg = ServeConfig(models=[{"name": "student", "path": "unused"},
                                  {"name": "big", "kind": "openai", "base_url": up.url, "remote_model": "teacher"}],
                          router={"student": "student", "teacher": "big", "threshold": 2.0})
        with ServerThread(create_app(cfg, preloaded={"student": pair["student"]})) as s:
            body = {"prompt": "The minister said", "max_tokens": 6, "temperature": 0}
            direct = httpx.post(up.url + "/v1/completions", json={"model": "teacher", **body}).json()
            fwd = httpx.post(s.url + "/v1/completions", json={"model": "big", **body}).json()
            assert fwd["model"] == "big" and fwd["choices"][0]["text"] == direct["choices"][0]["text"]
            routed = httpx.post(s.url + "/v1/completions", json={"model": "router", **body})
            assert routed.headers["x-distillery-model"] == "big"
            assert routed.json()["choices"][0]["text"] == direct["choices"][0]["text"]
            with httpx.stream("POST", s.url + "/v1/chat/completions", json={
                    "model": "big", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "stream": True,
                    "temperature": 0}) as r:
                lines = [line for line in r.iter_lines() if line.startswith("data:")]
            assert lines[-1] == "data: [DONE]" and json.loads(lines[0][5:])["model"] == "big"
            # the upstream's 4xx stays a 4xx with its message; an unreachable upstream is a 502
            bad = httpx.post(s.url + "/v1/completions", json={"model": "big", "prompt": "x", "max_tokens": 999})
            assert bad.status_code == 400 and "max_tokens" in bad.json()["error"]["message"]
    dead = ServeConfig(models=[{"name": "gone", "kind": "openai", "base_url": "http://127.0.0.1:9", "timeout_s": 2}])
    with ServerThread(create_app(dead)) as s:
        r = httpx.post(s.url + "/v1/completions", json={"model": "gone", **body})
        assert r.status_code == 502 and "127.0.0.1:9" in r.json()["error"]["message"]
