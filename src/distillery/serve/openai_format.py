"""The JSON the OpenAI API (and vLLM's extensions of it) answers with, built from token ids and
log-probs: completion and chat choices, their ``logprobs`` blocks, ``prompt_logprobs``, stream
chunks, and incremental detokenisation for streams."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def envelope(kind: str, rid: str, model: str, choices: list[dict], usage: dict | None = None) -> dict:
    body = {"id": rid, "object": kind, "created": int(time.time()), "model": model, "choices": choices}
    if usage is not None:
        body["usage"] = usage
    return body


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


class TokenNames:
    """How a token is named in ``logprobs``: its text, or ``token_id:N`` (vLLM's
    ``return_tokens_as_token_ids``, which keeps tokens whose text is not valid UTF-8 apart)."""

    def __init__(self, decode_one: Callable[[int], str], as_ids: bool):
        self.decode_one, self.as_ids = decode_one, as_ids

    def __call__(self, token: int) -> str:
        return f"token_id:{token}" if self.as_ids else self.decode_one(token)


def completion_logprobs(tokens: list[int], chosen: list[float | None], tops: list[list[tuple[int, float]] | None],
                        name: TokenNames, start_offset: int = 0) -> dict:
    """The legacy completions ``logprobs`` block: ``tokens``, ``token_logprobs``, ``top_logprobs``
    (each step's top-k plus the chosen token, as vLLM returns it) and ``text_offset``."""
    names = [name(t) for t in tokens]
    offsets, pos = [], start_offset
    for n in names:
        offsets.append(pos)
        pos += len(n) if not name.as_ids else 0
    top_dicts = []
    for t, lp, top in zip(tokens, chosen, tops):
        if top is None:
            top_dicts.append(None)
            continue
        d = {name(i): v for i, v in top}
        d.setdefault(name(t), lp)
        top_dicts.append(d)
    return {"tokens": names, "token_logprobs": list(chosen), "top_logprobs": top_dicts, "text_offset": offsets}


def prompt_logprobs(prompt: list[int], positions: list[tuple[float, int, list[tuple[int, float]]]],
                    decode_one: Callable[[int], str]) -> list[dict | None]:
    """vLLM's ``prompt_logprobs``: entry 0 is null; entry t maps token-id strings to
    ``{logprob, rank, decoded_token}`` for the top-k given tokens < t, plus prompt token t itself."""
    out: list[dict | None] = [None]
    for t, (lp, rank, top) in enumerate(positions, start=1):
        entry = {str(i): {"logprob": v, "rank": r, "decoded_token": decode_one(i)} for r, (i, v) in enumerate(top, 1)}
        entry.setdefault(str(prompt[t]), {"logprob": lp, "rank": rank, "decoded_token": decode_one(prompt[t])})
        out.append(entry)
    return out


def chat_logprobs(tokens: list[int], chosen: list[float], tops: list[list[tuple[int, float]] | None],
                  decode_one: Callable[[int], str]) -> dict:
    """The chat ``logprobs`` block: ``{"content": [{token, logprob, bytes, top_logprobs}]}``."""
    def item(t: int, lp: float) -> dict:
        text = decode_one(t)
        return {"token": text, "logprob": lp, "bytes": list(text.encode("utf-8"))}

    return {"content": [{**item(t, lp), "top_logprobs": [item(i, v) for i, v in (top or [])]}
                        for t, lp, top in zip(tokens, chosen, tops)]}


class Detokenizer:
    """Text of a growing token sequence, released only when final: text that may still become part
    of a stop string, or ends in half a UTF-8 character, is held back until the next token."""

    def __init__(self, decode: Callable[[list[int]], str], eos_ids: set[int], stops: list[str]):
        self.decode, self.eos_ids, self.stops = decode, eos_ids, stops
        self.ids: list[int] = []
        self.sent = 0
        self.hold = max((len(s) for s in stops), default=1) - 1

    def text(self) -> str:
        text = self.decode([t for t in self.ids if t not in self.eos_ids])
        for s in self.stops:
            if s in text:
                text = text[: text.index(s)]
        return text

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.text()
        safe = len(text) - self.hold
        while safe > self.sent and text[safe - 1] == "\ufffd":
            safe -= 1
        return self._release(text, safe)

    def flush(self) -> str:
        text = self.text()
        return self._release(text, len(text))

    def _release(self, text: str, upto: int) -> str:
        if upto <= self.sent:
            return ""
        delta, self.sent = text[self.sent:upto], upto
        return delta


def sse(chunk: dict | str) -> bytes:
    import json

    data = chunk if isinstance(chunk, str) else json.dumps(chunk)
    return f"data: {data}\n\n".encode()
