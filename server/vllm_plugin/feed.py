"""VllmFeed: GET /v1/telemetry on vLLM, in headwise serve's JSON (docs/telemetry-api.md, "On vLLM").

The vLLM API process's counterpart of server/api/telemetry_feed.py. It keeps a bounded ring of
points, each one the plugin's merged per-head sums and counts (TelemetrySource.latest) and vLLM's
own counters (vllm_metrics.py) at one moment: the endpoint's background task adds one about
every `interval` seconds (run(), right after refreshing the source), and a read adds one when the
newest is that old. Windows then mean what they mean on headwise serve
(server/telemetry_window.py): per-head means are (sums_now - sums_then) / (counts_now -
counts_then), rates are counter differences over the span covered; "all" counts from zero,
since the server started, like vLLM's counters and the workers' sums.

Latency percentiles come from vLLM's histograms: the window's observations are the bucket
counts now minus then, and a percentile is interpolated linearly inside its bucket, as
Prometheus' histogram_quantile does (so it is an estimate, bounded by the bucket edges; max is
null). vLLM keeps no per-request telemetry, so recent_requests is always empty; load fields vLLM
has no metric for are null.

Runs on the API server's event loop only (no lock); no FastAPI and no vLLM imports here.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import torch

from server.latency import histogram_quantile
from server.samples import subtract
from server.telemetry_window import (LATENCIES, PERCENTILES, Point, baseline, head_means, latency_json, num, series,
                                     throughput, window_length)
from server.vllm_plugin.export import TelemetrySource
from server.vllm_plugin.snapshot import MergedTelemetry
from server.vllm_plugin.vllm_metrics import VllmCounters, empty_counters

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelDetails:
    """What the page shows of the served model beyond its layer x head grid; None where unknown."""

    name: str | None = None             # what vLLM loaded (its --model)
    architecture: str | None = None
    head_dim: int | None = None
    max_model_len: int | None = None
    block_size: int | None = None


@dataclass(frozen=True)
class VllmPoint(Point):
    """A point of the ring, with vLLM's counters it was made from."""

    vllm: VllmCounters


def plugin_json(latest: MergedTelemetry) -> dict:
    """The plugin's health: up on every rank, the problem if not, layers with telemetry off."""
    return {"up": latest.up, "problem": latest.problem,
            "disabled_layers": {str(k): v for k, v in sorted(latest.disabled.items())}}


class VllmFeed:
    def __init__(self, source: TelemetrySource, read_vllm: Callable[[], VllmCounters],
                 details: ModelDetails = ModelDetails(), *, interval: float = 5.0, history: int = 400,
                 clock: Callable[[], float] = time.monotonic, wall: Callable[[], float] = time.time) -> None:
        self.source = source
        self.details = details
        self.interval = interval
        self._read = read_vllm
        self._clock = clock
        self._wall = wall
        self._ring: deque[VllmPoint] = deque(maxlen=history)
        self._ring.append(self._take(clock()))
        first = self._ring[0]
        self._origin = VllmPoint(first.t, torch.zeros_like(first.sums), torch.zeros_like(first.counts),  # [L, H, S], [L, H]
                                 0, 0, 0, 0, first.num_running, first.num_waiting, first.kv_cache_usage,
                                 empty_counters())
        self._failure: str | None = None

    def model_json(self) -> dict:
        m, d = self.source.model, self.details
        return {"id": m.name, "name": d.name, "architecture": d.architecture, "layers": m.num_layers,
                "heads": m.num_heads, "kv_heads": m.num_kv_heads, "head_dim": d.head_dim,
                "max_model_len": d.max_model_len, "block_size": d.block_size}

    def _take(self, now: float) -> VllmPoint:
        hs = self.source.latest.head_stats
        v = self._read()
        return VllmPoint(now, hs.sums, hs.counts, v.generation_tokens, v.prompt_tokens, v.preemptions, v.finished,
                         v.num_running, v.num_waiting, v.kv_cache_usage, v)

    def record(self) -> None:
        """Add a point when the newest is `interval` seconds old."""
        now = self._clock()
        if now - self._ring[-1].t >= self.interval:
            self._ring.append(self._take(now))

    async def run(self, refresh: Callable[[], Awaitable[object]]) -> None:
        """Forever: every `interval` seconds refresh the source (the workers' sums) and record.
        A failure is logged once per kind and retried at the next tick."""
        while True:
            await asyncio.sleep(self.interval)
            try:
                await refresh()
                self.record()
                self._failure = None
            except Exception as exc:  # a broken metric read must not end the ticks
                kind = f"{type(exc).__name__}: {exc}"
                if kind != self._failure:
                    logger.exception("headwise: the telemetry feed could not record a point")
                self._failure = kind

    def snapshot(self, window: str = "1m") -> dict:
        """Everything the dashboard shows over `window` (one of WINDOWS). Raises UnknownWindowError."""
        length = window_length(window)
        self.record()
        now = self._clock()
        current = self._take(now)
        if length is None:
            base, since = self._origin, self._origin.t
        else:
            base, since = baseline(self._ring, now - length)
        cur, old = current.vllm, base.vllm
        finished = cur.finished_by_reason
        return {
            "object": "telemetry", "server": "vllm", "model": self.model_json(), "window": window,
            "window_seconds": length, "span_seconds": num(now - since, 3),
            "uptime_seconds": num(now - self._origin.t, 3), "time": num(self._wall(), 3),
            "heads": head_means(current, base),
            "latency": {key: _latency(cur, old, key) for key in LATENCIES},
            "throughput": throughput(current, base, now - since),
            "load": {"num_running": cur.num_running, "num_waiting": cur.num_waiting,
                     "kv_cache_usage": num(cur.kv_cache_usage, 4), "kv_cache_blocks": cur.kv_cache_blocks,
                     "kv_cache_free_blocks": None, "api_requests_in_flight": None},
            "counters": {
                "prompt_tokens": cur.prompt_tokens, "generation_tokens": cur.generation_tokens,
                "requests_finished": finished, "errors": finished.get("error", 0),
                "preemptions": cur.preemptions, "preemptions_in_window": cur.preemptions - old.preemptions,
                "rejected": cur.rejected, "rejected_total": sum(cur.rejected.values()),
                "prefix_cache_queries": cur.prefix_cache_queries, "prefix_cache_hits": cur.prefix_cache_hits,
            },
            "series": series([p for p in self._ring if p.t >= base.t], now),
            "recent_requests": [],
            "plugin": plugin_json(self.source.latest),
        }


def _latency(cur: VllmCounters, old: VllmCounters, key: str) -> dict:
    """Count, mean and percentiles of one latency over the window, from vLLM's histogram."""
    now = cur.latency.get(key)
    if now is None:
        return latency_json(0, None, None, {})
    h = subtract(now, old.latency.get(key))
    mean = h.sum / h.count if h.count else None
    return latency_json(h.count, mean, None, {q: histogram_quantile(q / 100, h) for q in PERCENTILES})
