"""The operations page: GET /dashboard and its assets (/dashboard/static/<name>), one static
page served from server/api/static/ with no build step. The page polls GET /v1/telemetry
(docs/telemetry-api.md), which each server serves from its own feed: headwise serve's
(server/api/dashboard.py) or the vLLM plugin's (server/vllm_plugin/endpoint.py).

The page and its assets hold no data, so they are public on both servers. Imports FastAPI and
the standard library only, so the vLLM plugin mounts the very same routes without headwise's
engine; an unknown asset is a 404 in the hosting app's own error format.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import Response

STATIC_DIR = Path(__file__).resolve().parent / "static"
PAGE = "dashboard.html"
ASSETS = {  # served as /dashboard/static/<name>
    "dashboard.js": "text/javascript; charset=utf-8",
    "dashboard.css": "text/css; charset=utf-8",
    "uPlot.iife.min.js": "text/javascript; charset=utf-8",
    "uPlot.min.css": "text/css; charset=utf-8",
}
DASHBOARD_PATHS = frozenset({"/dashboard", *(f"/dashboard/static/{name}" for name in ASSETS)})


class _Asset:
    def __init__(self, path: Path, media_type: str) -> None:
        self.body = path.read_bytes()
        self.media_type = media_type
        self.etag = '"' + hashlib.sha256(self.body).hexdigest()[:20] + '"'

    def response(self, request: Request) -> Response:
        headers = {"etag": self.etag, "cache-control": "no-cache", "x-content-type-options": "nosniff"}
        if request.headers.get("if-none-match") == self.etag:
            return Response(status_code=304, headers=headers)
        return Response(self.body, media_type=self.media_type, headers=headers)


def page_router() -> APIRouter:
    """Routes of the dashboard page and its assets (read once, served from memory with an ETag)."""
    router = APIRouter()
    page = _Asset(STATIC_DIR / PAGE, "text/html; charset=utf-8")
    assets = {name: _Asset(STATIC_DIR / name, media) for name, media in ASSETS.items()}

    @router.get("/dashboard", include_in_schema=False)
    async def dashboard(request: Request) -> Response:
        return page.response(request)

    @router.get("/dashboard/static/{name}", include_in_schema=False)
    async def dashboard_asset(name: str, request: Request) -> Response:
        asset = assets.get(name)
        if asset is None:
            raise HTTPException(404)
        return asset.response(request)

    return router
