"""vLLM's own Prometheus metrics, as the plugin's telemetry feed reads them in the API process.

vLLM's stat logger (vllm/v1/metrics/loggers.py, PrometheusStatLogger) keeps its latency
histograms, token and request counters and load gauges in prometheus_client's registry of the
API process. read() collects only the samples named in SAMPLE_NAMES through
registry.restricted_registry, so the plugin's ~3,800 per-head series are never rendered for it,
and sums each family over its label sets (model_name, engine: one model, any number of
data-parallel engines); the KV cache usage is the largest over engines.

A family vLLM does not export (an older release, --disable-log-stats) reads as None, or as an
empty histogram / zero counter where a zero is the truth for "nothing counted yet".
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from server.latency import Histogram
from server.samples import Snapshot, histogram_of

# the dashboard's latency key (server.telemetry_window.LATENCIES) -> vLLM's histogram family
LATENCY_FAMILIES = {
    "time_to_first_token": "vllm:time_to_first_token_seconds",
    "inter_token_latency": "vllm:inter_token_latency_seconds",
    "e2e_request_latency": "vllm:e2e_request_latency_seconds",
    "queue_time": "vllm:request_queue_time_seconds",
}
GENERATION_TOKENS = "vllm:generation_tokens_total"
PROMPT_TOKENS = "vllm:prompt_tokens_total"
REQUEST_SUCCESS = "vllm:request_success_total"            # label finished_reason
PREEMPTIONS = "vllm:num_preemptions_total"
PREFIX_QUERIES = "vllm:prefix_cache_queries_total"
PREFIX_HITS = "vllm:prefix_cache_hits_total"
ADMISSION_REJECTIONS = "vllm:admission_rejections_total"  # label reason
RUNNING = "vllm:num_requests_running"
WAITING = "vllm:num_requests_waiting"
KV_CACHE_USAGE = "vllm:kv_cache_usage_perc"               # a fraction, 0..1, despite the name
CACHE_CONFIG_INFO = "vllm:cache_config_info"              # label num_gpu_blocks

SAMPLE_NAMES = frozenset({
    *(f + suffix for f in LATENCY_FAMILIES.values() for suffix in ("_bucket", "_sum", "_count")),
    GENERATION_TOKENS, PROMPT_TOKENS, REQUEST_SUCCESS, PREEMPTIONS, PREFIX_QUERIES, PREFIX_HITS,
    ADMISSION_REJECTIONS, RUNNING, WAITING, KV_CACHE_USAGE, CACHE_CONFIG_INFO,
})


@dataclass(frozen=True)
class VllmCounters:
    """vLLM's cumulative counters (since the server started) and its load, at one moment."""

    latency: dict[str, Histogram | None]    # LATENCY_FAMILIES key -> cumulative histogram
    generation_tokens: int
    prompt_tokens: int
    finished_by_reason: dict[str, int]      # finished_reason -> requests (stop, length, abort, error, ...)
    preemptions: int
    prefix_cache_queries: int | None
    prefix_cache_hits: int | None
    rejected: dict[str, int]                # admission rejections by reason (vLLM's queue limits)
    num_running: int | None
    num_waiting: int | None
    kv_cache_usage: float | None
    kv_cache_blocks: int | None

    @property
    def finished(self) -> int:
        return sum(self.finished_by_reason.values())


def _int(value: float | None) -> int | None:
    return None if value is None else int(round(value))


def counters_of(snap: Snapshot) -> VllmCounters:
    blocks = [b for b in snap.label_values(CACHE_CONFIG_INFO, "num_gpu_blocks") if b.isdigit()]
    return VllmCounters(
        latency={key: histogram_of(snap, family) for key, family in LATENCY_FAMILIES.items()},
        generation_tokens=_int(snap.total(GENERATION_TOKENS)) or 0,
        prompt_tokens=_int(snap.total(PROMPT_TOKENS)) or 0,
        finished_by_reason={r: int(round(v)) for r, v in snap.by_label(REQUEST_SUCCESS, "finished_reason").items()},
        preemptions=_int(snap.total(PREEMPTIONS)) or 0,
        prefix_cache_queries=_int(snap.total(PREFIX_QUERIES)),
        prefix_cache_hits=_int(snap.total(PREFIX_HITS)),
        rejected={r: int(round(v)) for r, v in snap.by_label(ADMISSION_REJECTIONS, "reason").items()},
        num_running=_int(snap.total(RUNNING)),
        num_waiting=_int(snap.total(WAITING)),
        kv_cache_usage=snap.largest(KV_CACHE_USAGE),
        kv_cache_blocks=max(map(int, blocks)) if blocks else None,
    )


def empty_counters() -> VllmCounters:
    """Nothing counted: the counters before the first request, or of a server with no vLLM metrics."""
    return counters_of(Snapshot({}))


def registry_reader(registry) -> Callable[[], VllmCounters]:
    """A reader of vLLM's metrics in `registry` (a prometheus_client CollectorRegistry: vLLM's,
    from vllm.v1.metrics.prometheus.get_prometheus_registry()), collecting SAMPLE_NAMES only."""
    restricted = registry.restricted_registry(SAMPLE_NAMES)
    return lambda: counters_of(Snapshot.of(restricted.collect()))
