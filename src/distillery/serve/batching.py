"""Dynamic batching: requests from many connections wait in one bounded queue and one worker thread
runs them in shared batches.

The worker takes the oldest waiting job, waits until ``max_batch_size`` jobs of the same kind are
there or the oldest has waited ``max_wait_s``, and runs them together (one ``generate`` call for
``generate`` jobs, one forward pass for ``score`` jobs). A full queue refuses new jobs at once
(:class:`QueueFull`, a 429) rather than letting latency grow without bound. Model code is not
here: ``run(kind, jobs)`` is whatever the backend passes in, so the scheduling is testable alone.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass

log = logging.getLogger(__name__)


class QueueFull(RuntimeError):
    """The queue holds ``max_queue`` jobs already; the message says how many."""


class BatcherStopped(RuntimeError):
    """The batcher was stopped before the job ran."""


@dataclass
class Done:
    """A finished job's output and when it was queued, started and finished (``time.perf_counter``)."""

    output: object
    enqueued_at: float
    started_at: float
    finished_at: float
    batch_size: int

    @property
    def queue_s(self) -> float:
        return self.started_at - self.enqueued_at


@dataclass
class _Pending:
    job: object
    future: Future
    enqueued_at: float


class Batcher:
    def __init__(self, run: Callable[[str, list], list], *, max_batch_size: int = 8, max_wait_s: float = 0.01,
                 max_queue: int = 64, on_state: Callable[[int, int], None] | None = None, name: str = "batcher"):
        if max_batch_size < 1 or max_queue < 1 or max_wait_s < 0:
            raise ValueError(f"{name}: max_batch_size and max_queue must be >= 1 and max_wait_s >= 0, got "
                             f"{max_batch_size}, {max_queue}, {max_wait_s}")
        self.run, self.name = run, name
        self.max_batch_size, self.max_wait_s, self.max_queue = max_batch_size, max_wait_s, max_queue
        self.on_state = on_state
        self._pending: deque[_Pending] = deque()
        self._cond = threading.Condition()
        self._running = 0
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.batches_run = 0  # how many batches of how many jobs in all: the mean batch size
        self.jobs_run = 0

    # ------------------------------------------------------------ lifecycle

    def start(self) -> Batcher:
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self._work, name=self.name, daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Finish the batch in flight; jobs still waiting fail with :class:`BatcherStopped`."""
        with self._cond:
            self._stopping = True
            for p in self._pending:
                getattr(p.job, "cancelled", threading.Event()).set()
                if not p.future.done():
                    p.future.set_exception(BatcherStopped(f"{self.name}: stopped before the job ran"))
            self._pending.clear()
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        self._report()

    # ------------------------------------------------------------ submitting

    @property
    def waiting(self) -> int:
        return len(self._pending)

    @property
    def running(self) -> int:
        return self._running

    def submit(self, job) -> Future:
        """Queue ``job``; its future resolves to a :class:`Done`. Raises :class:`QueueFull`."""
        return self.submit_many([job])[0]

    def submit_many(self, jobs: list) -> list[Future]:
        """Queue all of ``jobs`` or none (a request's n samples are refused together, not half-run)."""
        futures = [Future() for _ in jobs]
        with self._cond:
            if self._stopping or self._thread is None:
                raise BatcherStopped(f"{self.name}: not running")
            if len(self._pending) + len(jobs) > self.max_queue:
                raise QueueFull(f"{self.name}: the queue is full ({len(self._pending)} of {self.max_queue} places "
                                f"taken, {len(jobs)} needed); retry later")
            now = time.perf_counter()
            self._pending.extend(_Pending(j, f, now) for j, f in zip(jobs, futures))
            self._cond.notify_all()
        self._report()
        return futures

    def cancel(self, job) -> None:
        """Mark ``job`` cancelled; a job still waiting leaves the queue at once, one in a batch stops
        at its next token."""
        job.cancelled.set()
        with self._cond:
            for p in list(self._pending):
                if p.job is job:
                    self._pending.remove(p)
                    p.future.cancel()
        self._report()

    async def run_jobs(self, jobs: list) -> list[Done]:
        """Submit from the event loop and wait for all; a cancelled wait (client gone) or a failed job
        cancels the rest."""
        futures = [asyncio.wrap_future(f) for f in self.submit_many(jobs)]
        try:
            return list(await asyncio.gather(*futures))
        except BaseException:
            for job in jobs:
                self.cancel(job)
            raise

    # ------------------------------------------------------------ the worker

    def _take(self) -> list[_Pending] | None:
        with self._cond:
            while not self._pending and not self._stopping:
                self._cond.wait()
            if self._stopping:
                return None
            first = self._pending[0]
            kind = getattr(first.job, "kind", None)
            deadline = first.enqueued_at + self.max_wait_s
            while not self._stopping and self._pending and self._pending[0] is first:
                same = sum(getattr(p.job, "kind", None) == kind for p in self._pending)
                left = deadline - time.perf_counter()
                if same >= self.max_batch_size or left <= 0:
                    break
                self._cond.wait(left)
            if self._stopping:
                return None
            batch = []
            for p in list(self._pending):
                if len(batch) == self.max_batch_size:
                    break
                if getattr(p.job, "kind", None) == kind:
                    self._pending.remove(p)
                    if p.future.set_running_or_notify_cancel():
                        batch.append(p)
            self._running = len(batch)
        return batch

    def _work(self) -> None:
        while True:
            batch = self._take()
            if batch is None:
                return
            if not batch:
                continue
            self._report()
            started = time.perf_counter()
            kind = getattr(batch[0].job, "kind", None)
            try:
                outputs = self.run(kind, [p.job for p in batch])
                finished = time.perf_counter()
                for p, out in zip(batch, outputs):
                    p.future.set_result(Done(out, p.enqueued_at, started, finished, len(batch)))
            except BaseException as e:  # one bad batch fails its requests, never the worker
                log.exception("%s: a batch of %d %s jobs failed", self.name, len(batch), kind)
                for p in batch:
                    if not p.future.done():
                        p.future.set_exception(e)
            finally:
                with self._cond:
                    self._running = 0
                    self.batches_run += 1
                    self.jobs_run += len(batch)
                self._report()

    def _report(self) -> None:
        if self.on_state is not None:
            self.on_state(len(self._pending), self._running)
