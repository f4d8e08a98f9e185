"""Request bodies of the OpenAI-compatible endpoints (pydantic: a bad field is a 400 naming it) and
the OpenAI-style error every failure is answered with."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, field_validator, model_validator

TokenId = Annotated[StrictInt, Field(ge=0)]


class APIError(Exception):
    """Answered as ``{"error": {"message", "type", "param", "code"}}`` with ``status``."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
             413: "invalid_request_error", 429: "rate_limit_error", 502: "upstream_error", 503: "server_error"}

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        return error_body(self.status, self.message, param=self.param, code=self.code)


def error_body(status: int, message: str, *, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": APIError.TYPES.get(status, "server_error"), "param": param,
                      "code": code}}


class _Request(BaseModel):
    # An unknown field is a 400 naming it: a misspelt option must not be silently ignored.
    model_config = ConfigDict(extra="forbid")

    model: str = Field(..., min_length=1)
    max_tokens: StrictInt | None = Field(None, ge=0)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: StrictInt = Field(1, ge=1)
    seed: StrictInt | None = None
    stop: str | list[str] | None = None
    stream: StrictBool = False
    stream_options: dict | None = None
    user: str | None = None
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > 4:
            raise ValueError("at most 4 stop strings")
        if any(not s for s in stops):
            raise ValueError("stop strings must not be empty")
        return stops

    @model_validator(mode="after")
    def _unsupported(self):
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                raise ValueError(f"{name}: not supported by this server (send 0 or leave it out)")
        if self.stream_options is not None and set(self.stream_options) - {"include_usage"}:
            raise ValueError("stream_options: only include_usage is supported")
        return self

    @property
    def stops(self) -> list[str]:
        return self.stop or []

    @property
    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


class CompletionRequest(_Request):
    prompt: str | list[str] | list[TokenId] | list[list[TokenId]]
    echo: StrictBool = False
    logprobs: StrictInt | None = Field(None, ge=0)
    # vLLM's extensions: per-prompt-token log-probs, and tokens named "token_id:N" in logprobs.
    prompt_logprobs: StrictInt | None = Field(None, ge=0)
    return_tokens_as_token_ids: StrictBool = False
    best_of: StrictInt | None = Field(None, ge=1)
    suffix: str | None = None

    @model_validator(mode="after")
    def _prompt(self):
        if isinstance(self.prompt, list):
            if not self.prompt:
                raise ValueError("prompt: must not be an empty list")
            if any(isinstance(p, list) and not p for p in self.prompt):
                raise ValueError("prompt: a token-id prompt must not be empty")
        if self.best_of not in (None, self.n):
            raise ValueError("best_of: only best_of == n is supported")
        if self.suffix:
            raise ValueError("suffix: not supported by this server")
        if self.max_tokens == 0 and not self.echo:
            raise ValueError("max_tokens: 0 is only allowed with echo (scoring the prompt)")
        return self

    def prompts(self) -> list[str | list[int]]:
        """The prompts as a list: strings, or token-id lists."""
        if isinstance(self.prompt, str):
            return [self.prompt]
        if all(isinstance(p, int) for p in self.prompt):
            return [list(self.prompt)]
        return list(self.prompt)


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatRequest(_Request):
    messages: list[Message] = Field(..., min_length=1)
    max_completion_tokens: StrictInt | None = Field(None, ge=1)
    logprobs: StrictBool = False
    top_logprobs: StrictInt | None = Field(None, ge=0, le=20)

    @model_validator(mode="after")
    def _chat(self):
        if self.max_tokens == 0:
            raise ValueError("max_tokens: must be >= 1 for a chat completion")
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs: needs logprobs: true")
        return self

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
