"""What answers a completion or chat request: a model in this process (:class:`LocalBackend`, with
dynamic batching) or any OpenAI-compatible server (:class:`RemoteBackend`: vLLM, llama.cpp's server,
another Distillery), for the student, the teacher or both.

Both take the validated request and a :class:`Ctx` and return the OpenAI response body, or a
:class:`Stream` of chunks. With ``ctx.want_scores`` each choice also carries ``_steps`` (per-token
log-prob, top-1/top-2 probability margin and entropy) for the router's confidence score; the
router removes it before answering.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

from distillery.serve import openai_format as fmt
from distillery.serve.batching import Batcher, BatcherStopped, Done, QueueFull
from distillery.serve.config import BatchingConfig, LimitsConfig, ModelConfig
from distillery.serve.engine import GenJob, GenOutput, ScoreJob, ScoreOutput, entropy_bound, generate_batch, score_batch
from distillery.serve.metrics import Prices, ServeMetrics, Timing
from distillery.serve.schemas import APIError, ChatRequest, CompletionRequest

log = logging.getLogger(__name__)

DISCONNECT_POLL_S = 0.2


class ClientGone(Exception):
    """The client closed the connection; its generation was cancelled."""


@dataclass
class Ctx:
    route: str = "direct"  # metrics label: direct, student or teacher
    want_scores: bool = False
    disconnected: Callable[[], Awaitable[bool]] | None = None
    arrived: float = field(default_factory=time.perf_counter)


@dataclass
class Stream:
    """Chunks of a streamed answer, and which model produces them (the ``x-distillery-model`` header)."""

    chunks: AsyncIterator[dict]
    model: str
    extra: dict | None = None  # added to the first chunk (the router's decision)


async def wait_watching(aw: Awaitable, ctx: Ctx):
    """Await ``aw``, checking every few tenths of a second whether the client is still there;
    when it is gone, cancel ``aw`` (which cancels its generation) and raise :class:`ClientGone`."""
    task = asyncio.ensure_future(aw)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if done:
                return task.result()
            if ctx.disconnected is not None and await ctx.disconnected():
                raise ClientGone("client disconnected")
    finally:
        if not task.done():
            task.cancel()


# ---------------------------------------------------------------- in-process model


class LocalBackend:
    """A transformers model and tokenizer in this process, its requests batched by a :class:`Batcher`."""

    kind = "transformers"

    def __init__(self, name: str, model, tokenizer, *, limits: LimitsConfig, metrics: ServeMetrics,
                 batching: BatchingConfig = BatchingConfig(), prices: Prices = Prices()):
        self.name, self.model, self.tok = name, model.eval(), tokenizer
        self._token_text: dict[int, str] = {}
        self.limits, self.metrics, self.prices = limits, metrics, prices
        if self.tok.pad_token_id is None:
            self.tok.pad_token = self.tok.eos_token
        eos = model.generation_config.eos_token_id if model.generation_config.eos_token_id is not None \
            else self.tok.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos]) - {None}
        self.vocab = model.get_output_embeddings().weight.shape[0]
        self.context = int(getattr(model.config, "max_position_embeddings", 0) or limits.max_prompt_tokens or 2048)
        self.batcher = Batcher(self._run, max_batch_size=batching.max_batch_size,
                               max_wait_s=batching.max_wait_ms / 1000, max_queue=batching.max_queue,
                               on_state=metrics.queue_state(name), name=f"batcher[{name}]")

    def start(self) -> None:
        self.batcher.start()

    async def aclose(self) -> None:
        self.batcher.stop()

    def describe(self) -> dict:
        return {"id": self.name, "object": "model", "created": 0, "owned_by": "distillery",
                "max_model_len": self.context}

    # ------------------------------------------------------------ model calls (worker thread)

    def _run(self, kind: str, jobs: list):
        if kind == "score":
            return score_batch(self.model, jobs, pad_id=self.tok.pad_token_id)
        return generate_batch(self.model, jobs, pad_id=self.tok.pad_token_id, eos_ids=self.eos_ids,
                              decode=self._decode)

    def _decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    def _decode_one(self, token: int) -> str:
        # Memoised: a served teacher's top-k prompt log-probs name k tokens per position (k x tokens calls).
        text = self._token_text.get(token)
        if text is None:
            text = self._token_text[token] = self.tok.decode([token])
        return text

    # ------------------------------------------------------------ requests to jobs

    def _max_tokens(self, asked: int | None) -> int:
        if asked is None:  # the default never exceeds the cap: a request that names none must not fail
            return min(self.limits.default_max_tokens, self.limits.max_tokens)
        n = asked
        if n > self.limits.max_tokens:
            raise APIError(400, f"max_tokens: {n} is more than this server allows ({self.limits.max_tokens})",
                           param="max_tokens")
        return n

    def _check(self, req, prompts: list[list[int]], max_tokens: int) -> None:
        if req.n > self.limits.max_n:
            raise APIError(400, f"n: {req.n} is more than this server allows ({self.limits.max_n})", param="n")
        for name in ("logprobs", "top_logprobs", "prompt_logprobs"):
            asked = getattr(req, name, None)
            if isinstance(asked, int) and not isinstance(asked, bool) and asked > self.limits.max_logprobs:
                raise APIError(400, f"{name}: {asked} is more than this server allows ({self.limits.max_logprobs})",
                               param=name)
        if len(prompts) * req.n > self.batcher.max_queue:
            raise APIError(400, f"prompt: {len(prompts)} prompts x n={req.n} sequences is more than this server "
                           f"queues at once ({self.batcher.max_queue})", param="prompt")
        cap = min(self.limits.max_prompt_tokens or self.context, self.context)
        for i, p in enumerate(prompts):
            where = "prompt" if len(prompts) == 1 else f"prompt[{i}]"
            if not p:
                raise APIError(400, f"{where}: the prompt is empty after tokenisation", param="prompt")
            bad = next((t for t in p if t >= self.vocab), None)
            if bad is not None:
                raise APIError(400, f"{where}: token id {bad} is outside the vocabulary (0..{self.vocab - 1})",
                               param="prompt")
            if len(p) > cap:
                raise APIError(400, f"{where}: {len(p)} tokens, more than this model's limit of {cap}",
                               param="prompt", code="context_length_exceeded")
            if len(p) + max_tokens > self.context:
                raise APIError(400, f"{where}: {len(p)} prompt tokens + max_tokens {max_tokens} exceed this "
                               f"model's context of {self.context} tokens", param="max_tokens",
                               code="context_length_exceeded")

    def _encode(self, req: CompletionRequest) -> tuple[list[list[int]], list[str]]:
        ids, texts = [], []
        for p in req.prompts():
            if isinstance(p, str):
                if not p:
                    raise APIError(400, "prompt: must not be empty", param="prompt")
                ids.append(self.tok(p)["input_ids"])
                texts.append(p)
            else:
                ids.append(list(p))
                texts.append("")  # decoded after the vocabulary check
        return ids, texts

    def _gen_jobs(self, req, prompts: list[list[int]], max_tokens: int, logprobs: int | None) -> list[GenJob]:
        return [GenJob(p, max_tokens, req.temperature, req.top_p,
                       None if req.seed is None else (req.seed + j) % 2**63, logprobs, req.stops)
                for p in prompts for j in range(req.n)]

    async def _submit(self, jobs: list, ctx: Ctx) -> list[Done]:
        if not jobs:
            return []
        try:
            return await wait_watching(self.batcher.run_jobs(jobs), ctx)
        except QueueFull as e:
            raise APIError(429, f"model {self.name}: {e}", code="queue_full") from None
        except BatcherStopped as e:
            raise APIError(503, f"model {self.name}: {e}") from None

    def _timing(self, done: Done | None, out: GenOutput | None, ctx: Ctx) -> Timing:
        times = out.token_times if out is not None else []
        return Timing(queue_s=done.queue_s if done is not None else None,
                      ttft_s=(times[0] - ctx.arrived) if times else None,
                      itl_s=tuple(b - a for a, b in zip(times, times[1:])),
                      e2e_s=time.perf_counter() - ctx.arrived)

    def _record(self, ctx: Ctx, prompt_tokens: int, out: GenOutput | None, done: Done | None) -> None:
        self.metrics.record(self.name, ctx.route, prompt_tokens=prompt_tokens,
                            completion_tokens=len(out.token_ids) if out else 0,
                            finish_reason=out.finish_reason if out else "length",
                            timing=self._timing(done, out, ctx), prices=self.prices)

    def _text(self, out: GenOutput) -> str:
        text = self._decode([t for t in out.token_ids if t not in self.eos_ids])
        if out.stop_text and out.stop_text in text:
            text = text[: text.index(out.stop_text)]
        return text

    @staticmethod
    def _steps(out: GenOutput) -> dict:
        return {"logprob": out.logprobs, "margin": out.margin, "entropy": out.entropy}

    # ------------------------------------------------------------ /v1/completions

    async def completions(self, req: CompletionRequest, ctx: Ctx) -> dict:
        prompts, texts = self._encode(req)
        max_tokens = self._max_tokens(req.max_tokens)
        k = max(req.logprobs or 0, req.prompt_logprobs or 0)
        self._check(req, prompts, max_tokens)
        texts = [t or self._decode(p) for t, p in zip(texts, prompts)]
        scored = (req.echo and req.logprobs is not None) or req.prompt_logprobs is not None
        score_jobs = [ScoreJob(p, max(k, 1)) for p in prompts] if scored else []
        # A greedy one-token answer (how a served teacher asks) is read off the scoring pass itself.
        from_score = scored and max_tokens == 1 and req.temperature == 0 and not req.stops
        gen_jobs = self._gen_jobs(req, prompts, max_tokens, req.logprobs) if max_tokens and not from_score else []
        done = await self._submit(score_jobs + gen_jobs, ctx)
        score_done, gen_done = done[: len(score_jobs)], done[len(score_jobs):]
        name = fmt.TokenNames(self._decode_one, req.return_tokens_as_token_ids)
        choices = []
        for i, prompt in enumerate(prompts):
            sc: ScoreOutput | None = score_done[i].output if score_done else None
            for j in range(req.n):
                idx = i * req.n + j
                out, d = None, score_done[i] if score_done else None  # max_tokens 0: the prompt only
                if from_score:
                    out = self._one_token(sc, req.logprobs)
                elif max_tokens:
                    out, d = gen_done[idx].output, gen_done[idx]
                self._record(ctx, len(prompt) if j == 0 else 0, out, d)
                choices.append(self._completion_choice(idx, req, prompt, texts[i], sc, out, name, ctx))
        n_prompt = sum(len(p) for p in prompts)
        n_gen = sum(len(c.pop("_n_tokens")) for c in choices)
        return fmt.envelope("text_completion", fmt.new_id("cmpl"), self.name, choices, fmt.usage(n_prompt, n_gen))

    def _one_token(self, sc: ScoreOutput, k: int | None) -> GenOutput:
        logp = sc.next_logprobs
        token = int(logp.argmax())
        top2 = logp.exp().topk(2).values
        probs = logp.exp()
        entropy = float(-(probs * logp).nan_to_num().sum())
        top = sc.next_top[:k] if k else ([] if k == 0 else None)
        reason = "stop" if token in self.eos_ids else "length"
        return GenOutput([token], reason, [float(logp[token])], [top] if top is not None else None, [entropy],
                         [float(top2[0] - top2[1])])

    def _completion_choice(self, idx: int, req: CompletionRequest, prompt: list[int], prompt_text: str,
                           sc: ScoreOutput | None, out: GenOutput | None, name: fmt.TokenNames, ctx: Ctx) -> dict:
        gen_ids = out.token_ids if out else []
        text = self._text(out) if out else ""
        choice = {"index": idx, "text": (prompt_text + text) if req.echo else text, "logprobs": None,
                  "finish_reason": "length" if out is None else out.finish_reason, "_n_tokens": gen_ids}
        if req.logprobs is not None:
            tokens, chosen, tops = [], [], []
            if req.echo:
                tokens += prompt
                chosen += [None] + [lp for lp, _, _ in sc.positions]
                tops += [None] + [top[: req.logprobs] for _, _, top in sc.positions]
            tokens += gen_ids
            chosen += out.logprobs if out else []
            tops += (out.top_logprobs or [[]] * len(gen_ids)) if out else []
            choice["logprobs"] = fmt.completion_logprobs(tokens, chosen, tops, name)
        if req.prompt_logprobs is not None:
            positions = [(lp, r, top[: req.prompt_logprobs]) for lp, r, top in sc.positions]
            choice["prompt_logprobs"] = fmt.prompt_logprobs(prompt, positions, self._decode_one)
        if ctx.want_scores and out is not None:
            choice["_steps"] = self._steps(out)
        return choice

    async def completions_stream(self, req: CompletionRequest, ctx: Ctx) -> Stream:
        if req.echo or req.prompt_logprobs is not None:
            raise APIError(400, "stream: not supported with echo or prompt_logprobs", param="stream")
        prompts, _ = self._encode(req)
        max_tokens = self._max_tokens(req.max_tokens)
        self._check(req, prompts, max_tokens)
        jobs = self._gen_jobs(req, prompts, max_tokens, req.logprobs)
        name = fmt.TokenNames(self._decode_one, req.return_tokens_as_token_ids)

        def chunk(idx: int, delta: str, tokens: list, finish: str | None) -> dict:
            lp = None
            if req.logprobs is not None and tokens:
                lp = fmt.completion_logprobs([t for t, _, _ in tokens], [v for _, v, _ in tokens],
                                             [top or [] for _, _, top in tokens], name)
            return {"index": idx, "text": delta, "logprobs": lp, "finish_reason": finish}

        rid = fmt.new_id("cmpl")
        body = self._stream(jobs, prompts, req, ctx, chunk,
                            lambda choices, u=None: fmt.envelope("text_completion", rid, self.name, choices, u))
        return Stream(body, self.name)

    # ------------------------------------------------------------ /v1/chat/completions

    def _render(self, req: ChatRequest) -> list[int]:
        if not getattr(self.tok, "chat_template", None):
            raise APIError(400, f"model {self.name}: its tokenizer has no chat template; use /v1/completions",
                           param="messages")
        messages = [{"role": m.role if m.role != "developer" else "system", "content": m.text()}
                    for m in req.messages]
        try:
            text = self.tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except Exception as e:  # a template may reject a conversation (e.g. roles out of order)
            raise APIError(400, f"messages: the chat template of {self.name} rejected them: {e}",
                           param="messages") from None
        return self.tok(text, add_special_tokens=False)["input_ids"]

    async def chat(self, req: ChatRequest, ctx: Ctx) -> dict:
        prompt = self._render(req)
        max_tokens = self._max_tokens(req.token_limit)
        k = (req.top_logprobs or 0) if req.logprobs else None
        self._check(req, [prompt], max_tokens)
        done = await self._submit(self._gen_jobs(req, [prompt], max_tokens, k), ctx)
        choices = []
        for j, d in enumerate(done):
            out: GenOutput = d.output
            self._record(ctx, len(prompt) if j == 0 else 0, out, d)
            choice = {"index": j, "message": {"role": "assistant", "content": self._text(out)},
                      "logprobs": None, "finish_reason": out.finish_reason}
            if req.logprobs:
                keep = [n for n, t in enumerate(out.token_ids) if t not in self.eos_ids]
                choice["logprobs"] = fmt.chat_logprobs([out.token_ids[n] for n in keep],
                                                       [out.logprobs[n] for n in keep],
                                                       [out.top_logprobs[n] for n in keep], self._decode_one)
            if ctx.want_scores:
                choice["_steps"] = self._steps(out)
            choices.append(choice)
        n_gen = sum(len(d.output.token_ids) for d in done)
        return fmt.envelope("chat.completion", fmt.new_id("chatcmpl"), self.name, choices,
                            fmt.usage(len(prompt), n_gen))

    async def chat_stream(self, req: ChatRequest, ctx: Ctx) -> Stream:
        prompt = self._render(req)
        max_tokens = self._max_tokens(req.token_limit)
        k = (req.top_logprobs or 0) if req.logprobs else None
        self._check(req, [prompt], max_tokens)
        jobs = self._gen_jobs(req, [prompt], max_tokens, k)
        started: set[int] = set()

        def chunk(idx: int, delta: str, tokens: list, finish: str | None) -> dict:
            d = {} if finish and not delta else {"content": delta}
            if idx not in started:
                started.add(idx)
                d = {"role": "assistant", **d, "content": d.get("content", "")}
            lp = None
            if req.logprobs and tokens:
                kept = [x for x in tokens if x[0] not in self.eos_ids]
                lp = fmt.chat_logprobs([t for t, _, _ in kept], [v for _, v, _ in kept], [top for _, _, top in kept],
                                       self._decode_one)
            return {"index": idx, "delta": d, "logprobs": lp, "finish_reason": finish}

        rid = fmt.new_id("chatcmpl")
        body = self._stream(jobs, [prompt], req, ctx, chunk,
                            lambda choices, u=None: fmt.envelope("chat.completion.chunk", rid, self.name, choices, u))
        return Stream(body, self.name)

    # ------------------------------------------------------------ streaming

    def _stream(self, jobs: list[GenJob], prompts: list[list[int]], req, ctx: Ctx, chunk, wrap) -> AsyncIterator[dict]:
        """Submit now (a full queue is a 429 before any byte is sent), then yield chunks as tokens come."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        for idx, job in enumerate(jobs):
            job.on_token = lambda t, lp, top, idx=idx: loop.call_soon_threadsafe(events.put_nowait,
                                                                                  ("tok", idx, (t, lp, top)))
        try:
            futures = self.batcher.submit_many(jobs)
        except QueueFull as e:
            raise APIError(429, f"model {self.name}: {e}", code="queue_full") from None
        except BatcherStopped as e:
            raise APIError(503, f"model {self.name}: {e}") from None
        for idx, f in enumerate(futures):
            f.add_done_callback(lambda f, idx=idx: loop.call_soon_threadsafe(events.put_nowait, ("done", idx, f)))
        detoks = [fmt.Detokenizer(self._decode, self.eos_ids, req.stops) for _ in jobs]
        return self._chunks(jobs, futures, events, detoks, prompts, req, ctx, chunk, wrap)

    async def _chunks(self, jobs, futures, events, detoks, prompts, req, ctx, chunk, wrap) -> AsyncIterator[dict]:
        left, n_gen = set(range(len(jobs))), 0
        try:
            while left:
                kind, idx, payload = await events.get()
                if kind == "tok":
                    delta = detoks[idx].push(payload[0])
                    if delta or req.logprobs:
                        yield wrap([chunk(idx, delta, [payload], None)])
                    continue
                left.discard(idx)
                if payload.cancelled():
                    continue
                exc = payload.exception()
                if exc is not None:
                    raise exc
                done: Done = payload.result()
                out: GenOutput = done.output
                n_gen += len(out.token_ids)
                self._record(ctx, len(jobs[idx].prompt_ids) if idx % req.n == 0 else 0, out, done)
                yield wrap([chunk(idx, detoks[idx].flush(), [], out.finish_reason)])
            if req.include_usage:
                yield wrap([], fmt.usage(sum(len(p) for p in prompts), n_gen))
        finally:
            for job in jobs:  # the client left, or the stream ended: stop what still runs
                self.batcher.cancel(job)


