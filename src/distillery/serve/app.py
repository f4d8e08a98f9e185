"""The OpenAI-compatible FastAPI app: ``create_app(config)``, ``serve(config)`` (uvicorn, blocking) and
``ServerThread`` (uvicorn on a loopback port in a thread, for tests and benchmarks).

Endpoints: ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions`` (both with
``stream``), ``GET /health``, ``GET /metrics``, ``GET /v1/router`` (the router's state) and
``GET /`` (the playground). Every failure is an OpenAI-style error body; bad input is a 4xx naming
the field, never a 5xx. With ``api_key_env`` set, every endpoint but ``/health`` and the static
playground page needs ``Authorization: Bearer <key>``.
"""

from __future__ import annotations

import hmac
import json
import logging
import math
import socket
import threading
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from distillery.serve import openai_format as fmt
from distillery.serve.backends import ClientGone, Ctx, Stream, build_backend
from distillery.serve.config import ServeConfig
from distillery.serve.metrics import CONTENT_TYPE_LATEST, ServeMetrics
from distillery.serve.schemas import APIError, ChatRequest, CompletionRequest, error_body

log = logging.getLogger(__name__)

OPEN_PATHS = {"/health", "/"}  # the playground page is static; its requests carry the key
KNOWN_PATHS = {"/", "/health", "/metrics", "/v1/models", "/v1/completions", "/v1/chat/completions", "/v1/router",
               "/openapi.json"}
MODEL_HEADER = "x-distillery-model"
UNIONS = {"prompt": "must be a string, a list of strings, a list of token ids or a list of token-id lists",
          "stop": "must be a string or a list of strings"}


def create_app(config: ServeConfig, *, preloaded: dict | None = None, backends: dict | None = None) -> FastAPI:
    """The app for ``config``. ``preloaded`` maps model names to already loaded ``(model, tokenizer)``
    pairs; ``backends`` replaces the backends built from ``config.models`` altogether."""
    metrics = ServeMetrics()
    if backends is None:
        backends = {m.name: build_backend(m, limits=config.limits, metrics=metrics,
                                          preloaded=(preloaded or {}).get(m.name)) for m in config.models}
    targets = dict(backends)
    router = None
    if config.router is not None:
        router = build_router(config, backends, metrics)
        targets[router.name] = router
    key = config.api_key()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        for b in backends.values():
            b.start()
        yield
        for b in backends.values():
            await b.aclose()

    app = FastAPI(title="distillery", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.metrics, app.state.backends, app.state.router, app.state.config = metrics, backends, router, config
    for b in backends.values():  # usable before (or without) the lifespan, e.g. by an in-process client
        b.start()
    _install_errors(app)
    app.add_middleware(Gate, key=key, max_body=config.limits.max_body_bytes, metrics=metrics)

    def target(name: str):
        if name not in targets:
            raise APIError(404, f"model {name!r} not found; this server serves: {', '.join(targets)}",
                           param="model", code="model_not_found")
        return targets[name]

    @app.get("/health")
    async def health():
        return {"status": "ok", "models": list(targets)}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [t.describe() for t in targets.values()]}

    @app.get("/metrics")
    async def metrics_endpoint():
        return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/router")
    async def router_state():
        if router is None:
            raise APIError(404, "this server has no router (config.router)", code="no_router")
        return router.state()

    @app.get("/", response_class=HTMLResponse)
    async def playground():
        from distillery.serve.playground import PAGE

        return HTMLResponse(PAGE)

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        return await _answer(target(req.model), req, request, "completions")

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest, request: Request):
        return await _answer(target(req.model), req, request, "chat")

    return app


async def _answer(t, req, request: Request, call: str):
    ctx = Ctx(disconnected=request.is_disconnected)
    try:
        if req.stream:
            stream: Stream = await getattr(t, call + "_stream")(req, ctx)
            return StreamingResponse(_sse(stream), media_type="text/event-stream",
                                     headers={MODEL_HEADER: stream.model, "Cache-Control": "no-cache"})
        body = await getattr(t, call)(req, ctx)
    except ClientGone:
        return Response(status_code=499)  # nobody reads it; the generation was cancelled
    routed = (body.get("distillery") or {}).get("routed_to", body["model"])
    return JSONResponse(body, headers={MODEL_HEADER: routed})


async def _sse(stream: Stream):
    try:
        async for chunk in stream.chunks:
            yield fmt.sse(chunk)
    except APIError as e:
        yield fmt.sse(e.body())
    except Exception as e:  # a failure mid-stream can only be reported in the stream
        log.exception("stream failed")
        yield fmt.sse(error_body(500, f"generation failed: {type(e).__name__}: {e}"))
    yield fmt.sse("[DONE]")


