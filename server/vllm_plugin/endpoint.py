"""vLLM endpoint plugin (`vllm.endpoint_plugins`, opt-in with VLLM_PLUGINS=headwise): exports the
workers' per-head telemetry through vLLM's own /metrics and serves GET /v1/telemetry.

attach_router adds a middleware that refreshes the merged telemetry (one collective_rpc to every
rank) right before each /metrics or /v1/telemetry request, so a scrape sees every token finished
before it. init_state builds the TelemetrySource from the engine client and registers
PluginCollector on vLLM's Prometheus registry.
"""

from __future__ import annotations

import logging
import os
from argparse import Namespace

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from server.engine.telemetry import STAT_NAMES
from server.exposition import ModelDescription
from server.vllm_plugin.export import PluginCollector, TelemetrySource
from server.vllm_plugin.settings import PluginSettings
from server.vllm_plugin.worker import SNAPSHOT_METHOD

logger = logging.getLogger(__name__)

WORKER_EXTENSION = "server.vllm_plugin.worker.HeadwiseWorkerExtension"
RPC_TIMEOUT_S = 5.0   # a scrape waits at most this long for the ranks (Prometheus' default timeout is 10 s)
_REFRESHED_PATHS = ("/metrics", "/v1/telemetry")


class HeadwiseEndpoint:
    name = "headwise"
    required_tasks = ("generate",)

    def __init__(self) -> None:
        self.source: TelemetrySource | None = None

    def attach_router(self, app: FastAPI) -> None:
        @app.middleware("http")
        async def refresh_headwise_telemetry(request: Request, call_next):
            if self.source is not None and request.url.path.rstrip("/") in _REFRESHED_PATHS:
                await self.source.refresh()
            return await call_next(request)

        @app.get("/v1/telemetry")
        async def headwise_telemetry(window: str = "all") -> JSONResponse:
            if window != "all":
                return _error(400, f"window must be 'all' on vLLM (means since start), got {window[:20]!r}",
                              "invalid_request_error", "window")
            if self.source is None:
                return _error(503, "headwise telemetry is not initialised", "server_error", None)
            return JSONResponse(telemetry_json(self.source), headers={"cache-control": "no-store"})

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

        get_prometheus_registry().register(PluginCollector(self.source))
        await self.source.refresh()


def _error(status: int, message: str, kind: str, param: str | None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": None}},
                        status_code=status)


def telemetry_json(source: TelemetrySource) -> dict:
    """The per-head part of headwise serve's GET /v1/telemetry (docs/telemetry-api.md) for the
    window "all" (means since the server started; null where a head has no rows), plus the
    plugin's health. Latency, load and recent requests are vLLM's own metrics' business."""
    latest = source.latest
    hs = latest.head_stats
    means = hs.means()                                                 # [L, H, NUM_STATS]
    empty = hs.counts == 0                                             # [L, H]
    m = source.model
    heads = {"rows": hs.rows, "counts": hs.counts.tolist()}
    for i, name in enumerate(STAT_NAMES):
        heads[name] = [[None if e else v for v, e in zip(vals, flags)]
                       for vals, flags in zip(means[..., i].tolist(), empty.tolist())]
    return {"object": "telemetry", "server": "vllm",
            "model": {"id": m.name, "layers": m.num_layers, "heads": m.num_heads, "kv_heads": m.num_kv_heads},
            "window": "all", "window_seconds": None, "heads": heads,
            "plugin": {"up": latest.up, "problem": latest.problem,
                       "disabled_layers": {str(k): v for k, v in sorted(latest.disabled.items())}}}
