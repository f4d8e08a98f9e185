"""Dynamic batching: the scheduler alone (grouping, bounded queue, waiting, cancellation, failures),
and the batched model calls (one generate for rows with different prompts, settings and ends gives
each row what it gets alone)."""

from __future__ import annotations

import asyncio
import threading
import time
from types import SimpleNamespace

import pytest
import torch

from distillery.serve import engine
from distillery.serve.batching import Batcher, BatcherStopped, QueueFull
from distillery.serve.engine import GenJob, ScoreJob, generate_batch, score_batch


def job(kind="generate", value=0):
    return SimpleNamespace(kind=kind, value=value, cancelled=threading.Event())


class Recorder:
    """A ``run`` that records each batch and can be held back until released."""

    def __init__(self):
        self.batches, self.gate = [], threading.Event()
        self.gate.set()

    def __call__(self, kind, jobs):
        self.gate.wait(10)
        self.batches.append((kind, [j.value for j in jobs]))
        return [j.value * 10 for j in jobs]


def test_concurrent_jobs_run_together_up_to_the_batch_size():
    rec = Recorder()
    b = Batcher(rec, max_batch_size=4, max_wait_s=0.5, max_queue=16).start()
    try:
        futures = b.submit_many([job(value=i) for i in range(6)])
        results = [f.result(10) for f in futures]
    finally:
        b.stop()
    assert [r.output for r in results] == [0, 10, 20, 30, 40, 50]
    assert rec.batches == [("generate", [0, 1, 2, 3]), ("generate", [4, 5])]
    assert [r.batch_size for r in results] == [4, 4, 4, 4, 2, 2]
    assert all(r.queue_s >= 0 for r in results)


def test_the_oldest_job_waits_at_most_max_wait():
    rec = Recorder()
    b = Batcher(rec, max_batch_size=8, max_wait_s=0.05, max_queue=16).start()
    try:
        t0 = time.perf_counter()
        done = b.submit(job(value=1)).result(10)
        waited = time.perf_counter() - t0
    finally:
        b.stop()
    assert rec.batches == [("generate", [1])]
    assert 0.04 <= done.queue_s and waited < 2.0


def test_kinds_are_never_mixed_and_order_is_kept():
    rec = Recorder()
    rec.gate.clear()
    b = Batcher(rec, max_batch_size=8, max_wait_s=0.0, max_queue=16).start()
    try:
        first = b.submit(job("generate", 0))
        time.sleep(0.1)  # the worker is now held inside the first batch
        rest = b.submit_many([job("score", 1), job("generate", 2), job("score", 3), job("generate", 4)])
        rec.gate.set()
        for f in [first, *rest]:
            f.result(10)
    finally:
        b.stop()
    assert rec.batches == [("generate", [0]), ("score", [1, 3]), ("generate", [2, 4])]


def test_full_queue_refuses_all_of_a_request_and_cancelled_jobs_leave_it():
    rec = Recorder()
    rec.gate.clear()
    b = Batcher(rec, max_batch_size=1, max_wait_s=0.0, max_queue=3).start()
    try:
        b.submit(job(value=0))
        time.sleep(0.1)  # running, not waiting
        waiting = [job(value=i) for i in (1, 2)]
        futures = b.submit_many(waiting)
        with pytest.raises(QueueFull, match="3 places"):
            b.submit_many([job(value=5), job(value=6)])  # 2 + 2 > 3: neither is queued
        assert b.waiting == 2
        b.cancel(waiting[0])
        assert b.waiting == 1 and futures[0].cancelled() and waiting[0].cancelled.is_set()
        b.submit_many([job(value=7), job(value=8)])
        rec.gate.set()
        futures[1].result(10)
    finally:
        b.stop()
    assert [v for _, vs in rec.batches for v in vs] == [0, 2, 7, 8]


def test_a_failing_batch_fails_its_jobs_only():
    calls = []

    def run(kind, jobs):
        calls.append(len(jobs))
        if len(calls) == 1:
            raise RuntimeError("boom")
        return [j.value for j in jobs]

    b = Batcher(run, max_batch_size=2, max_wait_s=0.0, max_queue=8).start()
    try:
        bad = b.submit(job(value=1))
        with pytest.raises(RuntimeError, match="boom"):
            bad.result(10)
        assert b.submit(job(value=2)).result(10).output == 2
    finally:
        b.stop()
    with pytest.raises(BatcherStopped):
        b.submit(job())


def test_run_jobs_cancelled_from_the_event_loop_cancels_the_jobs():
    rec = Recorder()
    rec.gate.clear()
    b = Batcher(rec, max_batch_size=1, max_wait_s=0.0, max_queue=8).start()
    jobs = [job(value=0), job(value=1)]

    async def go():
        task = asyncio.ensure_future(b.run_jobs(jobs))
        await asyncio.sleep(0.1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    try:
        asyncio.run(go())
        assert all(j.cancelled.is_set() for j in jobs) and b.waiting == 0
    finally:
        rec.gate.set()
        b.stop()


# ---------------------------------------------------------------- the batched model calls


def _alone(model, prompt, n, eos=None):
    ids = torch.tensor([prompt])
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                         pad_token_id=0, eos_token_id=eos)[0, len(prompt):].tolist()
    return out


