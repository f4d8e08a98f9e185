"""A teacher behind an OpenAI-compatible server that returns prompt log-probs (vLLM's extension).

One ``POST /v1/completions`` per batch, with the prompts as token-id lists, ``prompt_logprobs=k``
and ``max_tokens=1, logprobs=k``. vLLM's ``prompt_logprobs[t]`` is the distribution of prompt
token ``t`` given the tokens before it (entry 0 is null), i.e. the teacher's output at position
``t-1``; the one generated step gives the output at the last position. Servers add the actual
prompt token to each entry even when it is outside the top-k; those extra entries are dropped.

Log-probs come from the server's raw logits, so a served teacher is sparse at temperature 1.
"""

from __future__ import annotations

import math

import torch

from distillery.http import ServerError, post_json
from distillery.signals.base import Signal, TeacherIdentity, tail_mass


class ServedTeacherError(ServerError):
    """The server could not be reached or answered something unusable; the message names the URL."""


def parse_token_id(key: str) -> int:
    # vLLM keys prompt_logprobs by token id ("123"); with return_tokens_as_token_ids the generated
    # step's top_logprobs are keyed "token_id:123".
    return int(key.removeprefix("token_id:"))


def _top_entries(entry: dict, k: int) -> list[tuple[int, float]]:
    items = []
    for key, v in entry.items():
        lp = v["logprob"] if isinstance(v, dict) else v
        items.append((parse_token_id(key), float(lp)))
    items.sort(key=lambda x: -x[1])
    return items[:k]


class ServedTeacher:
    def __init__(self, base_url: str, model: str, *, tokenizer_fingerprint: str, top_k: int,
                 model_id: str | None = None, api_key: str | None = None, timeout: float = 120.0):
        if top_k < 1:
            raise ValueError(f"ServedTeacher: top_k must be >= 1, got {top_k}")
        self.url = base_url.rstrip("/") + "/v1/completions"
        self.model = model
        self.top_k = top_k
        self.api_key = api_key
        self.timeout = timeout
        self.identity = TeacherIdentity(model_id or f"served:{model}", tokenizer_fingerprint, 1.0, top_k)

    def _post(self, body: dict) -> dict:
        return post_json(self.url, body, api_key=self.api_key, timeout=self.timeout, error=ServedTeacherError)

    def _row_positions(self, choice: dict, length: int) -> list[list[tuple[int, float]]]:
        prompt_lp = choice.get("prompt_logprobs")
        if not isinstance(prompt_lp, list) or len(prompt_lp) != length:
            raise ServedTeacherError(f"{self.url}: choice {choice.get('index')}: expected prompt_logprobs for "
                                     f"{length} tokens (does the server support vLLM's prompt_logprobs?)")
        last = ((choice.get("logprobs") or {}).get("top_logprobs") or [None])[0]
        if not last:
            raise ServedTeacherError(f"{self.url}: choice {choice.get('index')}: no logprobs.top_logprobs "
                                     "for the generated step")
        entries = [*prompt_lp[1:], last]
        out = [_top_entries(e, self.top_k) for e in entries]
        short = [t for t, e in enumerate(out) if len(e) < self.top_k]
        if short:
            raise ServedTeacherError(f"{self.url}: choice {choice.get('index')}: fewer than k={self.top_k} "
                                     f"log-probs at position {short[0]} (is the server's max_logprobs >= k?)")
        return out

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **batch) -> Signal:
        bsz, seq = input_ids.shape
        mask = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        prompts = [input_ids[b][mask[b]].tolist() for b in range(bsz)]
        body = {"model": self.model, "prompt": prompts, "max_tokens": 1, "temperature": 0.0,
                "prompt_logprobs": self.top_k, "logprobs": self.top_k, "return_tokens_as_token_ids": True}
        choices = sorted(self._post(body).get("choices", []), key=lambda c: c.get("index", 0))
        if len(choices) != bsz:
            raise ServedTeacherError(f"{self.url}: {len(choices)} choices for {bsz} prompts")
        k = self.top_k
        # Padded positions get a harmless uniform-over-k filler; the loss masks them out.
        ids = torch.arange(k).expand(bsz, seq, k).clone()
        lps = torch.full((bsz, seq, k), -math.log(k))
        for b, choice in enumerate(choices):
            where = mask[b].nonzero().flatten()
            rows = self._row_positions(choice, len(prompts[b]))
            ids[b, where] = torch.tensor([[i for i, _ in r] for r in rows], dtype=torch.long)
            lps[b, where] = torch.tensor([[lp for _, lp in r] for r in rows], dtype=torch.float32)
        dev = input_ids.device
        return Signal(self.identity, topk_ids=ids.to(dev), topk_logprobs=lps.to(dev),
                      tail_mass=tail_mass(lps.exp()).to(dev))
