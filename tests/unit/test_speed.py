"""Operational metrics on a tiny model: what is counted and how it is summarised (no timing is asserted)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from distillery.evaluate.speed import (
    SpeedError,
    cold_start,
    distribution,
    folder_size,
    measure_setting,
    measure_speed,
    speed_metrics,
)
from tests.helpers import tiny_llama

PROMPTS = ["The minister said on Tuesday that", "Rain fell", "Police say the fire started in a house near the"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: on a loaded machine two threads make each tiny matmul wait on the other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model():
    return tiny_llama(layers=2)


def test_percentiles_are_numpys_on_the_recorded_samples(model, tiny_tokenizer):
    res = measure_setting(model, tiny_tokenizer, PROMPTS, concurrency=4, requests=20, warmup=1, max_new_tokens=3)
    assert res["batches"] == 5 and res["requests"] == 20 == len(res["samples"]["latency_s"])
    for what in ("ttft_s", "tpot_s", "latency_s"):
        samples = np.asarray(res["samples"][what])
        d = res[what]
        assert [d["p50"], d["p95"], d["p99"]] == np.percentile(samples, [50, 95, 99]).tolist()
        assert (d["min"], d["median"], d["max"], d["n"]) == (samples.min(), np.median(samples), samples.max(), 20)
    # per request: first token before the last, and latency = ttft + (n - 1) * tpot
    s = res["samples"]
    for ttft, tpot, lat, n in zip(s["ttft_s"], s["tpot_s"], s["latency_s"], s["tokens"]):
        assert 0 < ttft <= lat and lat == pytest.approx(ttft + (n - 1) * tpot, rel=1e-9)
    assert res["tokens_per_s"] == pytest.approx(res["output_tokens"] / res["wall_s"])


def test_greedy_with_eos_suppressed_counts_max_new_tokens(model, tiny_tokenizer):
    res = measure_setting(model, tiny_tokenizer, PROMPTS, concurrency=8, requests=8, warmup=0, max_new_tokens=5)
    assert res["samples"]["tokens"] == [5] * 8 and res["output_tokens"] == 40


def test_counts_stop_at_the_first_eos_when_eos_is_allowed(tiny_tokenizer):
    m = tiny_llama(layers=2)
    enc = tiny_tokenizer(PROMPTS[0], return_tensors="pt")
    out = m.generate(**enc, do_sample=False, max_new_tokens=6, min_new_tokens=6, pad_token_id=0)
    greedy = out[0, enc.input_ids.shape[1]:]
    # make the third greedy token the end of sequence: the request must stop there (3 tokens)
    m.generation_config.eos_token_id = int(greedy[2])
    expected = next(i + 1 for i, t in enumerate(greedy.tolist()) if t == int(greedy[2]))
    res = measure_setting(m, tiny_tokenizer, [PROMPTS[0]], concurrency=1, requests=2, warmup=0, max_new_tokens=6,
                          ignore_eos=False)
    assert res["samples"]["tokens"] == [expected, expected] and expected <= 3
    assert measure_setting(m, tiny_tokenizer, [PROMPTS[0]], concurrency=1, requests=1, warmup=0, max_new_tokens=6,
                           ignore_eos=True)["samples"]["tokens"] == [6]


def test_result_is_json_and_flat_metrics_match(model, tiny_tokenizer):
    res = measure_speed(model, tiny_tokenizer, PROMPTS, concurrency=(1, 2), requests=2, warmup=1, max_new_tokens=3)
    back = json.loads(json.dumps(res))
    assert back == res
    assert set(res["settings"]) == {"c1_greedy", "c1_sampling", "c2_greedy", "c2_sampling"}
    assert res["machine"]["threads"] == torch.get_num_threads() and res["memory"]["peak_rss_bytes"] > 0
    flat = speed_metrics(res)
    assert flat["latency_p99"] == res["settings"]["c1_greedy"]["latency_s"]["p99"]
    assert flat["ttft_p50_c2_sampling"] == res["settings"]["c2_sampling"]["ttft_s"]["p50"]
    assert flat["tokens_per_s_c2_greedy"] == res["settings"]["c2_greedy"]["tokens_per_s"]
    assert all(isinstance(v, float) for v in flat.values())


def test_sampling_is_seeded(model, tiny_tokenizer):
    from distillery.evaluate.speed import _generation_config, time_batch

    cfg = _generation_config(model, tiny_tokenizer, "sampling", 6, True, {"temperature": 1.5})
    assert cfg.do_sample and cfg.temperature == 1.5
    greedy = _generation_config(model, tiny_tokenizer, "greedy", 6, True, {"temperature": 1.5})
    assert not greedy.do_sample and greedy.min_new_tokens == 6
    with pytest.raises(SpeedError, match="decoding must be one of greedy, sampling"):
        _generation_config(model, tiny_tokenizer, "beam", 6, True, {})
    with pytest.raises(SpeedError, match="at least 1"):
        measure_setting(model, tiny_tokenizer, PROMPTS, concurrency=0)
    assert time_batch(model, tiny_tokenizer, PROMPTS[:2], cfg)["requests"][1]["tokens"] == 6


def test_distribution_and_folder_size(tmp_path, model, tiny_tokenizer):
    assert distribution([]) == {"n": 0}
    assert distribution([3.0, 1.0, 2.0])["p50"] == 2.0
    model.save_pretrained(tmp_path / "m")
    tiny_tokenizer.save_pretrained(tmp_path / "m")
    files = [p for p in (tmp_path / "m").rglob("*") if p.is_file()]
    size = folder_size(tmp_path / "m")
    assert size["size_bytes"] == sum(p.stat().st_size for p in files) and size["files"] == len(files)
    assert size["weights_bytes"] == (tmp_path / "m" / "model.safetensors").stat().st_size
    with pytest.raises(SpeedError, match="is not a folder"):
        folder_size(tmp_path / "missing")


def test_cold_start_in_a_fresh_process(tmp_path, model, tiny_tokenizer):
    model.save_pretrained(tmp_path / "m")
    tiny_tokenizer.save_pretrained(tmp_path / "m")
    res = cold_start(tmp_path / "m", "Rain fell", threads=1)
    run = res["runs"][0]
    assert run["cold_start_s"] == pytest.approx(run["load_s"] + run["first_token_s"])
    assert res["cold_start_s"]["median"] == run["cold_start_s"] and res["threads"] == 1
    assert run["import_s"] > 0 and res["peak_rss_bytes"] > 50 * 2**20  # torch alone is more than that
    with pytest.raises(SpeedError, match="cold start of .* failed"):
        cold_start(tmp_path / "missing")


def test_measure_variants_as_the_evaluate_stage_calls_it(tmp_path, model, tiny_tokenizer):
    from types import SimpleNamespace

    from distillery.evaluate.speed import base_setting, default_prompts, measure_variants

    student = tiny_llama(layers=1, seed=3)
    student.save_pretrained(tmp_path / "student")
    tiny_tokenizer.save_pretrained(tmp_path / "student")
    cfg = SimpleNamespace(requests=4, new_tokens=2, concurrency=[4, 2], sampling=False)
    logs = []
    res = measure_variants({"teacher": model, "student": student}, tiny_tokenizer, cfg, run=tmp_path, warmup=0,
                           log=logs.append)
    assert json.loads(json.dumps(res)) == res
    for name, r in res.items():
        assert set(r["settings"]) == {"c4_greedy", "c2_greedy"}  # sampling off
        # the unsuffixed metrics come from greedy at the lowest concurrency, and the file names it
        assert r["base_setting"] == base_setting(r) == "c2_greedy"
        assert r["metrics"]["latency_p99"] == r["settings"]["c2_greedy"]["latency_s"]["p99"]
        assert r["settings"]["c4_greedy"]["requests"] == 4 and r["settings"]["c2_greedy"]["output_tokens"] == 8
    # only the student has a folder in the run: size on disk and a cold start through the variant loader
    assert "size" not in res["teacher"] and "cold_start" not in res["teacher"]
    assert res["student"]["metrics"]["size_bytes"] == folder_size(tmp_path / "student")["size_bytes"]
    assert res["student"]["cold_start"]["loader"] == "distillery.compress.variants:load_variant"
    assert res["student"]["metrics"]["cold_start_s"] > 0
    assert len(logs) == 2 and logs[1].startswith("speed: student")
    prompts = default_prompts(tiny_tokenizer, n=6)
    assert len(prompts) == 6 and prompts[0].endswith("Reply with the number only.")  # no chat template here