# ---------------------------------------------------------------- OpenAI-compatible server


class RemoteBackend:
    """Forwards requests to an OpenAI-compatible server, renaming the model both ways."""

    kind = "openai"

    def __init__(self, name: str, base_url: str, *, remote_model: str | None = None, api_key: str | None = None,
                 timeout_s: float = 120.0, metrics: ServeMetrics, prices: Prices = Prices(), transport=None):
        import httpx

        self.name, self.remote_model = name, remote_model or name
        self.base_url = base_url.rstrip("/")
        self.metrics, self.prices = metrics, prices
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.AsyncClient(base_url=self.base_url, timeout=timeout_s, headers=headers,
                                        transport=transport)

    def start(self) -> None:
        pass

    async def aclose(self) -> None:
        await self.client.aclose()

    def describe(self) -> dict:
        return {"id": self.name, "object": "model", "created": 0, "owned_by": "distillery",
                "upstream": self.base_url}

    def _body(self, req, ctx: Ctx, stream: bool) -> dict:
        body = req.model_dump(exclude_unset=True, exclude_none=True)
        body["model"], body["stream"] = self.remote_model, stream
        if not stream:
            body.pop("stream_options", None)  # OpenAI servers refuse stream_options without stream
        if ctx.want_scores:  # the router scores from the top few log-probs
            if isinstance(req, ChatRequest):
                body["logprobs"], body["top_logprobs"] = True, max(req.top_logprobs or 0, 5)
            else:
                body["logprobs"] = max(req.logprobs or 0, 5)
        return body

    async def _post(self, path: str, body: dict, ctx: Ctx) -> dict:
        import httpx

        try:
            resp = await wait_watching(self.client.post(path, json=body), ctx)
        except httpx.HTTPError as e:
            raise APIError(502, f"model {self.name}: {self.base_url}{path} failed: {type(e).__name__}: {e}") from None
        if resp.status_code >= 400:
            raise self._upstream_error(resp.status_code, resp.text, path)
        try:
            return resp.json()
        except json.JSONDecodeError:
            raise APIError(502, f"model {self.name}: {self.base_url}{path} answered something not JSON") from None

    def _upstream_error(self, status: int, text: str, path: str) -> APIError:
        try:
            err = json.loads(text).get("error", text)
            msg = err.get("message", str(err)) if isinstance(err, dict) else str(err)
        except (json.JSONDecodeError, AttributeError):
            msg = text[:300]
        # The client's mistake stays the client's (4xx); the upstream's failure is a bad gateway.
        code = status if 400 <= status < 500 else 502
        return APIError(code, f"model {self.name}: {self.base_url}{path}: HTTP {status}: {msg}")

    def _finish(self, body: dict, req, ctx: Ctx) -> dict:
        body["model"] = self.name
        u = body.get("usage") or {}
        self.metrics.record(self.name, ctx.route, prompt_tokens=u.get("prompt_tokens", 0),
                            completion_tokens=u.get("completion_tokens", 0),
                            finish_reason=(body.get("choices") or [{}])[0].get("finish_reason") or "stop",
                            timing=Timing(e2e_s=time.perf_counter() - ctx.arrived), prices=self.prices)
        for c in body.get("choices", []):
            if ctx.want_scores:
                c["_steps"] = steps_from_logprobs(c.get("logprobs"))
                if isinstance(req, ChatRequest) and not req.logprobs or \
                        isinstance(req, CompletionRequest) and req.logprobs is None:
                    c["logprobs"] = None
        return body

    async def completions(self, req: CompletionRequest, ctx: Ctx) -> dict:
        return self._finish(await self._post("/v1/completions", self._body(req, ctx, False), ctx), req, ctx)

    async def chat(self, req: ChatRequest, ctx: Ctx) -> dict:
        return self._finish(await self._post("/v1/chat/completions", self._body(req, ctx, False), ctx), req, ctx)

    async def completions_stream(self, req: CompletionRequest, ctx: Ctx) -> Stream:
        return await self._stream("/v1/completions", self._body(req, ctx, True), ctx)

    async def chat_stream(self, req: ChatRequest, ctx: Ctx) -> Stream:
        return await self._stream("/v1/chat/completions", self._body(req, ctx, True), ctx)

    async def _stream(self, path: str, body: dict, ctx: Ctx) -> Stream:
        import httpx

        request = self.client.build_request("POST", path, json=body)
        try:
            resp = await self.client.send(request, stream=True)
        except httpx.HTTPError as e:
            raise APIError(502, f"model {self.name}: {self.base_url}{path} failed: {type(e).__name__}: {e}") from None
        if resp.status_code >= 400:
            text = (await resp.aread()).decode("utf-8", "replace")
            await resp.aclose()
            raise self._upstream_error(resp.status_code, text, path)
        return Stream(self._relay(resp, ctx), self.name)

    async def _relay(self, resp, ctx: Ctx) -> AsyncIterator[dict]:
        first = True
        try:
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if first:
                    self.metrics.ttft.labels(self.name, ctx.route).observe(time.perf_counter() - ctx.arrived)
                    first = False
                chunk["model"] = self.name
                yield chunk
            self.metrics.e2e.labels(self.name, ctx.route).observe(time.perf_counter() - ctx.arrived)
        finally:
            await resp.aclose()