def build_router(config: ServeConfig, backends: dict, metrics: ServeMetrics):
    """The cascade of ``config.router``: threshold from the config or its calibration file, rollout
    and drift monitors from theirs."""
    from distillery.serve.calibration import Calibration
    from distillery.serve.drift import DriftMonitor
    from distillery.serve.rollout import Rollout
    from distillery.serve.router import Cascade

    rc = config.router
    calibration = Calibration.load(rc.calibration) if rc.calibration else None
    if calibration is not None and calibration.score != rc.score:
        raise ValueError(f"router.score: {rc.score!r}, but {rc.calibration} was calibrated for {calibration.score!r}")
    threshold = rc.threshold if rc.threshold is not None else (calibration.threshold if calibration else None)
    if threshold is None:
        raise ValueError("router: no threshold; set router.threshold or router.calibration "
                         "(the file `distillery route calibrate` writes)")
    rollout = candidate = None
    if config.rollout is not None:
        rollout = Rollout(config.rollout, rc.student, metrics=metrics)
        candidate = backends[config.rollout.candidate]
    drift = None
    if calibration is not None and calibration.reference:
        d = config.drift
        drift = DriftMonitor(calibration.reference, window=d.window, min_samples=d.min_samples, bins=d.bins,
                             warn_at=d.psi_warning, gauge=metrics.drift, warnings=metrics.drift_warnings)
    if math.isinf(threshold):
        log.warning("router: the threshold is infinite: the teacher answers every query")
    return Cascade(rc.name, backends[rc.student], backends[rc.teacher], score=rc.score, threshold=threshold,
                   metrics=metrics, candidate=candidate, rollout=rollout, drift=drift, calibration=calibration)


# ---------------------------------------------------------------- errors


def _install_errors(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError):
        message, param = describe_validation(e.errors())
        return JSONResponse(error_body(400, message, param=param), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        message = f"no route {request.method} {request.url.path}" if e.status_code == 404 else str(e.detail)
        return JSONResponse(error_body(e.status_code, message), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def crash(request: Request, e: Exception):
        log.exception("%s %s failed", request.method, request.url.path)
        return JSONResponse(error_body(500, f"internal error: {type(e).__name__}: {e}"), status_code=500)


def describe_validation(errors: list[dict]) -> tuple[str, str | None]:
    """One message naming the field(s) at fault, and the first as ``param``."""
    if not errors:
        return "invalid request", None
    parts, params = [], []
    for err in errors:
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        if err.get("type") == "json_invalid":
            return f"the request body is not valid JSON: {err.get('ctx', {}).get('error', err.get('msg'))}", None
        if err.get("type") == "missing" and not loc:
            return "the request body must be a JSON object", None
        msg = str(err.get("msg", "")).removeprefix("Value error, ")
        field = loc[0] if loc else (msg.split(":", 1)[0] if ":" in msg.split(" ", 1)[0] else None)
        if field in params and field in UNIONS:
            continue  # every alternative of a union failed: say once what the field may be
        if field in UNIONS and len(err.get("loc", ())) > 2:
            msg, loc = UNIONS[field], [field]
        params.append(field)
        where = ".".join(_strip_union(loc))
        parts.append(f"{where}: {msg}" if where and not msg.startswith(f"{where}:") else msg)
    return "; ".join(parts), params[0]


def _strip_union(loc: list[str]) -> list[str]:
    # pydantic names the union alternative tried (str, list[int], ...) in the location; readers want the field.
    return [x for x in loc if not any(c in x for c in "[]") and x not in ("str", "int", "function-after")]


class Gate:
    """ASGI middleware: API key, request size, and the per-endpoint request counter. Plain ASGI (not
    BaseHTTPMiddleware) so a disconnect reaches the endpoint and streams are passed through as is."""

    def __init__(self, app, *, key: str | None, max_body: int, metrics: ServeMetrics):
        self.app, self.key, self.max_body, self.metrics = app, key, max_body, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        endpoint = path if path in KNOWN_PATHS else "other"
        status = [500]

        async def counted(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        try:
            if self.key and path not in OPEN_PATHS and not self._authorised(headers.get("authorization", "")):
                return await self._refuse(counted, 401, "a valid API key is required: Authorization: Bearer <key>",
                                          "invalid_api_key")
            length = headers.get("content-length", "")
            if length.isdigit() and int(length) > self.max_body:
                return await self._refuse(counted, 413, f"the request body is {length} bytes; the limit is "
                                          f"{self.max_body}", "request_too_large")
            await self.app(scope, receive, counted)
        finally:
            self.metrics.http.labels(endpoint, str(status[0])).inc()

    def _authorised(self, header: str) -> bool:
        scheme, _, token = header.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self.key.encode())

    @staticmethod
    async def _refuse(send, status: int, message: str, code: str) -> None:
        body = json.dumps(error_body(status, message, code=code)).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


# ---------------------------------------------------------------- running it


def close_app(app: FastAPI) -> None:
    """Stop what ``create_app`` started (batcher threads, HTTP clients) in an app no server ran; a server
    does this itself when it shuts down."""
    import asyncio

    async def close():
        for b in app.state.backends.values():
            await b.aclose()

    asyncio.run(close())


def serve(config: ServeConfig, **kwargs) -> None:
    """Run the server in the foreground until interrupted (what ``distillery serve`` calls)."""
    import uvicorn

    uvicorn.run(create_app(config, **kwargs), host=config.host, port=config.port, log_level="info")


class ServerThread:
    """uvicorn serving ``app`` on ``host`` (loopback) and a free port in a background thread; a
    context manager that stops it (and the app's batchers) on exit. ``.url`` is ``http://host:port``."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        import uvicorn

        self.app = app
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.url = f"http://{host}:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=5))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the server at {self.url} did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.sock.close()
