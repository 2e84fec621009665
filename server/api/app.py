"""create_app(engine, metrics, cfg): the FastAPI application. Routes are thin: read the body
(bounded), hand it to OpenAIServing, format the answer. Every failure becomes OpenAI's error
object (errors.py); FastAPI's 422 never appears because no route declares body parameters:
bodies are parsed strictly by serving.py, and their schemas are added to the OpenAPI document.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import Response, StreamingResponse
from pydantic.json_schema import models_json_schema
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Receive, Scope, Send

from server import __version__
from server.api import schemas
from server.api.schemas import ascii_uint
from server.config import ServerConfig
from server.metrics import Metrics
from server.api.errors import APIError, bad_request, error_body, error_headers, from_engine_error, send_error
from server.api.serving import ClientDisconnected, OpenAIServing
from server.api.streaming import TIMING_HEADERS, dumps
from server.api.dashboard import dashboard_router
from server.api.dashboard_page import DASHBOARD_PATHS
from server.api.telemetry_feed import TelemetryFeed
from server.engine.errors import InvalidRequestError

log = logging.getLogger("headwise.api")

PUBLIC_PATHS = frozenset({"/health", "/ready"})
# routes whose refused requests count in headwise_requests_rejected_total
GENERATION_PATHS = frozenset({"/v1/completions", "/v1/chat/completions"})


def json_response(obj, status: int = 200, headers: dict | None = None) -> Response:
    return Response(dumps(obj), status_code=status, media_type="application/json", headers=headers)


def error_response(err: APIError) -> Response:
    return Response(error_body(err), status_code=err.status, media_type="application/json",
                    headers=error_headers(err))


class APIKeyMiddleware:
    """Bearer (or x-api-key) check on every path but the public ones, before the body is read.

    Both sides are hashed first so compare_digest also hides the key's length. The path checked
    is scope["path"], the one the router dispatches on (never rebuilt from the Host header)."""

    def __init__(self, app: ASGIApp, api_key: str, public: frozenset[str]) -> None:
        self.app = app
        self.digest = hashlib.sha256(api_key.encode()).digest()
        self.public = public

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self.public:
            return await self.app(scope, receive, send)
        token = b""
        for name, value in scope.get("headers", ()):
            if name == b"authorization":
                scheme, _, rest = value.partition(b" ")
                if scheme.lower() == b"bearer":
                    token = rest.strip()
            elif name == b"x-api-key" and not token:
                token = value.strip()
        if not hmac.compare_digest(hashlib.sha256(token).digest(), self.digest):
            return await send_error(send, APIError(401, "invalid or missing API key (send Authorization: Bearer <key>)",
                                                   code="invalid_api_key"))
        return await self.app(scope, receive, send)


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it is known to exceed `limit` bytes
    (from Content-Length before reading, else while reading: never buffered whole)."""
    ctype = request.headers.get("content-type")
    if ctype is not None:
        mime = ctype.split(";", 1)[0].strip().lower()
        if mime != "application/json" and not mime.endswith("+json"):
            raise bad_request("the body must be JSON (Content-Type: application/json)", code="unsupported_media_type")
    length = request.headers.get("content-length")
    if length is not None:
        declared = ascii_uint(length)
        if declared is None:
            raise bad_request("invalid Content-Length header")
        if declared > limit:
            raise APIError(413, f"request body is larger than {limit} bytes", code="request_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise APIError(413, f"request body is larger than {limit} bytes", code="request_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


def _custom_openapi(app: FastAPI) -> dict:
    if app.openapi_schema:
        return app.openapi_schema
    doc = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    _, defs = models_json_schema([(m, "validation") for m in schemas.REQUEST_MODELS],
                                 ref_template="#/components/schemas/{model}")
    components = doc.setdefault("components", {}).setdefault("schemas", {})
    for name, schema in defs.get("$defs", {}).items():
        components.setdefault(name, schema)
    for route in app.routes:
        model = getattr(route, "openapi_extra", None) and route.openapi_extra.get("x-request-model")
        if not model:
            continue
        for method in route.methods:
            op = doc["paths"][route.path_format][method.lower()]
            op.pop("x-request-model", None)
            op["requestBody"] = {"required": True, "content": {"application/json": {
                "schema": {"$ref": f"#/components/schemas/{model}"}}}}
    app.openapi_schema = doc
    return doc


def create_app(engine, metrics=None, cfg: ServerConfig | None = None) -> FastAPI:
    """The HTTP application over a loaded engine. The lifespan starts the engine loop, warms it
    up (/ready is 503 until then), and on exit aborts what is left and stops the engine.

    `metrics` (server.metrics.Metrics) is built over the engine when not given."""
    cfg = cfg or ServerConfig()
    serving = OpenAIServing(engine, cfg)
    metrics = metrics or Metrics(engine, serving.model_id, __version__)
    metrics.track_api(lambda: serving.state.in_flight, lambda: dict(serving.state.rejected),
                      lambda: dict(serving.state.structured))

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        warm = asyncio.create_task(serving.warmup())
        warm.add_done_callback(lambda t: t.cancelled() or t.exception() is None
                               or log.error("warm-up failed: %s", t.exception()))
        try:
            yield
        finally:
            warm.cancel()
            serving.close()
            await asyncio.to_thread(engine.shutdown)

    app = FastAPI(title="headwise", version=__version__, lifespan=lifespan,
                  description="OpenAI-compatible LLM server with per-head attention telemetry.")
    app.state.serving = serving
    app.state.cfg = cfg
    app.openapi = lambda: _custom_openapi(app)
    # the live dashboard (/dashboard) and its JSON (/v1/telemetry), fed by engine step observers
    app.state.telemetry = TelemetryFeed(engine, model=serving.model_id, admission=lambda: dict(serving.state.rejected),
                                        in_flight=lambda: serving.state.in_flight)
    app.include_router(dashboard_router(app.state.telemetry))

    # ----------------------------------------------------------------- errors
    def refuse(request: Request, err: APIError) -> Response:
        """The error answer, counted as a rejection when a generation route refuses bad input."""
        if request.scope["path"] in GENERATION_PATHS and err.status in (400, 404, 413):  # 503s count where raised
            reason = "context_length_exceeded" if err.code == "context_length_exceeded" else "invalid_request"
            serving.state.rejected[reason] += 1
        return error_response(err)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> Response:
        return refuse(request, exc)

    @app.exception_handler(InvalidRequestError)
    async def _engine_refused(request: Request, exc: InvalidRequestError) -> Response:
        return refuse(request, from_engine_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        message = {404: "no such route", 405: "method not allowed"}.get(exc.status_code, str(exc.detail))
        return error_response(APIError(exc.status_code, message, code=code,
                                       headers=dict(exc.headers or {})))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> Response:
        return error_response(bad_request("invalid request"))

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> Response:
        log.exception("unhandled error on %s", request.url.path)
        return error_response(APIError(500, "internal server error", type="server_error", code="internal_error"))

    # ----------------------------------------------------------------- middleware (last added = outermost)
    if cfg.api_key:
        public = (PUBLIC_PATHS if cfg.metrics_require_key else PUBLIC_PATHS | {"/metrics"}) | DASHBOARD_PATHS
        app.add_middleware(APIKeyMiddleware, api_key=cfg.api_key, public=public)
    if cfg.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(cfg.cors_origins), allow_credentials=False,
                           allow_methods=["GET", "POST"], allow_headers=["authorization", "content-type", "x-api-key"],
                           expose_headers=[h for h, _ in TIMING_HEADERS] + ["server-timing"])

    errors_doc = {status: {"model": schemas.ErrorResponse} for status in (400, 401, 404, 413, 503)}

    # ----------------------------------------------------------------- routes
    async def _generate(request: Request, handler) -> Response:
        body = await read_body(request, cfg.max_body_bytes)
        try:
            kind, payload, headers = await handler(body, request.receive)
        except ClientDisconnected:
            return Response(status_code=499)
        if kind == "stream":
            events, gen = payload  # gen.close() also runs if the client left before the first byte
            return StreamingResponse(events, media_type="text/event-stream", background=BackgroundTask(gen.close),
                                     headers={"cache-control": "no-cache", "x-accel-buffering": "no"})
        return Response(payload, media_type="application/json", headers=headers)  # payload: encoded already

    @app.post("/v1/completions", responses={200: {"model": schemas.CompletionResponse}, **errors_doc},
              openapi_extra={"x-request-model": "CompletionRequest"})
    async def completions(request: Request) -> Response:
        return await _generate(request, serving.completions)

    @app.post("/v1/chat/completions", responses={200: {"model": schemas.ChatCompletionResponse}, **errors_doc},
              openapi_extra={"x-request-model": "ChatCompletionRequest"})
    async def chat_completions(request: Request) -> Response:
        return await _generate(request, serving.chat)

    @app.get("/v1/models", responses={200: {"model": schemas.ModelList}})
    async def models() -> Response:
        return json_response(serving.models())

    @app.post("/tokenize", responses={200: {"model": schemas.TokenizeResponse}, **errors_doc},
              openapi_extra={"x-request-model": "TokenizeRequest"})
    async def tokenize(request: Request) -> Response:
        return json_response(await serving.tokenize(await read_body(request, cfg.max_body_bytes)))

    @app.post("/detokenize", responses={200: {"model": schemas.DetokenizeResponse}, **errors_doc},
              openapi_extra={"x-request-model": "DetokenizeRequest"})
    async def detokenize(request: Request) -> Response:
        return json_response(await serving.detokenize(await read_body(request, cfg.max_body_bytes)))

    @app.get("/health", responses={200: {"model": schemas.HealthResponse}, 503: {"model": schemas.ErrorResponse}})
    async def health() -> Response:
        """Liveness: 200 while the engine loop is alive."""
        if not engine.is_alive:
            return error_response(APIError(503, "the engine loop stopped", type="service_unavailable_error",
                                           code="engine_dead"))
        return json_response({"status": "ok"})

    @app.get("/ready", responses={200: {"model": schemas.HealthResponse}, 503: {"model": schemas.ErrorResponse}})
    async def ready() -> Response:
        """Readiness: 503 until the model is warm, and again while draining."""
        state = serving.state
        if state.ready and engine.is_alive:
            return json_response({"status": "ready"})
        reason = "draining" if state.draining else "warming up" if not state.warm else "engine stopped"
        return error_response(APIError(503, f"not ready: {reason}", type="service_unavailable_error",
                                       code="not_ready", headers={"retry-after": str(cfg.retry_after_s)}))

    @app.get("/metrics", response_class=Response)
    async def metrics_route() -> Response:
        """Prometheus text exposition, rendered off the event loop so a scrape never stalls streams."""
        return Response(await asyncio.to_thread(metrics.render), headers={"content-type": metrics.content_type})

    return app
