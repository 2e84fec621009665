"""Per-head and per-layer Prometheus families from a HeadStats snapshot, on two paths over the same data.

The families (DESIGN.md, "Exposition"), in this order:

- headwise_telemetry_rows_total (counter; labels model): telemetry rows aggregated;
- one summary per statistic of STAT_NAMES (HEAD_FAMILIES; sum and count, no quantiles) per
  (layer, head), labels layer, head, kv_head, model;
- headwise_layer_normalized_entropy (histogram per layer; labels layer, model);
- headwise_layer_attention_time_seconds (histogram per layer), when an attention-time snapshot
  (LayerHistogramSnapshot, kept by LayerHistograms) is given;
- headwise_head_normalized_entropy_distribution (histogram per (layer, head)), when the snapshot
  carries per-head histograms (a flag: its cardinality is above Prometheus guidance).

The two paths:

- HeadStatsText, the direct text path of our own /metrics (server/metrics.py): label strings are
  built once and lines formatted straight from the snapshot's lists, about 10x cheaper than
  prometheus_client's generic per-sample path for thousands of series.
- HeadStatsCollector, a prometheus_client collector reading snapshots through callables, so any
  CollectorRegistry can hold it: ours, or vLLM's (the vLLM plugin reuses it without our engine).

Both give the same families, label sets and values (tests/test_exposition.py parses both and
compares sample by sample); only the order of a summary's _sum and _count lines differs.

Imports prometheus_client and server.engine.telemetry only (no engine loop, no web framework).
"""

from __future__ import annotations

import bisect
import itertools
import math
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric, SummaryMetricFamily

from server.engine.telemetry import HeadStats

# family name, help
ROWS_FAMILY = ("headwise_telemetry_rows_total",
               "Telemetry rows aggregated: one per generated token whose step computed telemetry.")
# Per-(layer, head) summaries: telemetry's statistic name (STAT_NAMES) -> (family name, help).
HEAD_FAMILIES = {
    "entropy": ("headwise_head_entropy_nats", "Attention entropy of a query head, nats (sum and count over telemetry rows)."),
    "normalized_entropy": ("headwise_head_normalized_entropy",
                           "Attention entropy divided by ln(number of keys), in [0, 1] (sum and count over rows)."),
    "max_weight": ("headwise_head_max_weight", "Largest attention weight of a row (sum and count over rows)."),
    "sink_mass": ("headwise_head_sink_mass", "Attention mass on the first sink tokens (sum and count over rows)."),
    "lookback_distance": ("headwise_head_lookback_distance",
                          "Mean attended distance as a fraction of the context: 0 = self, 1 = start (sum and count)."),
}
LAYER_ENTROPY_FAMILY = ("headwise_layer_normalized_entropy",
                        "Normalized entropy of every head's telemetry rows, per layer.")
ATTENTION_TIME_FAMILY = ("headwise_layer_attention_time_seconds",
                         "Attention time of one layer in one engine step (telemetry included), on sampled steps.")
HEAD_ENTROPY_FAMILY = ("headwise_head_normalized_entropy_distribution",
                       "Normalized entropy per (layer, head); behind a flag (high cardinality).")
HEAD_LABELS = ("layer", "head", "kv_head", "model")
LAYER_LABELS = ("layer", "model")


