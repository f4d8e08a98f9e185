"""The confidence cascade: the student answers; where its confidence in its own answer is below the
threshold, the teacher answers instead. The response says which model answered (a ``distillery``
field on the body and on each choice, and the ``x-distillery-model`` header); ``/metrics`` counts
each route, its tokens and cost, the confidence, and drift against the calibration set.

Confidence scores, from the student's own token distribution at each generated step (the
end-of-sequence step included), all in [0, 1], higher = surer, and length-normalised (a mean, or
a minimum, never a sum):

- ``geo_mean_prob``: exp(mean log-prob of the chosen tokens), the inverse per-token perplexity
- ``mean_prob`` / ``min_prob``: mean / minimum probability of the chosen tokens
- ``mean_margin`` / ``min_margin``: mean / minimum gap between the top-1 and top-2 probabilities
- ``neg_entropy``: exp(-mean entropy), 1 for a certain step, 1/V for a uniform one
"""

from __future__ import annotations

import asyncio
import logging
import math
import statistics
import time
from collections.abc import AsyncIterator

from distillery.serve.backends import Ctx, Stream
from distillery.serve.calibration import Calibration
from distillery.serve.config import SCORES
from distillery.serve.drift import DriftMonitor
from distillery.serve.metrics import ServeMetrics
from distillery.serve.rollout import Rollout
from distillery.serve.schemas import APIError, ChatRequest, CompletionRequest

log = logging.getLogger(__name__)


def confidence(steps: dict, score: str = "geo_mean_prob") -> float:
    """The ``score`` of one answer from its per-step terms (``logprob``, ``margin``, ``entropy``); an
    answer with no scored step has confidence 0 (nothing to trust)."""
    lp = steps.get("logprob") or []
    if not lp:
        return 0.0
    if score == "geo_mean_prob":
        return math.exp(statistics.fmean(lp))
    if score == "mean_prob":
        return statistics.fmean(math.exp(v) for v in lp)
    if score == "min_prob":
        return math.exp(min(lp))
    if score == "mean_margin":
        return statistics.fmean(steps["margin"])
    if score == "min_margin":
        return min(steps["margin"])
    if score == "neg_entropy":
        return math.exp(-statistics.fmean(steps["entropy"]))
    raise ValueError(f"router.score: unknown score {score!r} (one of {', '.join(SCORES)})")


