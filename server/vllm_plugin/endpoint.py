"""vLLM endpoint plugin (`vllm.endpoint_plugins`, opt-in with VLLM_PLUGINS=headwise): exports the
workers' per-head telemetry through vLLM's own /metrics, and serves headwise's operations page.

Routes added to vLLM's API server:
    GET /dashboard, /dashboard/static/<asset>   the very page of headwise serve (server/api/dashboard_page.py)
    GET /v1/telemetry?window=1m|5m|all          its JSON, from VllmFeed (feed.py; docs/telemetry-api.md, "On vLLM")
    GET /v1/telemetry/requests/{id}             404: vLLM keeps no per-request telemetry

vLLM's --api-key guards /v1/* and leaves the page public, as headwise serve does.

attach_router adds a middleware that refreshes the merged telemetry (one collective_rpc to every
rank) right before each /metrics or /v1/telemetry request, so a scrape sees every token finished
before it. init_state builds the TelemetrySource from the engine client, registers
PluginCollector on vLLM's Prometheus registry, and starts the feed's background task, which
refreshes and records a point every FEED_INTERVAL_S seconds while the server runs.
"""

from __future__ import annotations

import asyncio
import logging
import os
from argparse import Namespace

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from server.api.dashboard_page import page_router
from server.exposition import ModelDescription
from server.telemetry_window import UnknownWindowError
from server.vllm_plugin.export import PluginCollector, TelemetrySource
from server.vllm_plugin.feed import ModelDetails, VllmFeed
from server.vllm_plugin.settings import PluginSettings
from server.vllm_plugin.vllm_metrics import registry_reader
from server.vllm_plugin.worker import SNAPSHOT_METHOD

logger = logging.getLogger(__name__)

WORKER_EXTENSION = "server.vllm_plugin.worker.HeadwiseWorkerExtension"
RPC_TIMEOUT_S = 5.0   # a scrape waits at most this long for the ranks (Prometheus' default timeout is 10 s)
FEED_INTERVAL_S = 5.0
_REFRESHED_PATHS = ("/metrics", "/v1/telemetry")


class HeadwiseEndpoint:
    name = "headwise"
    required_tasks = ("generate",)

    def __init__(self) -> None:
        self.source: TelemetrySource | None = None
        self.feed: VllmFeed | None = None
        self._ticks: asyncio.Task | None = None

    def attach_router(self, app: FastAPI) -> None:
        @app.middleware("http")
        async def refresh_headwise_telemetry(request: Request, call_next):
            if self.source is not None and request.url.path.rstrip("/") in _REFRESHED_PATHS:
                await self.source.refresh()
            return await call_next(request)

        app.include_router(page_router())

        @app.get("/v1/telemetry", tags=["telemetry"])
        async def headwise_telemetry(window: str = "1m") -> JSONResponse:
            """headwise's live telemetry over a window (?window=1m|5m|all): per-(layer, head) means,
            latency percentiles, throughput, load and counters from vLLM's metrics. `recent` is
            accepted and ignored (no per-request telemetry on vLLM)."""
            if self.feed is None:
                return _error(503, "headwise telemetry is not initialised", "server_error", None, None)
            try:
                body = self.feed.snapshot(window)
            except UnknownWindowError as exc:
                return _error(400, str(exc), "invalid_request_error", "window", "invalid_value")
            return JSONResponse(body, headers={"cache-control": "no-store"})

        @app.get("/v1/telemetry/requests/{request_id}", tags=["telemetry"])
        async def headwise_telemetry_request(request_id: str) -> JSONResponse:
            return _error(404, "vLLM keeps no per-request telemetry: the headwise plugin sees per-head sums, "
                               "not requests (GET /v1/telemetry has the per-head means over a window)",
                          "invalid_request_error", "request_id", "request_not_found")

    async def init_state(self, engine_client, state, args: Namespace) -> None:
        if engine_client is None:
            logger.error("headwise: no engine client (render-only server); per-head telemetry is not exported")
            return
        config = engine_client.vllm_config
        mc = config.model_config
        model = ModelDescription(name=str(mc.served_model_name), num_layers=mc.get_total_num_hidden_layers(),
                                 num_heads=mc.hf_text_config.num_attention_heads,
                                 num_kv_heads=mc.get_total_num_kv_heads())
        if config.parallel_config.worker_extension_cls != WORKER_EXTENSION:
            logger.error("headwise: start vLLM with --worker-extension-cls %s, or the workers cannot report "
                         "per-head telemetry (headwise_telemetry_up stays 0)", WORKER_EXTENSION)

        async def fetch() -> list[dict]:
            return await engine_client.collective_rpc(SNAPSHOT_METHOD, timeout=RPC_TIMEOUT_S)

        self.source = TelemetrySource(model, PluginSettings.from_env().buckets, fetch)
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            # several API server processes share metrics through files; a collector is not one of them
            logger.error("headwise: per-head families are not exported with several API server processes "
                         "(PROMETHEUS_MULTIPROC_DIR is set); GET /v1/telemetry still works")
        from vllm.v1.metrics.prometheus import get_prometheus_registry

        registry = get_prometheus_registry()
        registry.register(PluginCollector(self.source))
        await self.source.refresh()
        details = ModelDetails(name=str(mc.model), architecture=getattr(mc, "architecture", None),
                               head_dim=mc.get_head_size(), max_model_len=mc.max_model_len,
                               block_size=config.cache_config.block_size)
        self.feed = VllmFeed(self.source, registry_reader(registry), details, interval=FEED_INTERVAL_S)
        self._ticks = asyncio.get_running_loop().create_task(self.feed.run(self.source.refresh),
                                                             name="headwise-telemetry-feed")


def _error(status: int, message: str, kind: str, param: str | None, code: str | None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}},
                        status_code=status)
