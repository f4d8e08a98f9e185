"""SIGKILL under load: the server (a separate process, ``python -m distillery.serve``) dies mid-request;
its clients get connection errors, never a broken or wrong answer; the calibration and the rollout
decision it had written survive, and the restarted server serves with them."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import yaml

from distillery.serve.calibration import Calibration

ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(settings: Path, port: int) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "distillery.serve", str(settings), "--port", str(port)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the server exited: {proc.stderr.read().decode()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise AssertionError("the server did not start in 120 s")


def test_sigkill_under_load_loses_no_state(tiny_teacher_dir, tmp_path):
    cal = Calibration.fit([0.1, 0.2, 0.3, 0.6], [0, 0, 1, 1], score="geo_mean_prob", target=0.9, metric="rouge_l",
                          prompt_tokens=[4, 5, 6, 7])
    cal.save(tmp_path / "router.json")
    calibration_bytes = (tmp_path / "router.json").read_bytes()
    settings = tmp_path / "serve.yaml"
    settings.write_text(yaml.safe_dump({
        "models": [{"name": "student", "path": str(tiny_teacher_dir)},
                   {"name": "teacher", "path": str(tiny_teacher_dir)},
                   {"name": "candidate", "kind": "openai", "base_url": "http://127.0.0.1:9", "timeout_s": 1}],
        "router": {"student": "student", "teacher": "teacher", "calibration": str(tmp_path / "router.json")},
        "rollout": {"candidate": "candidate", "share": 1.0, "state": str(tmp_path / "rollout.json"), "seed": 0,
                    "gate": {"min_requests": 2}},
        "limits": {"max_tokens": 200}}))
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    proc = _start(settings, port)
    body = {"model": "router", "prompt": "The minister said", "max_tokens": 3, "temperature": 0}
    try:
        # the candidate cannot be reached: after two failures the rollout returns all traffic
        first = [httpx.post(url + "/v1/completions", json=body, timeout=60) for _ in range(3)]
        assert [r.status_code for r in first] == [200, 200, 200]
        expected = first[-1].json()["choices"][0]["text"]
        rollout = json.loads((tmp_path / "rollout.json").read_text())
        assert rollout["status"] == "rolled_back"

        outcomes, stop = [], threading.Event()

        def client():
            with httpx.Client(timeout=60) as c:
                while not stop.is_set():
                    try:
                        r = c.post(url + "/v1/completions", json={**body, "max_tokens": 150})
                        outcomes.append(("answer", r.status_code, r.json()))
                    except (httpx.TransportError, json.JSONDecodeError) as e:
                        outcomes.append(("error", type(e).__name__, None))
                        return

        threads = [threading.Thread(target=client) for _ in range(4)]
        for t in threads:
            t.start()
        time.sleep(1.5)  # requests in flight
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        stop.set()
        for t in threads:
            t.join(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    errors = [o for o in outcomes if o[0] == "error"]
    assert errors and all(o[1] in ("RemoteProtocolError", "ConnectError", "ReadError") for o in errors), outcomes
    for kind, status, answer in outcomes:
        if kind == "answer":  # what did arrive is whole: a 200 with the full, correct body
            assert status == 200 and answer["choices"][0]["finish_reason"] in ("stop", "length")
    # nothing on disk was lost or torn
    assert (tmp_path / "router.json").read_bytes() == calibration_bytes
    assert json.loads((tmp_path / "rollout.json").read_text()) == rollout
    assert not list(tmp_path.glob(".*.tmp"))

    proc = _start(settings, port)
    try:
        state = httpx.get(url + "/v1/router", timeout=30).json()
        assert state["threshold"] == cal.threshold and state["rollout"]["status"] == "rolled_back"
        assert state["rollout"]["share"] == 0.0
        r = httpx.post(url + "/v1/completions", json=body, timeout=60)
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == expected
    finally:
        proc.kill()
        proc.wait(10)