class Cascade:
    """Answers under ``name`` with ``student`` or ``teacher`` (any two backends), per prompt."""

    kind = "router"

    def __init__(self, name: str, student, teacher, *, score: str, threshold: float, metrics: ServeMetrics,
                 candidate=None, rollout: Rollout | None = None, drift: DriftMonitor | None = None,
                 calibration: Calibration | None = None):
        if score not in SCORES:
            raise ValueError(f"router.score: unknown score {score!r} (one of {', '.join(SCORES)})")
        self.name, self.student, self.teacher, self.candidate = name, student, teacher, candidate
        self.score, self.threshold, self.metrics = score, threshold, metrics
        self.rollout, self.drift, self.calibration = rollout, drift, calibration

    def describe(self) -> dict:
        return {"id": self.name, "object": "model", "created": 0, "owned_by": "distillery",
                "router": {"student": self.student.name, "teacher": self.teacher.name, "score": self.score,
                           "threshold": None if math.isinf(self.threshold) else self.threshold}}

    def state(self) -> dict:
        """What the playground and operators see: the policy, calibration summary, rollout and drift."""
        out = self.describe()["router"]
        if self.calibration is not None:
            c = self.calibration
            out["calibration"] = {"target": c.target, "teacher_share": c.teacher_share,
                                  "expected_quality": c.expected_quality, "teacher_quality": c.teacher_quality,
                                  "metric": c.metric, "n": c.n}
        if self.rollout is not None:
            out["rollout"] = self.rollout.describe()
        if self.drift is not None:
            out["drift_psi"] = dict(self.drift.values)
        return out

    # ------------------------------------------------------------ the cascade

    async def completions(self, req: CompletionRequest, ctx: Ctx) -> dict:
        return await self._answer(req, ctx, "completions")

    async def chat(self, req: ChatRequest, ctx: Ctx) -> dict:
        return await self._answer(req, ctx, "chat")

    async def completions_stream(self, req: CompletionRequest, ctx: Ctx) -> Stream:
        return await self._stream(req, ctx, "completions")

    async def chat_stream(self, req: ChatRequest, ctx: Ctx) -> Stream:
        return await self._stream(req, ctx, "chat")

    def _pick_student(self):
        if self.rollout is not None and self.candidate is not None and self.rollout.pick() == "candidate":
            return self.candidate, "candidate"
        return self.student, "current"

    async def _decide(self, req, ctx: Ctx, call: str):
        """The student's answer and, per prompt, its confidence and whether the teacher must answer."""
        student, arm = self._pick_student()
        if self.rollout is not None:
            self.metrics.rollout_requests.labels(arm, student.name).inc()
        t0 = time.perf_counter()
        sctx = Ctx(route="student", want_scores=True, disconnected=ctx.disconnected, arrived=ctx.arrived)
        try:
            body = await getattr(student, call)(req.model_copy(update={"stream": False}), sctx)
        except APIError as e:
            if e.status < 500 and e.status != 429:
                raise  # the request's own fault: the teacher would refuse it too
            # The student is down or overloaded: the teacher answers everything (and a candidate is judged).
            log.warning("router: student %s failed (%s); the teacher answers", student.name, e.message)
            if self.rollout is not None:
                self.rollout.record(arm, error=True)
            return None, student, [0.0] * _n_prompts(req), None
        n = req.n
        choices = body["choices"]
        confs = [min(confidence(c.get("_steps") or {}, self.score) for c in choices[i:i + n])
                 for i in range(0, len(choices), n)]
        if self.rollout is not None:
            self.rollout.record(arm, confidence=statistics.fmean(confs), latency_s=time.perf_counter() - t0)
        return body, student, confs, arm

    async def _answer(self, req, ctx: Ctx, call: str) -> dict:
        return await self._merge(await self._decide(req, ctx, call), req, ctx, call)

    async def _merge(self, decided, req, ctx: Ctx, call: str) -> dict:
        """The answer: the student's choices where it was sure enough, the teacher's elsewhere."""
        body, student, confs, _ = decided
        defer = [i for i, c in enumerate(confs) if c < self.threshold]
        n = req.n
        tbody = None
        if defer:
            treq = _subset(req, defer)
            tctx = Ctx(route="teacher", disconnected=ctx.disconnected, arrived=ctx.arrived)
            tbody = await getattr(self.teacher, call)(treq, tctx)
        choices, answered = [], []
        tchoices = iter((tbody or {}).get("choices", []))
        for i, conf in enumerate(confs):
            from_teacher = i in defer
            src = [next(tchoices) for _ in range(n)] if from_teacher else body["choices"][i * n:(i + 1) * n]
            who = self.teacher.name if from_teacher else student.name
            answered.append(who)
            for j, c in enumerate(src):
                c = {k: v for k, v in c.items() if k != "_steps"}
                c["index"] = i * n + j
                c["distillery"] = self._decision(who, conf)
                choices.append(c)
        out = {**(tbody if body is None else body), "model": self.name, "choices": choices}
        out["usage"] = _add_usage((body or {}).get("usage"), (tbody or {}).get("usage"))
        routed = answered[0] if len(set(answered)) == 1 else "mixed"
        out["distillery"] = {**self._decision(routed, min(confs)),
                             "usage": {k: v["usage"] for k, v in ((student.name, body), (self.teacher.name, tbody))
                                       if v is not None and v.get("usage")}}
        self._count(answered, confs, body, student, tbody)
        return out

    def _decision(self, who: str, conf: float) -> dict:
        return {"routed_to": who, "confidence": conf,
                "threshold": None if math.isinf(self.threshold) else self.threshold}

    def _count(self, answered: list[str], confs: list[float], body, student, tbody) -> None:
        m = self.metrics
        for who, conf in zip(answered, confs):
            role = "teacher" if who == self.teacher.name else "student"
            m.routed.labels(role, who).inc()
            m.confidence.labels(student.name).observe(conf)
        cost = sum(_cost(b, backend) for b, backend in ((body, student), (tbody, self.teacher)) if b is not None)
        m.request_cost.labels("teacher" if tbody is not None else "student").observe(cost)
        if self.drift is not None:
            prompt_tokens = ((body or {}).get("usage") or {}).get("prompt_tokens")
            for conf in confs:
                self.drift.observe(confidence=conf, prompt_tokens=None if prompt_tokens is None
                                   else prompt_tokens / len(confs))

    async def _stream(self, req, ctx: Ctx, call: str) -> Stream:
        """The decision needs the student's whole answer, so it is made first; a question the teacher
        answers alone is then streamed from the teacher as it generates, the rest replayed."""
        body, student, confs, _ = await self._decide(req, ctx, call)
        if len(confs) == 1 and confs[0] < self.threshold:
            tctx = Ctx(route="teacher", disconnected=ctx.disconnected, arrived=ctx.arrived)
            stream = await getattr(self.teacher, call + "_stream")(req, tctx)
            self._count([self.teacher.name], confs, body, student, None)
            decision = self._decision(self.teacher.name, confs[0])
            return Stream(_renamed(stream.chunks, self.name, decision), self.teacher.name, decision)
        full = await self._merge((body, student, confs, None), req, ctx, call)
        return Stream(_replay(full, call, req.include_usage), full["distillery"]["routed_to"], full["distillery"])