def steps_from_logprobs(lp: dict | None) -> dict:
    """Router confidence terms from a server's top log-probs (completions or chat shape): the chosen
    token's log-prob and the top-1/top-2 margin are exact, the entropy a lower bound (top k only)."""
    steps = {"logprob": [], "margin": [], "entropy": []}
    if not lp:
        return steps
    if "content" in lp:
        rows = [(c["logprob"], [t["logprob"] for t in c.get("top_logprobs") or []]) for c in lp["content"] or []]
    else:
        rows = [(v, list((top or {}).values())) for v, top in zip(lp.get("token_logprobs") or [],
                                                                  lp.get("top_logprobs") or [])]
    for chosen, top in rows:
        if chosen is None:
            continue
        vals = sorted(top or [chosen], reverse=True)
        steps["logprob"].append(chosen)
        steps["margin"].append(math.exp(vals[0]) - (math.exp(vals[1]) if len(vals) > 1 else 0.0))
        steps["entropy"].append(entropy_bound(vals))
    return steps


# ---------------------------------------------------------------- from the config


def build_backend(cfg: ModelConfig, *, limits: LimitsConfig, metrics: ServeMetrics, preloaded=None):
    """The backend of one ``models`` entry; ``preloaded`` is an already loaded (model, tokenizer)."""
    from distillery.recipe import env_key

    prices = Prices(cfg.price_prompt_per_1k, cfg.price_completion_per_1k)
    if cfg.kind == "openai":
        key = env_key(cfg.api_key_env, f"models.{cfg.name}.api_key_env")
        return RemoteBackend(cfg.name, cfg.base_url, remote_model=cfg.remote_model, api_key=key,
                             timeout_s=cfg.timeout_s, metrics=metrics, prices=prices)
    if preloaded is not None:
        model, tok = preloaded
    else:
        from distillery.models.load import load_model

        loaded = load_model(cfg.path, device=cfg.device, dtype=cfg.dtype)
        model, tok = loaded.model, loaded.tokenizer
    return LocalBackend(cfg.name, model, tok, limits=limits, metrics=metrics, batching=cfg.batching, prices=prices)
