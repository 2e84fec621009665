"""Accumulators of per-(layer, query head) attention statistics. Knows nothing of Prometheus.

Each engine step that computes telemetry yields a tensor [L, R, H, NUM_STATS] (R telemetry rows,
one per sampled token). HeadStats adds those into running sums, counts and per-layer histogram
counts of normalized entropy; a publisher reads a snapshot. RequestTelemetry keeps the same sums
for one request and turns them into the per-request means of DESIGN.md's "Contracts".
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch

from server.engine.attention import NUM_STATS, STAT_NAMES
from server.engine.request import RequestHeadTelemetry

NORMALIZED_ENTROPY = STAT_NAMES.index("normalized_entropy")


@dataclass(frozen=True)
class HeadStats:
    """A consistent copy of the accumulators at one moment (what a publisher exports).

    sums [L, H, NUM_STATS] float64; counts [L, H] int64 (rows seen per head; every statistic of a
    head has this count); histogram [L, len(buckets) + 1] int64 counts of normalized entropy per
    layer over all its heads' rows (last column: above the last bucket), non-cumulative;
    histogram_sum [L] float64; head_histogram [L, H, len(buckets) + 1] or None when off.
    """

    stat_names: tuple[str, ...]
    buckets: tuple[float, ...]
    sums: torch.Tensor
    counts: torch.Tensor
    histogram: torch.Tensor
    histogram_sum: torch.Tensor
    head_histogram: torch.Tensor | None
    rows: int

    def means(self) -> torch.Tensor:
        """[L, H, NUM_STATS] mean of each statistic (0 where a head has no rows yet)."""
        return self.sums / self.counts.clamp_min(1)[..., None].to(torch.float64)


class HeadStatsAccumulator:
    """Running per-head sums, thread-safe between the engine thread and readers."""

    def __init__(self, num_layers: int, num_heads: int, buckets: tuple[float, ...],
                 per_head_histograms: bool = False) -> None:
        self.buckets = buckets
        self._edges = torch.tensor(buckets, dtype=torch.float64)                      # [NB]
        self._sums = torch.zeros(num_layers, num_heads, NUM_STATS, dtype=torch.float64)  # [L, H, 5]
        self._counts = torch.zeros(num_layers, num_heads, dtype=torch.int64)           # [L, H]
        self._hist = torch.zeros(num_layers, len(buckets) + 1, dtype=torch.int64)      # [L, NB+1]
        self._hist_sum = torch.zeros(num_layers, dtype=torch.float64)                  # [L]
        self._head_hist = (torch.zeros(num_layers, num_heads, len(buckets) + 1, dtype=torch.int64)
                           if per_head_histograms else None)                           # [L, H, NB+1]
        self._rows = 0
        self._lock = threading.Lock()

    def add(self, stats: torch.Tensor) -> None:
        """stats [L, R, H, NUM_STATS] (any float dtype, any device)."""
        st = stats.detach().to("cpu", torch.float64)                 # [L, R, H, 5]
        num_layers, rows, num_heads, _ = st.shape
        ne = st[..., NORMALIZED_ENTROPY].contiguous()                # [L, R, H]
        # bucket index b: value <= buckets[b] (Prometheus "le" semantics); NB for above all.
        idx = torch.bucketize(ne, self._edges, right=False)          # [L, R, H]
        layer_counts = torch.zeros_like(self._hist)                  # [L, NB+1]
        layer_counts.scatter_add_(1, idx.reshape(num_layers, -1), torch.ones_like(idx.reshape(num_layers, -1)))
        with self._lock:
            self._sums += st.sum(dim=1)
            self._counts += rows
            self._hist += layer_counts
            self._hist_sum += ne.sum(dim=(1, 2))
            if self._head_hist is not None:
                self._head_hist.scatter_add_(2, idx.permute(0, 2, 1), torch.ones_like(idx.permute(0, 2, 1)))
            self._rows += rows

    def snapshot(self) -> HeadStats:
        with self._lock:
            return HeadStats(
                stat_names=STAT_NAMES, buckets=self.buckets, sums=self._sums.clone(),
                counts=self._counts.clone(), histogram=self._hist.clone(), histogram_sum=self._hist_sum.clone(),
                head_histogram=None if self._head_hist is None else self._head_hist.clone(), rows=self._rows)


class RequestTelemetry:
    """Sums of one request's telemetry rows; means on demand."""

    def __init__(self, num_layers: int, num_heads: int, num_kv_heads: int) -> None:
        self.num_kv_heads = num_kv_heads
        self.sums = torch.zeros(num_layers, num_heads, NUM_STATS, dtype=torch.float64)  # [L, H, 5]
        self.rows = 0

    def add_row(self, row: torch.Tensor) -> None:
        """row [L, H, NUM_STATS] (float64, cpu)."""
        self.sums += row
        self.rows += 1

    def result(self) -> RequestHeadTelemetry:
        num_layers, num_heads, _ = self.sums.shape
        means = (self.sums / max(self.rows, 1)).tolist()             # L x H x 5 nested lists
        per_stat = {name: [[head[i] for head in layer] for layer in means] for i, name in enumerate(STAT_NAMES)}
        return RequestHeadTelemetry(layers=num_layers, heads=num_heads, kv_heads=self.num_kv_heads,
                                    rows=self.rows, **per_stat)
