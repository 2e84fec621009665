"""The operations dashboard of headwise serve: the page and its assets (dashboard_page.py, shared
with the vLLM plugin) and the JSON it polls, GET /v1/telemetry and
GET /v1/telemetry/requests/{id}, fed by TelemetryFeed (docs/telemetry-api.md).

Authentication: the page and its assets (DASHBOARD_PATHS) are public, they hold no data; the
JSON routes follow --api-key like the inference routes, and the page sends the key, which the
operator types into it once per browser tab (kept in sessionStorage).
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from server.api.dashboard_page import page_router
from server.api.errors import APIError, bad_request
from server.api.streaming import dumps
from server.api.schemas import ErrorResponse, ascii_uint
from server.api.telemetry_feed import TelemetryFeed
from server.telemetry_window import WINDOWS, UnknownWindowError

MAX_RECENT = 100
_ERRORS = {status: {"model": ErrorResponse} for status in (400, 401, 404)}
_QUERY = [  # parsed by hand (OpenAI-style 400s, never FastAPI's 422), documented here
    {"name": "window", "in": "query", "required": False,
     "schema": {"type": "string", "enum": list(WINDOWS), "default": "1m"}},
    {"name": "recent", "in": "query", "required": False,
     "schema": {"type": "integer", "minimum": 0, "maximum": MAX_RECENT, "default": 20}},
]


def _json(obj, status: int = 200) -> Response:
    return Response(dumps(obj), status_code=status, media_type="application/json",
                    headers={"cache-control": "no-store"})


def _recent_param(raw: str | None) -> int:
    """?recent=: ASCII digits only, 0..MAX_RECENT (default 20)."""
    if raw is None:
        return 20
    recent = ascii_uint(raw, max_digits=3)
    if recent is None or recent > MAX_RECENT:
        raise bad_request(f"recent must be an integer in [0, {MAX_RECENT}]", param="recent", code="invalid_value")
    return recent


def dashboard_router(feed: TelemetryFeed) -> APIRouter:
    """Routes of the dashboard page, its assets and the telemetry JSON over `feed`."""
    router = APIRouter()
    router.include_router(page_router())

    @router.get("/v1/telemetry", tags=["telemetry"], responses=_ERRORS, openapi_extra={"parameters": _QUERY})
    async def telemetry(request: Request) -> Response:
        """Live telemetry over a window (?window=1m|5m|all, ?recent=0..100): per-(layer, head)
        means of every statistic, latency percentiles, throughput, load, counters, a short
        time series and the most recent requests. Fields: docs/telemetry-api.md."""
        query = request.query_params
        window = query.get("window", "1m")
        recent = _recent_param(query.get("recent"))
        try:
            return _json(feed.snapshot(window, recent=recent))
        except UnknownWindowError as exc:
            raise bad_request(str(exc), param="window", code="invalid_value") from None

    @router.get("/v1/telemetry/requests/{request_id}", tags=["telemetry"], responses=_ERRORS)
    async def telemetry_request(request_id: str) -> Response:
        """One recently finished request: timings, token counts and its per-(layer, head) means."""
        found = feed.request(request_id)
        if found is None:
            raise APIError(404, f"no recent request with id {request_id[:64]!r} (only the last "
                                f"{feed.max_recent} finished requests are kept)", param="request_id",
                           code="request_not_found")
        return _json(found)

    return router