def test_one_batch_gives_each_row_its_own_greedy_answer(trained_tiny_teacher):
    model = trained_tiny_teacher
    prompts = [[5, 17, 300, 42], [9], [11, 12, 13, 14, 15, 16, 17], [200, 201]]
    lengths = [6, 3, 8, 1]
    jobs = [GenJob(p, n, logprobs=3) for p, n in zip(prompts, lengths)]
    outs = generate_batch(model, jobs, pad_id=0, eos_ids={10**6}, decode=lambda ids: "")
    for p, n, out in zip(prompts, lengths, outs):
        assert out.token_ids == _alone(model, p, n)
        assert out.finish_reason == "length" and len(out.logprobs) == n == len(out.entropy) == len(out.margin)
        # the recorded terms are those of the raw distribution at each step
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=torch.tensor([p + out.token_ids])).logits[0].float(), -1)
        steps = logp[len(p) - 1: len(p) - 1 + n]
        want = steps.gather(-1, torch.tensor(out.token_ids)[:, None])[:, 0]
        assert out.logprobs == pytest.approx(want.tolist(), abs=1e-4)
        probs = steps.exp()
        assert out.entropy == pytest.approx((-(probs * steps).sum(-1)).tolist(), abs=1e-4)
        top2 = probs.topk(2, -1).values
        assert out.margin == pytest.approx((top2[:, 0] - top2[:, 1]).tolist(), abs=1e-4)
        assert [i for i, _ in out.top_logprobs[0]] == steps[0].topk(3).indices.tolist()


def test_rows_stop_at_eos_and_stop_strings(trained_tiny_teacher, tiny_tokenizer):
    model = trained_tiny_teacher
    prompt = tiny_tokenizer("The government said")["input_ids"]
    free = _alone(model, prompt, 12)
    decode = lambda ids: tiny_tokenizer.decode(ids)  # noqa: E731
    eos = free[3]  # pretend the 4th greedy token ends the sequence
    a, other = generate_batch(model, [GenJob(prompt, 12), GenJob([7, 8], 5)], pad_id=0, eos_ids={eos}, decode=decode)
    assert a.token_ids == free[: free.index(eos) + 1] and a.finish_reason == "stop"
    # a stop string first seen at the k-th token of a (seeded, so repeatable) sampled answer ends the row there
    sampled = generate_batch(model, [GenJob(prompt, 12, temperature=1.0, seed=5)], pad_id=0, eos_ids=set(),
                             decode=decode)[0].token_ids
    k = next(k for k in range(2, 12) if decode(sampled[k:k + 1]).strip() and decode(sampled[k:k + 1]).strip()
             not in decode(sampled[:k]))
    stop = decode(sampled[k:k + 1]).strip()
    b, c = generate_batch(model, [GenJob(prompt, 12, temperature=1.0, seed=5, stop=[stop]), GenJob(prompt, 12)],
                          pad_id=0, eos_ids=set(), decode=decode)
    assert b.finish_reason == "stop" and b.stop_text == stop and b.token_ids == sampled[: k + 1]
    assert c.finish_reason == "length" and c.token_ids == free


def test_sampled_rows_depend_on_their_own_seed_only(trained_tiny_teacher):
    model = trained_tiny_teacher
    p = [5, 17, 300]
    alone = generate_batch(model, [GenJob(p, 8, temperature=1.0, seed=11)], pad_id=0, eos_ids=set(),
                           decode=lambda ids: "")[0]
    mixed = generate_batch(model, [GenJob([9, 9], 5, temperature=0.7, seed=3), GenJob(p, 8, temperature=1.0, seed=11),
                                   GenJob([1, 2, 3, 4, 5], 8)], pad_id=0, eos_ids=set(), decode=lambda ids: "")
    assert mixed[1].token_ids == alone.token_ids
    other = generate_batch(model, [GenJob(p, 8, temperature=1.0, seed=12)], pad_id=0, eos_ids=set(),
                           decode=lambda ids: "")[0]
    assert other.token_ids != alone.token_ids


def test_scoring_in_several_passes_equals_one(trained_tiny_teacher, monkeypatch):
    model = trained_tiny_teacher
    jobs = [ScoreJob([5, 17, 300, 42, 9], 4), ScoreJob([1, 2], 4), ScoreJob(list(range(20, 40)), 4)]
    whole = score_batch(model, jobs, pad_id=0)
    monkeypatch.setattr(engine, "SCORE_TOKEN_BUDGET", 8)  # one prompt per pass
    split = score_batch(model, jobs, pad_id=0)
    for a, b, j in zip(whole, split, jobs):
        assert len(a.positions) == len(j.prompt_ids) - 1
        for (lpa, ra, ta), (lpb, rb, tb) in zip(a.positions, b.positions):
            assert lpa == pytest.approx(lpb, abs=1e-5) and ra == rb and [i for i, _ in ta] == [i for i, _ in tb]
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=torch.tensor([j.prompt_ids])).logits[0].float(), -1)
        assert [i for i, _ in a.next_top] == logp[-1].topk(4).indices.tolist()
        rank1 = [(lp, r) for lp, r, _ in a.positions]
        for t, (lp, r) in enumerate(rank1, start=1):
            row = logp[t - 1]
            assert lp == pytest.approx(float(row[j.prompt_ids[t]]), abs=1e-5)
            assert r == int((row > row[j.prompt_ids[t]]).sum()) + 1
