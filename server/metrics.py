"""Metrics: all of headwise's Prometheus metrics over a typed view of engine state (EngineView),
in a CollectorRegistry of its own. In server/, only this module and server/exposition.py (which
renders the per-head and per-layer families) import prometheus_client.

Histogram boundaries and the latency histogram table live in server/latency.py (pure Python),
so that the load-test client (loadtests/) bins its own observations exactly as the server does
without importing this module.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Protocol, runtime_checkable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily, Metric

from server.config import ModelConfig
from server.engine.engine import ERROR_REASONS, EngineStats, StepStats
from server.engine.request import GRAMMAR_KINDS, FinishReason
from server.engine.telemetry import HeadStats
from server.exposition import HeadStatsText, LayerHistograms, ModelDescription
from server.latency import ATTENTION_TIME_BUCKETS, LATENCY_HISTOGRAMS

# headwise_request_success{finished_reason}: every finish reason but ERROR, which has its own
# counter (headwise_request_errors); in FinishReason's order (stop, length, abort).
FINISH_REASONS = tuple(r.value for r in FinishReason if r is not FinishReason.ERROR)
REJECT_REASONS = ("queue_full", "draining", "invalid_request", "context_length_exceeded", "slow_consumer")


@runtime_checkable
class EngineView(Protocol):
    """What Metrics reads of an engine (server.engine.engine.Engine is one)."""

    @property
    def model_config(self) -> ModelConfig: ...

    @property
    def max_model_len(self) -> int: ...

    @property
    def block_size(self) -> int: ...

    def stats(self) -> EngineStats: ...

    def head_stats_snapshot(self) -> HeadStats: ...

    def add_observer(self, observer: Callable[[StepStats], None]) -> None: ...


class Metrics:
    """All of headwise's Prometheus metrics, in a registry of its own.

    Latency histograms are fed by an engine step observer (a few observe() calls per step, none
    per head); load and counters are read from the engine when scraped (_EngineCollector); the
    per-head statistics are written from one snapshot of the engine's accumulators at scrape time
    (server.exposition.HeadStatsText: thousands of series, formatted directly rather than through
    the client's generic per-sample path, which costs ~10x more). The HTTP layer reports
    admission (requests in flight, refusals, constrained requests) through track_api()."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, engine: EngineView, model: str, version: str = "") -> None:
        self.engine = engine
        self.model = model
        self.registry = CollectorRegistry()
        self._api_in_flight: Callable[[], int] = lambda: 0
        self._api_rejected: Callable[[], Mapping[str, int]] = dict
        self._api_structured: Callable[[], Mapping[str, int]] = dict

        self._latency = {key: Histogram(name, doc, ["model"], buckets=buckets, registry=self.registry).labels(model)
                         for key, (name, doc, buckets) in LATENCY_HISTOGRAMS.items()}
        success = Counter("headwise_request_success", "Finished requests by finish reason.",
                          ["model", "finished_reason"], registry=self.registry)
        self._success = {r: success.labels(model, r) for r in FINISH_REASONS}
        errors = Counter("headwise_request_errors", "Requests ended by an engine failure, by cause.",
                         ["model", "reason"], registry=self.registry)
        self._errors = {r: errors.labels(model, r) for r in (*ERROR_REASONS, "other")}
        self.registry.register(_EngineCollector(self, version))
        mc = engine.model_config
        self.attention = LayerHistograms(mc.num_layers, ATTENTION_TIME_BUCKETS)
        self.heads = HeadStatsText(ModelDescription(model, mc.num_layers, mc.num_heads, mc.num_kv_heads))
        engine.add_observer(self.observe_step)

    def track_api(self, in_flight: Callable[[], int], rejected: Callable[[], Mapping[str, int]],
                  structured: Callable[[], Mapping[str, int]]) -> None:
        """Where the HTTP layer's admission state is read at scrape time: engine requests in
        flight, refused requests by reason, admitted requests with an output constraint by type."""
        self._api_in_flight, self._api_rejected, self._api_structured = in_flight, rejected, structured

    def observe_step(self, step: StepStats) -> None:
        """Engine observer (engine thread): one StepStats."""
        h = self._latency
        for t in step.time_to_first_token:
            h["ttft"].observe(t)
        for t in step.inter_token_latencies:
            h["itl"].observe(t)
        for f in step.finished:
            st = f.stats
            if f.finish_reason == FinishReason.ERROR:
                self._errors[f.error_reason if f.error_reason in self._errors else "other"].inc()
            else:
                self._success[f.finish_reason.value].inc()
            h["e2e"].observe(st.e2e_latency)
            h["queue"].observe(st.queue_time)
            if st.prefill_time is not None:
                h["prefill"].observe(st.prefill_time)
            if st.decode_time is not None:
                h["decode"].observe(st.decode_time)
                if st.num_output_tokens > 1:
                    h["tpot"].observe(st.decode_time / (st.num_output_tokens - 1))
        if step.attention_times is not None:
            self.attention.observe(step.attention_times)

    def render(self) -> bytes:
        """The whole exposition, Prometheus text format 0.0.4 (content_type)."""
        text = self.heads.render(self.engine.head_stats_snapshot(), self.attention.snapshot())
        return generate_latest(self.registry) + text.encode()


class _EngineCollector:
    """Reads the engine at scrape time: load gauges, token and cache counters, model info."""

    def __init__(self, metrics: Metrics, version: str) -> None:
        self.m = metrics
        self.version = version

    def collect(self) -> Iterator[Metric]:
        m, engine = self.m, self.m.engine
        st = engine.stats()
        model = m.model

        def gauge(name: str, doc: str, value: float):
            g = GaugeMetricFamily(name, doc, labels=["model"])
            g.add_metric([model], value)
            return g

        def counter(name: str, doc: str, value: float):
            c = CounterMetricFamily(name, doc, labels=["model"])
            c.add_metric([model], value)
            return c

        yield gauge("headwise_num_requests_running", "Requests in the running batch.", st.num_running)
        yield gauge("headwise_num_requests_waiting", "Requests waiting to be scheduled.", st.num_waiting)
        yield gauge("headwise_kv_cache_usage_ratio", "Fraction of KV cache blocks in use (0..1).", st.kv_cache_usage)
        yield gauge("headwise_kv_cache_blocks", "KV cache blocks in total.", st.num_blocks)
        yield gauge("headwise_kv_cache_free_blocks", "KV cache blocks free or cached-and-evictable.", st.num_free_blocks)
        yield gauge("headwise_api_requests_in_flight", "Engine requests admitted by the HTTP server, not finished.",
                    m._api_in_flight())
        yield counter("headwise_prompt_tokens", "Prompt tokens of requests that produced a first token.",
                      st.prompt_tokens)
        yield counter("headwise_generation_tokens", "Generated tokens.", st.generation_tokens)
        yield counter("headwise_num_preemptions", "Requests preempted (recomputed later) for lack of KV blocks.",
                      st.num_preemptions)
        yield counter("headwise_prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
                      st.prefix_cache_queries)
        yield counter("headwise_prefix_cache_hits", "Prompt tokens found in the prefix cache.", st.prefix_cache_hits)
        yield counter("headwise_engine_steps", "Engine steps that ran a batch.", st.steps)
        rejected = CounterMetricFamily("headwise_requests_rejected", "Requests refused before generation, by reason.",
                                       labels=["model", "reason"])
        counts = m._api_rejected()
        for reason in REJECT_REASONS:
            rejected.add_metric([model, reason], counts.get(reason, 0))
        yield rejected
        structured = CounterMetricFamily("headwise_structured_requests",
                                         "Admitted requests with an output constraint, by type.",
                                         labels=["model", "type"])
        counts = m._api_structured()
        for kind in GRAMMAR_KINDS:
            structured.add_metric([model, kind], counts.get(kind, 0))
        yield structured
        mc = engine.model_config
        info = InfoMetricFamily("headwise_model", "The served model and engine layout (value 1).")
        info.add_metric([], {"model": model, "layers": str(mc.num_layers), "heads": str(mc.num_heads),
                             "kv_heads": str(mc.num_kv_heads), "head_dim": str(mc.head_dim),
                             "block_size": str(engine.block_size),
                             "max_model_len": str(engine.max_model_len), "version": self.version})
        yield info