@dataclass(frozen=True)
class ModelDescription:
    """What the labels need of a model: its served name and attention layout. Query head h
    shares KV head h // (num_heads / num_kv_heads) (grouped-query attention)."""

    name: str
    num_layers: int
    num_heads: int
    num_kv_heads: int

    def head_label_values(self) -> list[list[tuple[str, str, str, str]]]:
        """[layer][head] -> label values in HEAD_LABELS order."""
        group = self.num_heads // self.num_kv_heads
        return [[(str(layer), str(h), str(h // group), self.name) for h in range(self.num_heads)]
                for layer in range(self.num_layers)]

    def layer_label_values(self) -> list[tuple[str, str]]:
        """[layer] -> label values in LAYER_LABELS order."""
        return [(str(layer), self.name) for layer in range(self.num_layers)]


@dataclass(frozen=True)
class LayerHistogramSnapshot:
    """Per-layer histograms at one moment: cumulative[layer][b] counts the values <= buckets[b]
    (Prometheus "le"), with the count of all values last (L x (len(buckets) + 1)); sums[layer]
    is the sum of the layer's values."""

    buckets: tuple[float, ...]
    cumulative: tuple[tuple[int, ...], ...]
    sums: tuple[float, ...]


class LayerHistograms:
    """One histogram per layer, kept as plain counts (the sampled attention times: 30 series of
    ~17 lines). observe() runs on the engine thread, snapshot() on the scrape's."""

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

    def snapshot(self) -> LayerHistogramSnapshot:
        with self._lock:
            return LayerHistogramSnapshot(self.buckets, tuple(tuple(itertools.accumulate(row)) for row in self._counts),
                                          tuple(self._sums))


@dataclass(frozen=True)
class _Tables:
    """One HeadStats snapshot as nested Python lists (one tensor-to-list conversion per scrape)."""

    rows: int
    stat_names: tuple[str, ...]
    counts: list                # L x H
    sums: list                  # NUM_STATS x L x H
    layer_cumulative: list      # L x (NB+1)
    layer_sums: list            # L
    head_cumulative: list | None  # L x H x (NB+1), None when per-head histograms are off
    bounds: list[str]           # the "le" values, "+Inf" last


def _tables(hs: HeadStats) -> _Tables:
    head = hs.head_histogram
    return _Tables(
        rows=hs.rows, stat_names=hs.stat_names,
        counts=hs.counts.tolist(),                                   # [L, H]
        sums=hs.sums.permute(2, 0, 1).tolist(),                      # [NUM_STATS, L, H]
        layer_cumulative=hs.histogram.cumsum(dim=1).tolist(),        # [L, NB+1]
        layer_sums=hs.histogram_sum.tolist(),                        # [L]
        head_cumulative=None if head is None else head.cumsum(dim=2).tolist(),  # [L, H, NB+1]
        bounds=_bounds(hs.buckets))


class HeadStatsText:
    """The direct text path: Prometheus text format 0.0.4 for one HeadStats snapshot (and an
    optional attention-time snapshot). Label strings are built once, here."""

    def __init__(self, model: ModelDescription) -> None:
        m = _escape(model.name)
        self.model_labels = f'{{model="{m}"}}'
        # [layer][head] -> '{layer="..",head="..",kv_head="..",model=".."}'
        self.head_labels = [[f'{{layer="{layer}",head="{h}",kv_head="{kv}",model="{m}"}}' for layer, h, kv, _ in row]
                            for row in model.head_label_values()]
        # [layer] -> 'layer="..",model=".."' (histograms append le)
        self.layer_labels = [f'layer="{layer}",model="{m}"' for layer, _ in model.layer_label_values()]

    def render(self, hs: HeadStats, attention: LayerHistogramSnapshot | None = None) -> str:
        t = _tables(hs)
        out: list[str] = []
        _family(out, *ROWS_FAMILY, "counter")
        out.append(f"{ROWS_FAMILY[0]}{self.model_labels} {t.rows}\n")
        for s, stat in enumerate(t.stat_names):
            name, doc = HEAD_FAMILIES[stat]
            _family(out, name, doc, "summary")
            for lab_row, c_row, s_row in zip(self.head_labels, t.counts, t.sums[s]):
                for lab, c, v in zip(lab_row, c_row, s_row):
                    out.append(f"{name}_sum{lab} {_num(v)}\n{name}_count{lab} {c}\n")
        _family(out, *LAYER_ENTROPY_FAMILY, "histogram")
        _histograms(out, LAYER_ENTROPY_FAMILY[0], self.layer_labels, t.layer_cumulative, t.layer_sums, t.bounds)
        if attention is not None:
            _family(out, *ATTENTION_TIME_FAMILY, "histogram")
            _histograms(out, ATTENTION_TIME_FAMILY[0], self.layer_labels, attention.cumulative, attention.sums,
                        _bounds(attention.buckets))
        if t.head_cumulative is not None:
            name = HEAD_ENTROPY_FAMILY[0]
            _family(out, *HEAD_ENTROPY_FAMILY, "histogram")
            ne_sums = t.sums[t.stat_names.index("normalized_entropy")]   # L x H
            for lab_row, hist_row, sum_row in zip(self.head_labels, t.head_cumulative, ne_sums):
                _histograms(out, name, [lab[1:-1] for lab in lab_row], hist_row, sum_row, t.bounds)
        return "".join(out)


class HeadStatsCollector:
    """The same families as HeadStatsText, as a prometheus_client collector for any
    CollectorRegistry: each collect() takes one snapshot through head_stats() (and attention(),
    when given; without it the attention-time family is left out)."""

    def __init__(self, model: ModelDescription, head_stats: Callable[[], HeadStats],
                 attention: Callable[[], LayerHistogramSnapshot] | None = None) -> None:
        self.model = model
        self._head_stats = head_stats
        self._attention = attention
        self._head_values = model.head_label_values()     # [layer][head] -> HEAD_LABELS values
        self._layer_values = model.layer_label_values()   # [layer] -> LAYER_LABELS values

    def describe(self) -> Iterator[Metric]:
        """Every family collect() may yield, without samples (a registry checks names with it,
        and then need not call collect() when the collector is registered)."""
        yield CounterMetricFamily(*ROWS_FAMILY, labels=["model"])
        for name, doc in HEAD_FAMILIES.values():
            yield SummaryMetricFamily(name, doc, labels=HEAD_LABELS)
        yield HistogramMetricFamily(*LAYER_ENTROPY_FAMILY, labels=LAYER_LABELS)
        if self._attention is not None:
            yield HistogramMetricFamily(*ATTENTION_TIME_FAMILY, labels=LAYER_LABELS)
        yield HistogramMetricFamily(*HEAD_ENTROPY_FAMILY, labels=HEAD_LABELS)

    def collect(self) -> Iterator[Metric]:
        t = _tables(self._head_stats())
        rows = CounterMetricFamily(*ROWS_FAMILY, labels=["model"])
        rows.add_metric([self.model.name], t.rows)
        yield rows
        for s, stat in enumerate(t.stat_names):
            summary = SummaryMetricFamily(*HEAD_FAMILIES[stat], labels=HEAD_LABELS)
            for values_row, c_row, s_row in zip(self._head_values, t.counts, t.sums[s]):
                for values, c, v in zip(values_row, c_row, s_row):
                    summary.add_metric(values, c, v)
            yield summary
        yield _histogram_family(LAYER_ENTROPY_FAMILY, LAYER_LABELS, self._layer_values, t.layer_cumulative,
                                t.layer_sums, t.bounds)
        if self._attention is not None:
            a = self._attention()
            yield _histogram_family(ATTENTION_TIME_FAMILY, LAYER_LABELS, self._layer_values, a.cumulative, a.sums,
                                    _bounds(a.buckets))
        if t.head_cumulative is not None:
            ne_sums = t.sums[t.stat_names.index("normalized_entropy")]   # L x H
            yield _histogram_family(HEAD_ENTROPY_FAMILY, HEAD_LABELS, [v for row in self._head_values for v in row],
                                    [h for row in t.head_cumulative for h in row], [v for row in ne_sums for v in row],
                                    t.bounds)


def _histogram_family(family: tuple[str, str], label_names: Sequence[str], label_values: Sequence[Sequence[str]],
                      cumulative: Sequence[Sequence[int]], sums: Sequence[float],
                      bounds: Sequence[str]) -> HistogramMetricFamily:
    """One histogram family: series i has label_values[i], cumulative[i] (+Inf last) and sums[i]."""
    h = HistogramMetricFamily(*family, labels=label_names)
    for values, hist, total in zip(label_values, cumulative, sums):
        h.add_metric(values, list(zip(bounds, hist)), total)
    return h


def _bounds(buckets: Sequence[float]) -> list[str]:
    return [repr(float(b)) for b in buckets] + ["+Inf"]


def _histograms(out: list[str], name: str, labels: Sequence[str], cumulative: Sequence[Sequence[int]],
                sums: Sequence[float], bounds: Sequence[str]) -> None:
    """Histogram series: labels[i] is the inside of a label set ('a="x",b="y"'); cumulative[i]
    its bucket counts with +Inf last; sums[i] its sum."""
    for lab, hist, total in zip(labels, cumulative, sums):
        out.extend(f'{name}_bucket{{{lab},le="{le}"}} {c}\n' for le, c in zip(bounds, hist))
        out.append(f"{name}_sum{{{lab}}} {_num(total)}\n{name}_count{{{lab}}} {hist[-1]}\n")


def _family(out: list[str], name: str, doc: str, kind: str) -> None:
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
