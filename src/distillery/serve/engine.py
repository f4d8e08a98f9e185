"""The model arithmetic of the in-process backend: one batched ``generate`` call for many requests,
and one batched forward pass that scores prompts (vLLM's ``prompt_logprobs``).

Requests in one batch differ in length, sampling settings, ``max_tokens`` and stop strings. A
logits processor (:class:`RowController`) handles them row by row inside ``model.generate``: it
picks each row's token itself (greedy, or sampled at the row's temperature/top-p from the row's own
seeded generator, so a row's draws never depend on its neighbours), records log-probs and the
confidence terms of the raw distribution, hands each token to the request's streaming callback,
and marks a row done at its own end; the matching stopping criterion ends that row there.
Left padding plus the attention mask keeps every row's logits those of the unpadded prompt.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

# Rows longer than this many (rows x positions) are scored in several forward passes, so the
# [rows, positions, vocab] fp32 logits of one pass stay a few hundred MB for a 50k vocabulary.
SCORE_TOKEN_BUDGET = 2048


@dataclass
class GenJob:
    """One sequence to generate. ``seed`` None draws a fresh seed; ``logprobs`` is how many top
    log-probs to keep per step (None: none, 0: only the chosen token's)."""

    prompt_ids: list[int]
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    logprobs: int | None = None
    stop: list[str] = field(default_factory=list)
    # Called from the worker thread once per token with (token id, its log-prob, top log-probs or None).
    on_token: Callable[[int, float, list | None], None] | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)
    kind: str = "generate"


@dataclass
class GenOutput:
    token_ids: list[int]
    finish_reason: str  # "stop" (EOS or a stop string), "length", or "cancelled"
    logprobs: list[float]  # of each chosen token, raw distribution (T=1)
    top_logprobs: list[list[tuple[int, float]]] | None
    entropy: list[float]  # per step, nats, raw distribution
    margin: list[float]  # per step, top-1 minus top-2 probability
    stop_text: str | None = None  # the stop string that ended the row, if one did
    first_token_at: float | None = None
    token_times: list[float] = field(default_factory=list)


@dataclass
class ScoreJob:
    """Log-probs of every prompt token given the ones before it, plus the next-token distribution."""

    prompt_ids: list[int]
    k: int
    cancelled: threading.Event = field(default_factory=threading.Event)
    kind: str = "score"


@dataclass
class ScoreOutput:
    # Entry t (t >= 1): (logprob of prompt token t, its rank, top-k [(id, logprob)]) given tokens < t.
    positions: list[tuple[float, int, list[tuple[int, float]]]]
    next_top: list[tuple[int, float]]  # top-k of the distribution after the whole prompt
    next_logprobs: torch.Tensor  # that whole distribution [V], for a greedy one-token answer


