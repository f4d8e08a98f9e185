"""Generation backends: the teacher in this process (transformers), any OpenAI-compatible server,
or vLLM's offline engine. Each turns rendered prompts into responses with confidence scores
(entropy, top-1/top-2 gap, log-prob of the chosen tokens), one seed per sample."""

from __future__ import annotations

import hashlib
import json
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from distillery.http import post_json
from distillery.io import sha256_json

SCORE_NAMES = ("mean_entropy", "mean_gap", "min_gap", "mean_logprob")


class BackendUnavailable(RuntimeError):
    """A backend whose package or server is not there; the message says what to install or start."""


@dataclass
class Generation:
    response: str
    token_ids: list[int]
    finish_reason: str  # "stop" (end of sequence) or "length"
    scores: dict = field(default_factory=dict)
    scores_from: str = "full"  # "full" distribution, or "top5" where a server returns only top log-probs


# ---------------------------------------------------------------- confidence


def step_scores(logits: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
    """Per-row confidence terms of one decoding step, from raw logits ``[B, V]``:
    columns = entropy, top-1/top-2 logit gap, log-prob of the chosen token (all at T=1)."""
    logits = logits.float()
    logp = torch.log_softmax(logits, dim=-1)
    entropy = -(logp.exp() * logp).sum(-1)
    top2 = logits.topk(2, dim=-1).values
    return torch.stack([entropy, top2[:, 0] - top2[:, 1], logp.gather(-1, chosen[:, None])[:, 0]], dim=-1)


def summarise(per_step: list[list[float]]) -> dict:
    """Per-response scores from per-step ``[entropy, gap, logprob]`` rows."""
    if not per_step:
        return {n: float("nan") for n in SCORE_NAMES}
    ent, gap, lp = zip(*per_step)
    return {"mean_entropy": sum(ent) / len(ent), "mean_gap": sum(gap) / len(gap), "min_gap": min(gap),
            "mean_logprob": sum(lp) / len(lp)}


def scores_from_top_logprobs(chosen: list[float], tops: list[dict]) -> dict:
    """Scores from a server's top-k log-probs: the gap is exact (a log-prob gap is a logit gap);
    entropy is taken over the renormalised top k, a lower bound on the full one."""
    steps = []
    for lp, top in zip(chosen, tops):
        vals = sorted((top or {lp: lp}).values(), reverse=True) if isinstance(top, dict) else sorted(top, reverse=True)
        z = math.log(sum(math.exp(v) for v in vals))
        ent = -sum(math.exp(v - z) * (v - z) for v in vals)
        gap = vals[0] - vals[1] if len(vals) > 1 else float("inf")
        steps.append([ent, gap, lp])
    return summarise(steps)


# ---------------------------------------------------------------- transformers backend


class _RowSampler:
    """Samples each row with its own generator, then hands greedy search a one-hot choice.

    Batched ``generate`` draws one random stream for the whole batch; a row's draw would then
    depend on its neighbours. Here each row's draws come from its own seed only."""

    def __init__(self, strategy, seeds: list[int]):
        self.s = strategy
        self.gens = [torch.Generator().manual_seed(seed) for seed in seeds]

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        logits = scores.float().cpu() / self.s.temperature
        if self.s.top_k:
            kth = logits.topk(min(self.s.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        if self.s.top_p < 1.0:
            sorted_p, idx = probs.sort(dim=-1, descending=True)
            drop = sorted_p.cumsum(-1) - sorted_p >= self.s.top_p  # keep the smallest set reaching top_p
            probs = probs.scatter(-1, idx, sorted_p.masked_fill(drop, 0.0))
        chosen = torch.stack([torch.multinomial(p, 1, generator=g)[0] for p, g in zip(probs, self.gens)])
        out = torch.full_like(scores, float("-inf"))
        return out.scatter(-1, chosen[:, None].to(scores.device), 0.0)


class TransformersBackend:
    """Batched, left-padded generation with the KV cache, through ``model.generate``."""

    name = "transformers"
    scores_from = "full"

    def __init__(self, model, tokenizer, model_id: str, batch_size: int = 16):
        self.model, self.tok, self.model_id, self.batch_size = model.eval(), tokenizer, model_id, batch_size
        if self.tok.pad_token is None:
            self.tok.pad_token = self.tok.eos_token
        self.fingerprint = teacher_fingerprint(model, tokenizer)

    @torch.no_grad()
    def generate(self, texts: list[str], strategy, seeds: list[int]) -> list[Generation]:
        self.tok.padding_side = "left"
        enc = self.tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        dev = next(self.model.parameters()).device
        enc = {k: v.to(dev) for k, v in enc.items()}
        kwargs = dict(max_new_tokens=strategy.max_new_tokens, do_sample=False, num_beams=1,
                      output_logits=True, return_dict_in_generate=True,
                      pad_token_id=self.tok.pad_token_id, eos_token_id=self.tok.eos_token_id)
        if strategy.do_sample:
            kwargs["logits_processor"] = [_RowSampler(strategy, seeds)]
        out = self.model.generate(**enc, **kwargs)
        new = out.sequences[:, enc["input_ids"].shape[1]:]
        per_step = torch.stack([step_scores(lg, new[:, t]) for t, lg in enumerate(out.logits)], dim=1).cpu()
        return [self._one(new[r].tolist(), per_step[r]) for r in range(len(texts))]

    def _one(self, ids: list[int], steps: torch.Tensor) -> Generation:
        eos = self.tok.eos_token_id
        n = ids.index(eos) + 1 if eos in ids else len(ids)  # the end-of-sequence choice is scored too
        text_ids = ids[: n - 1] if eos in ids else ids
        return Generation(self.tok.decode(text_ids, skip_special_tokens=True), text_ids,
                          "stop" if eos in ids else "length", summarise(steps[:n].tolist()))


def teacher_fingerprint(model, tokenizer) -> str:
    """Tokenizer fingerprint + architecture + a strided sample of every weight: cheap, and any
    change of weights, dtype or vocabulary changes it."""
    from distillery.models.load import tokenizer_fingerprint

    h = hashlib.sha256(tokenizer_fingerprint(tokenizer).encode())
    cfg = {k: v for k, v in model.config.to_dict().items() if not k.startswith("_") and k != "transformers_version"}
    h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
    for name, p in model.state_dict().items():
        flat = p.detach().flatten()
        h.update(f"{name}|{tuple(p.shape)}|{p.dtype}".encode())
        h.update(flat[:: max(1, flat.numel() // 256)].float().cpu().numpy().tobytes())
    return h.hexdigest()


# ---------------------------------------------------------------- OpenAI-compatible HTTP backend


class OpenAIBackend:
    """Any OpenAI-compatible ``/v1/completions`` server (vLLM, distillery's own). One request per
    sample, each with its own seed, ``batch_size`` in flight at once (the server batches them)."""

    name = "openai"
    scores_from = "top5"

    def __init__(self, base_url: str, model: str, *, api_key: str | None = None, batch_size: int = 16,
                 timeout_s: float = 120.0, fingerprint: str | None = None):
        self.url = base_url.rstrip("/") + "/completions"
        self.model_id, self.api_key, self.batch_size, self.timeout_s = model, api_key, batch_size, timeout_s
        # A server does not expose its weights; its model name and URL stand for them.
        self.fingerprint = fingerprint or sha256_json({"server": base_url, "model": model})

    def generate(self, texts: list[str], strategy, seeds: list[int]) -> list[Generation]:
        with ThreadPoolExecutor(max_workers=self.batch_size) as pool:
            return list(pool.map(lambda ts: self._one(ts[0], strategy, ts[1]), zip(texts, seeds)))

    def _one(self, text: str, strategy, seed: int) -> Generation:
        body = {"model": self.model_id, "prompt": text, "max_tokens": strategy.max_new_tokens, "n": 1,
                "temperature": strategy.temperature if strategy.do_sample else 0.0,
                "top_p": strategy.top_p if strategy.do_sample else 1.0, "seed": seed, "logprobs": 5}
        if strategy.do_sample and strategy.top_k:
            body["top_k"] = strategy.top_k
        choice = self._post(body)["choices"][0]
        lp = choice.get("logprobs") or {}
        chosen, tops = lp.get("token_logprobs") or [], lp.get("top_logprobs") or []
        scores = scores_from_top_logprobs(chosen, tops) if chosen else summarise([])
        return Generation(choice["text"], [], "stop" if choice.get("finish_reason") == "stop" else "length",
                          scores, self.scores_from)

    def _post(self, body: dict) -> dict:
        return post_json(self.url, body, api_key=self.api_key, timeout=self.timeout_s, error=BackendUnavailable)


# ---------------------------------------------------------------- vLLM offline engine


class VLLMBackend:
    """vLLM's offline engine (optional extra, GPU only). Scores come from its top-5 log-probs."""

    name = "vllm"
    scores_from = "top5"

    def __init__(self, model_path: str, batch_size: int = 256):
        try:
            import vllm  # noqa: F401
        except ImportError:
            raise BackendUnavailable("backend vllm: the vllm package is not installed "
                                     "(pip install vllm, on a machine with a GPU)") from None
        self.llm = vllm.LLM(model=model_path, seed=0)
        self.model_id, self.batch_size = model_path, batch_size
        self.fingerprint = sha256_json({"vllm": model_path})

    def generate(self, texts: list[str], strategy, seeds: list[int]) -> list[Generation]:
        from vllm import SamplingParams

        params = [SamplingParams(n=1, max_tokens=strategy.max_new_tokens, seed=seed, logprobs=5,
                                 temperature=strategy.temperature if strategy.do_sample else 0.0,
                                 top_p=strategy.top_p if strategy.do_sample else 1.0,
                                 top_k=(strategy.top_k or -1) if strategy.do_sample else -1) for seed in seeds]
        gens = []
        for out in self.llm.generate(texts, params, use_tqdm=False):
            o = out.outputs[0]
            chosen = [step[t].logprob for t, step in zip(o.token_ids, o.logprobs or [])]
            tops = [{k: v.logprob for k, v in step.items()} for step in (o.logprobs or [])]
            gens.append(Generation(o.text, list(o.token_ids), "stop" if o.finish_reason == "stop" else "length",
                                   scores_from_top_logprobs(chosen, tops), self.scores_from))
        return gens


# ---------------------------------------------------------------- choosing one


def make_backend(recipe, teacher=None):
    """The backend a recipe asks for; ``teacher`` (a TeacherConfig) overrides ``recipe.teacher``."""
    cfg = recipe.generate
    teacher = teacher or recipe.teacher
    b = cfg.backend
    if b.kind == "openai":
        from distillery.recipe import RecipeError, env_key

        try:
            key = env_key(b.api_key_env, "generate.backend.api_key_env")
        except RecipeError as e:
            raise BackendUnavailable(str(e)) from None
        return OpenAIBackend(b.base_url, b.model or teacher.model, api_key=key, batch_size=b.batch_size,
                             timeout_s=b.timeout_s)
    if b.kind == "vllm":
        from distillery.models.load import resolve_source

        if teacher.keep_layers is not None:
            raise BackendUnavailable("teacher.keep_layers: vLLM serves a model folder whole; use backend "
                                     "transformers for a teacher cut to some layers")
        return VLLMBackend(resolve_source(teacher.model, recipe.cache_dir, teacher.gguf_file)[0], b.batch_size)
    from distillery.models.teacher import load_teacher

    loaded = load_teacher(teacher, recipe.cache_dir)  # keep_layers applies here as for every teacher
    return TransformersBackend(loaded.model, loaded.tokenizer, loaded.source, b.batch_size)
