"""Settings of the server: which models it serves and how, request limits, the router, rollout and
drift. The parts a recipe's ``serve:`` section also holds (batching, limits, drift) live in recipe.py."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from distillery.recipe import SCORES, BatchingConfig, DriftConfig, LimitsConfig, Strict, env_key


class ModelConfig(Strict):
    """One model the server answers for under ``name``: loaded in this process (``transformers``:
    ``path`` is a model folder, .gguf file or ``builtin:NAME``) or forwarded to any OpenAI-compatible
    server (``openai``: ``base_url`` without ``/v1``, the name it serves the model under)."""

    name: str = Field(..., min_length=1)
    kind: Literal["transformers", "openai"] = "transformers"
    path: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    base_url: str | None = None
    remote_model: str | None = Field(None, description="openai: the model name on that server (default: name)")
    api_key_env: str | None = Field(None, description="openai: environment variable holding that server's key")
    timeout_s: float = Field(120.0, gt=0)
    batching: BatchingConfig = BatchingConfig()
    price_prompt_per_1k: float = Field(0.0, ge=0)
    price_completion_per_1k: float = Field(0.0, ge=0)

    @model_validator(mode="after")
    def _where(self):
        if self.kind == "transformers" and not self.path:
            raise ValueError(f"models.{self.name}: kind transformers needs path (a model folder, .gguf or builtin:)")
        if self.kind == "openai" and not self.base_url:
            raise ValueError(f"models.{self.name}: kind openai needs base_url (e.g. http://127.0.0.1:8000)")
        return self


class RouterConfig(Strict):
    """The confidence cascade served under ``name``: the student answers when its confidence
    (``score``) is at least the threshold, otherwise the teacher does. The threshold is ``threshold``
    if set, else the one in ``calibration`` (written by ``distillery route calibrate``)."""

    name: str = "router"
    student: str
    teacher: str
    score: Literal[SCORES] = "geo_mean_prob"
    threshold: float | None = Field(None, ge=0)
    calibration: Path | None = None


class RolloutGateConfig(Strict):
    min_requests: int = Field(20, ge=1, description="candidate queries seen before the gate is judged")
    window: int = Field(200, ge=1, description="recent queries per arm the gate compares")
    max_confidence_drop: float = Field(0.1, ge=0, description="candidate mean confidence below current by more")
    max_error_rate: float = Field(0.05, ge=0, le=1, description="share of candidate queries that failed")
    max_latency_ratio: float = Field(2.0, gt=0, description="candidate median latency over current's")


class RolloutConfig(Strict):
    """A share of router traffic goes to ``candidate`` as the student; a regression past ``gate``
    sends it all back to the router's student, and that decision is kept in ``state``."""

    candidate: str
    share: float = Field(0.1, ge=0, le=1)
    state: Path
    gate: RolloutGateConfig = RolloutGateConfig()
    seed: int | None = None


class ServeConfig(Strict):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    api_key_env: str | None = Field(None, description="when set, every endpoint but /health needs this key")
    models: list[ModelConfig] = Field(..., min_length=1)
    limits: LimitsConfig = LimitsConfig()
    router: RouterConfig | None = None
    rollout: RolloutConfig | None = None
    drift: DriftConfig = DriftConfig()

    @model_validator(mode="after")
    def _names(self):
        names = [m.name for m in self.models]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"models: names must be unique, repeated: {', '.join(dup)}")
        if self.router is not None:
            for field in ("student", "teacher"):
                if getattr(self.router, field) not in names:
                    raise ValueError(f"router.{field}: {getattr(self.router, field)!r} is not one of models "
                                     f"({', '.join(names)})")
            if self.router.name in names:
                raise ValueError(f"router.name: {self.router.name!r} is also a model's name")
        if self.rollout is not None:
            if self.router is None:
                raise ValueError("rollout: needs a router (the candidate replaces the router's student)")
            if self.rollout.candidate not in names:
                raise ValueError(f"rollout.candidate: {self.rollout.candidate!r} is not one of models")
        return self

    def api_key(self) -> str | None:
        return env_key(self.api_key_env)
