"""Prometheus exposition: the only importer of prometheus_client; owns its CollectorRegistry.

Histogram boundaries live here so that the load-test client (loadtests/) bins its own
observations exactly as the server does, and server- and client-side percentiles compare.
"""

from __future__ import annotations

import bisect
import itertools
import math
import threading
from collections.abc import Callable, Mapping, Sequence

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily

# Time to first token (seconds): from a millisecond on a GPU to minutes on a loaded CPU.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                10.0, 20.0, 40.0, 80.0, 160.0, 640.0)
# Inter-token latency and time per output token (seconds).
TOKEN_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75,
                         1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
# Whole-request intervals: end-to-end, queue, prefill, decode (seconds).
REQUEST_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0,
                           20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
# Sampled attention time of one layer in one step (seconds).
ATTENTION_TIME_BUCKETS = (1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2,
                          5e-2, 0.1, 0.25)

# Per-(layer, head) summaries: the engine's statistic name -> the exported family.
HEAD_FAMILIES = {
    "entropy": ("headwise_head_entropy_nats", "Attention entropy of a query head, nats (sum and count over telemetry rows)."),
    "normalized_entropy": ("headwise_head_normalized_entropy",
                           "Attention entropy divided by ln(number of keys), in [0, 1] (sum and count over rows)."),
    "max_weight": ("headwise_head_max_weight", "Largest attention weight of a row (sum and count over rows)."),
    "sink_mass": ("headwise_head_sink_mass", "Attention mass on the first sink tokens (sum and count over rows)."),
    "lookback_distance": ("headwise_head_lookback_distance",
                          "Mean attended distance as a fraction of the context: 0 = self, 1 = start (sum and count)."),
}
# Latency histograms (vLLM's semantics): key -> (name, help, buckets).
LATENCY_HISTOGRAMS = {
    "ttft": ("headwise_time_to_first_token_seconds", "Time from arrival to the first generated token.",
             TTFT_BUCKETS),
    "itl": ("headwise_inter_token_latency_seconds", "Time between two consecutive generated tokens of a request.",
            TOKEN_LATENCY_BUCKETS),
    "tpot": ("headwise_request_time_per_output_token_seconds",
             "Per finished request: decode time / (output tokens - 1).", TOKEN_LATENCY_BUCKETS),
    "e2e": ("headwise_e2e_request_latency_seconds", "Time from arrival to the end of a finished request.",
            REQUEST_LATENCY_BUCKETS),
    "queue": ("headwise_request_queue_time_seconds", "Time from arrival to first scheduling.",
              REQUEST_LATENCY_BUCKETS),
    "prefill": ("headwise_request_prefill_time_seconds", "Time from first scheduling to the first token.",
                REQUEST_LATENCY_BUCKETS),
    "decode": ("headwise_request_decode_time_seconds", "Time from the first token to the last.",
               REQUEST_LATENCY_BUCKETS),
}
FINISH_REASONS = ("stop", "length", "abort")
REJECT_REASONS = ("queue_full", "draining", "invalid_request", "context_length_exceeded")


class Metrics:
    """All of headwise's Prometheus metrics, in a registry of its own.

    Latency histograms are fed by an engine step observer (a few observe() calls per step, none
    per head); load and counters are read from the engine when scraped (_EngineCollector); the
    per-head statistics are written from one snapshot of the engine's accumulators at scrape time
    (HeadStatsExposition: thousands of series, formatted directly rather than through the
    client's generic per-sample path, which costs ~10x more). The HTTP layer reports admission
    through track_api()."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, engine, model: str, version: str = "") -> None:
        self.engine = engine
        self.model = model
        self.registry = CollectorRegistry()
        self._api_in_flight: Callable[[], int] = lambda: 0
        self._api_rejected: Callable[[], Mapping[str, int]] = dict

        self._latency = {key: Histogram(name, doc, ["model"], buckets=buckets, registry=self.registry).labels(model)
                         for key, (name, doc, buckets) in LATENCY_HISTOGRAMS.items()}
        success = Counter("headwise_request_success", "Finished requests by finish reason.",
                          ["model", "finished_reason"], registry=self.registry)
        self._success = {r: success.labels(model, r) for r in FINISH_REASONS}
        self._errors = Counter("headwise_request_errors", "Requests ended by an engine failure.",
                               ["model"], registry=self.registry).labels(model)
        self.registry.register(_EngineCollector(self, version))
        mc = engine.model_config
        self.attention = LayerHistograms(mc.num_layers, ATTENTION_TIME_BUCKETS)
        self.heads = HeadStatsExposition(model, mc.num_layers, mc.num_heads, mc.num_kv_heads)
        engine.add_observer(self.observe_step)

    def track_api(self, in_flight: Callable[[], int], rejected: Callable[[], Mapping[str, int]]) -> None:
        """Where the HTTP layer's admission state is read at scrape time."""
        self._api_in_flight, self._api_rejected = in_flight, rejected

    def observe_step(self, step) -> None:
        """Engine observer (engine thread): one StepStats."""
        h = self._latency
        for t in step.time_to_first_token:
            h["ttft"].observe(t)
        for t in step.inter_token_latencies:
            h["itl"].observe(t)
        for f in step.finished:
            st = f.stats
            if f.finish_reason.value == "error":
                self._errors.inc()
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

    def collect(self):
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
        mc = engine.model_config
        info = InfoMetricFamily("headwise_model", "The served model and engine layout (value 1).")
        info.add_metric([], {"model": model, "layers": str(mc.num_layers), "heads": str(mc.num_heads),
                             "kv_heads": str(mc.num_kv_heads), "head_dim": str(mc.head_dim),
                             "block_size": str(engine.block_manager.block_size),
                             "max_model_len": str(engine.max_model_len), "version": self.version})
        yield info