def _n_prompts(req) -> int:
    return len(req.prompts()) if isinstance(req, CompletionRequest) else 1


def _subset(req, keep: list[int]):
    """The request restricted to the prompts the teacher must answer."""
    if isinstance(req, CompletionRequest):
        prompts = req.prompts()
        return req.model_copy(update={"prompt": [prompts[i] for i in keep] if len(prompts) > 1 else req.prompt,
                                      "stream": False})
    return req.model_copy(update={"stream": False})


def _add_usage(a: dict | None, b: dict | None) -> dict:
    keys = ("prompt_tokens", "completion_tokens", "total_tokens")
    return {k: (a or {}).get(k, 0) + (b or {}).get(k, 0) for k in keys}


def _cost(body: dict, backend) -> float:
    u = body.get("usage") or {}
    prices = getattr(backend, "prices", None)
    return prices.cost(u.get("prompt_tokens", 0), u.get("completion_tokens", 0)) if prices else 0.0


async def _renamed(chunks: AsyncIterator[dict], name: str, decision: dict) -> AsyncIterator[dict]:
    first = True
    async for chunk in chunks:
        chunk["model"] = name
        if first:
            chunk["distillery"] = decision
            first = False
        yield chunk


async def _replay(body: dict, call: str, include_usage: bool) -> AsyncIterator[dict]:
    """A finished answer as stream chunks: the whole text of each choice, then its finish reason."""
    kind = "chat.completion.chunk" if call == "chat" else "text_completion"
    base = {"id": body["id"], "object": kind, "created": body["created"], "model": body["model"]}
    for n, c in enumerate(body["choices"]):
        if call == "chat":
            first = {"index": c["index"], "delta": {"role": "assistant", "content": c["message"]["content"]},
                     "logprobs": c.get("logprobs"), "finish_reason": None}
            last = {"index": c["index"], "delta": {}, "logprobs": None, "finish_reason": c["finish_reason"]}
        else:
            first = {"index": c["index"], "text": c["text"], "logprobs": c.get("logprobs"), "finish_reason": None}
            last = {"index": c["index"], "text": "", "logprobs": None, "finish_reason": c["finish_reason"]}
        extra = {"distillery": body["distillery"]} if n == 0 else {}
        yield {**base, "choices": [{**first, "distillery": c["distillery"]}], **extra}
        await asyncio.sleep(0)
        yield {**base, "choices": [last]}
    if include_usage:
        yield {**base, "choices": [], "usage": body["usage"]}


# ---------------------------------------------------------------- calibration run


METRICS = ("rouge_l", "exact_match", "token_f1")


def score_answers(predictions: list[str], references: list[str], metric: str) -> list[float]:
    """Per-answer quality on a 0-1 scale (``distillery.evaluate.text``)."""
    from distillery.evaluate import text

    if metric == "rouge_l":
        return text.rouge_l(predictions, references)
    if metric == "exact_match":
        return [text.exact_match(p, r) for p, r in zip(predictions, references, strict=True)]
    if metric == "token_f1":
        return [text.token_f1(p, r) for p, r in zip(predictions, references, strict=True)]
    raise ValueError(f"route calibrate: metric must be one of {', '.join(METRICS)}, got {metric!r}")