class RowController:
    """Logits processor and stopping criterion of one batched ``generate`` call (see module doc)."""

    def __init__(self, jobs: list[GenJob], eos_ids: set[int], decode: Callable[[list[int]], str]):
        self.jobs, self.eos_ids, self.decode = jobs, eos_ids, decode
        n = len(jobs)
        self.outs = [GenOutput([], "length", [], [] if j.logprobs is not None else None, [], []) for j in jobs]
        self.done = torch.zeros(n, dtype=torch.bool)
        self.gens = [torch.Generator().manual_seed(j.seed if j.seed is not None else _fresh_seed())
                     if j.temperature > 0 else None for j in jobs]
        self.temps = torch.tensor([max(j.temperature, 1e-6) for j in jobs])[:, None]

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        now = time.perf_counter()
        logits = scores.float().cpu()
        logp = torch.log_softmax(logits, dim=-1)
        probs = logp.exp()
        entropy = -(probs * logp).nan_to_num().sum(-1)
        top2 = probs.topk(2, dim=-1).values
        chosen = logits.argmax(-1)
        sampled = [b for b, g in enumerate(self.gens) if g is not None and not self.done[b]]
        if sampled:
            chosen[sampled] = self._sample(logits[sampled], sampled)
        for b, job in enumerate(self.jobs):
            if self.done[b]:
                continue
            if job.cancelled.is_set():
                self._finish(b, "cancelled")
                continue
            self._record(b, int(chosen[b]), logp[b], float(entropy[b]), float(top2[b, 0] - top2[b, 1]), now)
        out = torch.full_like(scores, float("-inf"))
        return out.scatter(-1, chosen[:, None].to(scores.device), 0.0)

    def _sample(self, logits: torch.Tensor, rows: list[int]) -> torch.Tensor:
        probs = torch.softmax(logits / self.temps[rows], dim=-1)
        top_p = torch.tensor([self.jobs[b].top_p for b in rows])[:, None]
        sorted_p, idx = probs.sort(dim=-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p >= top_p  # keep the smallest set reaching top_p
        probs = probs.scatter(-1, idx, sorted_p.masked_fill(drop, 0.0))
        return torch.stack([torch.multinomial(p, 1, generator=self.gens[b])[0] for p, b in zip(probs, rows)])

    def _record(self, b: int, token: int, logp: torch.Tensor, entropy: float, margin: float, now: float) -> None:
        job, out = self.jobs[b], self.outs[b]
        out.token_ids.append(token)
        out.logprobs.append(float(logp[token]))
        out.entropy.append(entropy)
        out.margin.append(margin)
        out.token_times.append(now)
        if out.first_token_at is None:
            out.first_token_at = now
        top = None
        if job.logprobs is not None:
            top = []
            if job.logprobs:
                vals, ids = logp.topk(min(job.logprobs, logp.numel()))
                top = list(zip(ids.tolist(), vals.tolist()))
            out.top_logprobs.append(top)
        if job.on_token is not None:
            job.on_token(token, out.logprobs[-1], top)
        if token in self.eos_ids:
            self._finish(b, "stop")
        elif job.stop and (hit := _stop_hit(self.decode(out.token_ids), job.stop)):
            out.stop_text = hit
            self._finish(b, "stop")
        elif len(out.token_ids) >= job.max_tokens:
            self._finish(b, "length")

    def _finish(self, b: int, reason: str) -> None:
        self.outs[b].finish_reason = reason
        self.done[b] = True

    def stopper(self, input_ids: torch.Tensor, scores=None, **kwargs) -> torch.Tensor:
        return self.done.to(input_ids.device)


def _stop_hit(text: str, stops: list[str]) -> str | None:
    return next((s for s in stops if s in text), None)


def _fresh_seed() -> int:
    return int(torch.randint(0, 2**62, (1,)).item())


def model_device(model) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def generate_batch(model, jobs: list[GenJob], *, pad_id: int, eos_ids: set[int],
                   decode: Callable[[list[int]], str]) -> list[GenOutput]:
    """Generate every job in one left-padded ``model.generate`` call (see module doc)."""
    from transformers import GenerationConfig, LogitsProcessorList, StoppingCriteriaList

    dev = model_device(model)
    width = max(len(j.prompt_ids) for j in jobs)
    ids = torch.full((len(jobs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(jobs), width), dtype=torch.long)
    for b, j in enumerate(jobs):
        ids[b, width - len(j.prompt_ids):] = torch.tensor(j.prompt_ids)
        mask[b, width - len(j.prompt_ids):] = 1
    ctl = RowController(jobs, eos_ids, decode)
    # A fresh config: the model's own generation_config may carry sampling settings or penalties that
    # would change the distribution RowController samples from.
    cfg = GenerationConfig(max_new_tokens=max(j.max_tokens for j in jobs), do_sample=False, num_beams=1,
                           pad_token_id=pad_id, eos_token_id=None, use_cache=True)
    model.generate(input_ids=ids.to(dev), attention_mask=mask.to(dev), generation_config=cfg,
                   logits_processor=LogitsProcessorList([ctl]), stopping_criteria=StoppingCriteriaList([ctl.stopper]))
    return ctl.outs


@torch.no_grad()
def score_batch(model, jobs: list[ScoreJob], *, pad_id: int) -> list[ScoreOutput | None]:
    """Prompt log-probs of every job, right-padded (a causal model's logits at a position do not
    see later padding), in forward passes of at most ``SCORE_TOKEN_BUDGET`` row-positions.
    A job cancelled before its pass gets None."""
    dev = model_device(model)
    groups: list[list[int]] = [[]]
    for i in sorted(range(len(jobs)), key=lambda i: len(jobs[i].prompt_ids)):
        width = len(jobs[i].prompt_ids)  # ascending, so the widest of its group
        if groups[-1] and (len(groups[-1]) + 1) * width > SCORE_TOKEN_BUDGET:
            groups.append([])
        groups[-1].append(i)
    results: list[ScoreOutput | None] = [None] * len(jobs)
    for group in groups:
        live = [g for g in group if not jobs[g].cancelled.is_set()]
        if live:
            for g, out in zip(live, _score_pass(model, [jobs[g] for g in live], pad_id, dev)):
                results[g] = out
    return results


def _score_pass(model, jobs: list[ScoreJob], pad_id: int, dev) -> list[ScoreOutput]:
    width = max(len(j.prompt_ids) for j in jobs)
    ids = torch.full((len(jobs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(jobs), width), dtype=torch.long)
    for b, j in enumerate(jobs):
        ids[b, : len(j.prompt_ids)] = torch.tensor(j.prompt_ids)
        mask[b, : len(j.prompt_ids)] = 1
    logits = model(input_ids=ids.to(dev), attention_mask=mask.to(dev)).logits
    outs = []
    for b, j in enumerate(jobs):
        n = len(j.prompt_ids)
        logp = torch.log_softmax(logits[b, :n].float(), dim=-1).cpu()
        k = min(j.k, logp.shape[-1])
        vals, top = logp.topk(k, dim=-1)
        prompt = torch.tensor(j.prompt_ids)
        actual = logp[:-1].gather(-1, prompt[1:, None])[:, 0]  # token t given tokens < t
        ranks = (logp[:-1] > actual[:, None]).sum(-1) + 1
        positions = [(float(actual[t]), int(ranks[t]), list(zip(top[t].tolist(), vals[t].tolist())))
                     for t in range(n - 1)]
        outs.append(ScoreOutput(positions, list(zip(top[-1].tolist(), vals[-1].tolist())), logp[-1]))
    return outs


def entropy_bound(top_logprobs: list[float]) -> float:
    """Entropy (nats) of a distribution known only by its top log-probs, renormalised over them:
    a lower bound of the full one, for backends that return only the top few."""
    z = math.log(sum(math.exp(v) for v in top_logprobs))
    return -sum(math.exp(v - z) * (v - z) for v in top_logprobs)