class LayerHistograms:
    """One histogram per layer, kept as plain counts (the sampled attention times: 30 series of
    ~17 lines, which prometheus_client's generic path would spend most of a scrape formatting).
    observe() runs on the engine thread, snapshot() on the scrape's."""

    def __init__(self, num_layers: int, buckets: tuple[float, ...]) -> None:
        self.buckets = buckets
        self._counts = [[0] * (len(buckets) + 1) for _ in range(num_layers)]  # L x (NB+1), non-cumulative
        self._sums = [0.0] * num_layers
        self._lock = threading.Lock()

    def observe(self, values: Sequence[float]) -> None:
        """One value per layer. Bucket b counts values <= buckets[b] (Prometheus "le")."""
        with self._lock:
            for layer, v in enumerate(values):
                self._counts[layer][bisect.bisect_left(self.buckets, v)] += 1
                self._sums[layer] += v

    def snapshot(self) -> tuple[list[list[int]], list[float]]:
        """(cumulative counts L x (NB+1), sums L)."""
        with self._lock:
            return [list(itertools.accumulate(row)) for row in self._counts], list(self._sums)


class HeadStatsExposition:
    """Prometheus text for one HeadStats snapshot: per-(layer, head) summaries (sum and count) of
    each statistic, the per-layer normalized-entropy histogram, the telemetry row counter,
    per-(layer, head) histograms when the engine keeps them, and the per-layer attention time
    histogram. Label strings are built once."""

    def __init__(self, model: str, num_layers: int, num_heads: int, num_kv_heads: int) -> None:
        m = _escape(model)
        group = num_heads // num_kv_heads
        self.model_labels = f'{{model="{m}"}}'
        # [layer][head] -> '{layer="..",head="..",kv_head="..",model=".."}'
        self.head_labels = [[f'{{layer="{layer}",head="{h}",kv_head="{h // group}",model="{m}"}}'
                             for h in range(num_heads)] for layer in range(num_layers)]
        self.layer_labels = [f'layer="{layer}",model="{m}"' for layer in range(num_layers)]

    def render(self, hs, attention: tuple[list[list[int]], list[float]]) -> str:
        out: list[str] = []
        _family(out, "headwise_telemetry_rows_total", "counter",
                "Telemetry rows aggregated: one per generated token whose step computed telemetry.")
        out.append(f"headwise_telemetry_rows_total{self.model_labels} {hs.rows}\n")
        counts = hs.counts.tolist()                                   # L x H
        sums = hs.sums.permute(2, 0, 1).tolist()                      # NUM_STATS x L x H
        for s, stat in enumerate(hs.stat_names):
            name, doc = HEAD_FAMILIES[stat]
            _family(out, name, "summary", doc)
            for lab_row, c_row, s_row in zip(self.head_labels, counts, sums[s]):
                for lab, c, v in zip(lab_row, c_row, s_row):
                    out.append(f"{name}_sum{lab} {_num(v)}\n{name}_count{lab} {c}\n")
        bounds = _bounds(hs.buckets)
        name = "headwise_layer_normalized_entropy"
        _family(out, name, "histogram", "Normalized entropy of every head's telemetry rows, per layer.")
        _histograms(out, name, self.layer_labels, hs.histogram.cumsum(dim=1).tolist(), hs.histogram_sum.tolist(),
                    bounds)
        name = "headwise_layer_attention_time_seconds"
        _family(out, name, "histogram", "Attention time of one layer in one engine step (telemetry included), "
                                        "on sampled steps.")
        _histograms(out, name, self.layer_labels, *attention, _bounds(ATTENTION_TIME_BUCKETS))
        if hs.head_histogram is not None:
            name = "headwise_head_normalized_entropy_distribution"
            _family(out, name, "histogram", "Normalized entropy per (layer, head); behind a flag (high cardinality).")
            cumulative = hs.head_histogram.cumsum(dim=2).tolist()     # L x H x (NB+1)
            ne_sums = sums[hs.stat_names.index("normalized_entropy")]   # L x H
            for lab_row, hist_row, sum_row in zip(self.head_labels, cumulative, ne_sums):
                _histograms(out, name, [lab[1:-1] for lab in lab_row], hist_row, sum_row, bounds)
        return "".join(out)


def _bounds(buckets: Sequence[float]) -> list[str]:
    return [repr(float(b)) for b in buckets] + ["+Inf"]


def _histograms(out: list[str], name: str, labels: Sequence[str], cumulative: Sequence[Sequence[int]],
                sums: Sequence[float], bounds: Sequence[str]) -> None:
    """Histogram series: labels[i] is the inside of a label set ('a="x",b="y"'); cumulative[i]
    its bucket counts with +Inf last; sums[i] its sum."""
    for lab, hist, total in zip(labels, cumulative, sums):
        out.extend(f'{name}_bucket{{{lab},le="{le}"}} {c}\n' for le, c in zip(bounds, hist))
        out.append(f"{name}_sum{{{lab}}} {_num(total)}\n{name}_count{{{lab}}} {hist[-1]}\n")


def _family(out: list[str], name: str, kind: str, doc: str) -> None:
    out.append(f"# HELP {name} {doc}\n# TYPE {name} {kind}\n")


def _escape(value: str) -> str:
    """A label value in the text format: backslash, double quote and newline escaped."""
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _num(v: float) -> str:
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return repr(v)