async def collect_answers(backend, prompts: list[str], *, chat: bool = True, max_tokens: int = 64,
                          want_scores: bool = False, concurrency: int = 8) -> list[dict]:
    """Greedy answers of ``backend`` to ``prompts``: ``{"text", "steps", "prompt_tokens"}`` each, at most
    ``concurrency`` requests in flight (a local backend batches them)."""
    sem = asyncio.Semaphore(concurrency)

    async def one(p: str) -> dict:
        async with sem:
            ctx = Ctx(route="calibration", want_scores=want_scores)
            if chat:
                body = await backend.chat(ChatRequest(model=backend.name, messages=[{"role": "user", "content": p}],
                                                      max_tokens=max_tokens, temperature=0), ctx)
                text = body["choices"][0]["message"]["content"]
            else:
                body = await backend.completions(CompletionRequest(model=backend.name, prompt=p, max_tokens=max_tokens,
                                                                   temperature=0), ctx)
                text = body["choices"][0]["text"]
            return {"text": text, "steps": body["choices"][0].get("_steps"),
                    "prompt_tokens": body["usage"]["prompt_tokens"]}

    return list(await asyncio.gather(*[one(p) for p in prompts]))


def calibrate(student, teacher, prompts: list[str], **kwargs) -> Calibration:
    """:func:`acalibrate` run to completion (from code that is not already in an event loop)."""
    return asyncio.run(acalibrate(student, teacher, prompts, **kwargs))


async def acalibrate(student, teacher, prompts: list[str], *, references: list[str] | None = None,
                     score: str = "geo_mean_prob", target: float = 0.95, metric: str = "rouge_l", chat: bool = True,
                     max_tokens: int = 64, concurrency: int = 8, out=None) -> Calibration:
    """Calibrate the cascade of two backends on held-out ``prompts`` (see serve/calibration.py).

    Without ``references`` a student answer's quality is its agreement (``metric``) with the teacher's
    answer, and the teacher's is 1; with them, both are scored against the references. Writes the
    calibration to ``out`` (atomically) when given."""
    if not prompts:
        raise ValueError("route calibrate: no prompts")
    if references is not None and len(references) != len(prompts):
        raise ValueError(f"route calibrate: {len(prompts)} prompts but {len(references)} references")
    if metric not in METRICS:
        raise ValueError(f"route calibrate: metric must be one of {', '.join(METRICS)}, got {metric!r}")
    for b in (student, teacher):
        b.start()

    s_ans, t_ans = await asyncio.gather(
        collect_answers(student, prompts, chat=chat, max_tokens=max_tokens, want_scores=True, concurrency=concurrency),
        collect_answers(teacher, prompts, chat=chat, max_tokens=max_tokens, concurrency=concurrency))
    s_text, t_text = [a["text"] for a in s_ans], [a["text"] for a in t_ans]
    if references is None:
        sq, tq = score_answers(s_text, t_text, metric), None
    else:
        sq, tq = score_answers(s_text, references, metric), score_answers(t_text, references, metric)
    conf = [confidence(a["steps"] or {}, score) for a in s_ans]
    cal = Calibration.fit(conf, sq, tq, score=score, target=target,
                          metric=metric + ("" if references is None else " vs references"),
                          prompt_tokens=[a["prompt_tokens"] for a in s_ans], student=student.name,
                          teacher=teacher.name)
    if out is not None:
        cal.save(out)
    return cal


def calibrate_config(config, prompts: list[str], *, out, preloaded: dict | None = None, **kwargs) -> Calibration:
    """``calibrate`` for the router of a :class:`ServeConfig` (its student, teacher and score), what
    ``distillery route calibrate`` runs; ``kwargs`` go to :func:`calibrate`."""
    from distillery.serve.backends import build_backend

    if config.router is None:
        raise ValueError("route calibrate: the serve config has no router (router.student, router.teacher)")
    metrics = ServeMetrics()
    by_name = {m.name: m for m in config.models}
    student, teacher = (build_backend(by_name[n], limits=config.limits, metrics=metrics,
                                      preloaded=(preloaded or {}).get(n))
                        for n in (config.router.student, config.router.teacher))

    async def run() -> Calibration:
        try:
            return await acalibrate(student, teacher, prompts, score=config.router.score, out=out, **kwargs)
        finally:
            for b in (student, teacher):
                await b.aclose()

    return asyncio.run(run())
