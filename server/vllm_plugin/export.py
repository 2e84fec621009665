"""The API-process side: fetch every rank's report, merge, and export through a registry.

TelemetrySource keeps the latest MergedTelemetry; refresh() fetches the ranks' reports (an async
callable: the engine client's collective_rpc) and merges them (snapshot.py). A failed fetch keeps
the last values and marks the plugin down, logging the reason once per change. PluginCollector is
a prometheus_client collector for any CollectorRegistry (vLLM's, in the server): the families of
headwise serve through server.exposition.HeadStatsCollector, plus

    headwise_telemetry_up{model}                          1 when the plugin runs on every rank
    headwise_telemetry_sample_rate{model}                 the workers' fraction of sampled steps
    headwise_telemetry_layer_disabled{layer,reason,model} 1 per layer whose telemetry is off
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterator, Sequence

from prometheus_client.core import GaugeMetricFamily, Metric

from server.exposition import HeadStatsCollector, ModelDescription
from server.vllm_plugin.snapshot import MergedTelemetry, RankReport, empty_head_stats, merge_reports

logger = logging.getLogger(__name__)

UP_FAMILY = ("headwise_telemetry_up",
             "1 when the headwise vLLM plugin computes per-head telemetry on every rank, else 0 (see the log).")
RATE_FAMILY = ("headwise_telemetry_sample_rate",
               "Fraction of engine steps that compute per-head telemetry (HEADWISE_TELEMETRY_SAMPLE_RATE).")
DISABLED_FAMILY = ("headwise_telemetry_layer_disabled",
                   "1 for each attention layer whose telemetry is off, labelled with the reason.")


class TelemetrySource:
    def __init__(self, model: ModelDescription, buckets: Sequence[float],
                 fetch: Callable[[], Awaitable[list[dict]]]) -> None:
        self.model = model
        self.buckets = tuple(buckets)
        self._fetch = fetch
        self._lock = asyncio.Lock()
        self.latest = MergedTelemetry(head_stats=empty_head_stats(model, buckets), disabled={}, up=False,
                                      problem="no report fetched yet")
        self._logged: str | None = None

    async def refresh(self) -> MergedTelemetry:
        async with self._lock:
            try:
                wires = await self._fetch()
                merged = merge_reports([RankReport.from_wire(w) for w in wires], self.model, self.buckets)
            except Exception as exc:  # an RPC error, a worker without the extension: down, with the reason
                merged = MergedTelemetry(head_stats=self.latest.head_stats, disabled=self.latest.disabled, up=False,
                                         problem=f"fetching the workers' telemetry failed: {type(exc).__name__}: {exc}",
                                         sample_rate=self.latest.sample_rate)
            if merged.problem != self._logged:
                if merged.problem is not None:
                    logger.error("headwise: per-head telemetry is down: %s", merged.problem)
                elif self._logged is not None:
                    logger.warning("headwise: per-head telemetry is up again")
                self._logged = merged.problem
            self.latest = merged
            return merged


class PluginCollector:
    """headwise serve's per-head families plus the plugin's health, from TelemetrySource.latest."""

    def __init__(self, source: TelemetrySource) -> None:
        self.source = source
        self._heads = HeadStatsCollector(source.model, lambda: source.latest.head_stats)

    def describe(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(*UP_FAMILY, labels=["model"])
        yield GaugeMetricFamily(*RATE_FAMILY, labels=["model"])
        yield GaugeMetricFamily(*DISABLED_FAMILY, labels=["layer", "reason", "model"])
        yield from self._heads.describe()

    def collect(self) -> Iterator[Metric]:
        latest, name = self.source.latest, self.source.model.name
        up = GaugeMetricFamily(*UP_FAMILY, labels=["model"])
        up.add_metric([name], 1.0 if latest.up else 0.0)
        yield up
        if latest.sample_rate is not None:
            rate = GaugeMetricFamily(*RATE_FAMILY, labels=["model"])
            rate.add_metric([name], latest.sample_rate)
            yield rate
        off = GaugeMetricFamily(*DISABLED_FAMILY, labels=["layer", "reason", "model"])
        for layer, reason in sorted(latest.disabled.items()):
            off.add_metric([str(layer), reason, name], 1.0)
        yield off
        yield from self._heads.collect()
