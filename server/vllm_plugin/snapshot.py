"""The contract between vLLM's workers and the API process: one report per rank, merged into
one HeadStats over the model's global (layer, head) grid.

A worker answers the collective RPC with RankReport.to_wire() (plain lists, ints, floats and
strings: vLLM's msgpack channel carries them without pickling); the API process rebuilds the
reports with RankReport.from_wire and merges them with merge_reports. Under tensor parallelism
rank r holds query heads r * h .. r * h + h - 1 of every layer (vLLM's even split); under
pipeline parallelism each rank reports its own layers. Layer indices and head offsets are
global, so merging is placement plus addition.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from server.engine.telemetry import NUM_STATS, STAT_NAMES, HeadStats
from server.exposition import ModelDescription


@dataclass(frozen=True)
class LayerReport:
    """One layer's running sums on one rank (this rank's heads only)."""

    layer: int                      # global layer index
    head_offset: int                # global index of this rank's first query head
    sums: list[list[float]]         # [h][NUM_STATS] sums of each statistic over rows
    counts: list[int]               # [h] rows per head
    histogram: list[int]            # [len(buckets) + 1] normalized-entropy counts, non-cumulative
    histogram_sum: float
    rows: int
    disabled: str | None            # why telemetry is off for this layer, or None

    @classmethod
    def from_stats(cls, layer: int, head_offset: int, hs: HeadStats, disabled: str | None) -> LayerReport:
        """From a one-layer HeadStats (sums [1, h, NUM_STATS])."""
        return cls(layer=layer, head_offset=head_offset, sums=hs.sums[0].tolist(), counts=hs.counts[0].tolist(),
                   histogram=hs.histogram[0].tolist(), histogram_sum=float(hs.histogram_sum[0]), rows=hs.rows,
                   disabled=disabled)


@dataclass(frozen=True)
class RankReport:
    rank: int                       # tensor-parallel rank
    buckets: tuple[float, ...]
    sample_rate: float
    layers: tuple[LayerReport, ...]
    stock_layers: tuple[str, ...]   # attention layers without the headwise backend (plugin not active there)

    def to_wire(self) -> dict:
        return {"rank": self.rank, "buckets": list(self.buckets), "sample_rate": self.sample_rate,
                "stock_layers": list(self.stock_layers),
                "layers": [{"layer": r.layer, "head_offset": r.head_offset, "sums": r.sums, "counts": r.counts,
                            "histogram": r.histogram, "histogram_sum": r.histogram_sum, "rows": r.rows,
                            "disabled": r.disabled} for r in self.layers]}

    @classmethod
    def from_wire(cls, d: dict) -> RankReport:
        return cls(rank=int(d["rank"]), buckets=tuple(float(b) for b in d["buckets"]),
                   sample_rate=float(d["sample_rate"]), stock_layers=tuple(d["stock_layers"]),
                   layers=tuple(LayerReport(**layer) for layer in d["layers"]))


@dataclass(frozen=True)
class MergedTelemetry:
    """What the API process exports: the global HeadStats, the layers with telemetry off
    (layer -> reason), whether the plugin is active on every rank (problem says why not), and
    the fraction of steps that compute telemetry (the lowest over ranks; None before any report)."""

    head_stats: HeadStats
    disabled: dict[int, str]
    up: bool
    problem: str | None
    sample_rate: float | None = None


def empty_head_stats(model: ModelDescription, buckets: Sequence[float]) -> HeadStats:
    nl, nh, nb = model.num_layers, model.num_heads, len(buckets) + 1
    return HeadStats(stat_names=STAT_NAMES, buckets=tuple(buckets),
                     sums=torch.zeros(nl, nh, NUM_STATS, dtype=torch.float64),   # [L, H, 5]
                     counts=torch.zeros(nl, nh, dtype=torch.int64),              # [L, H]
                     histogram=torch.zeros(nl, nb, dtype=torch.int64),           # [L, NB+1]
                     histogram_sum=torch.zeros(nl, dtype=torch.float64),         # [L]
                     head_histogram=None, rows=0)


def merge_reports(reports: Sequence[RankReport], model: ModelDescription,
                  buckets: Sequence[float]) -> MergedTelemetry:
    """Place every rank's layer slices on the global grid; histograms of one layer add up over
    the ranks that hold its heads. Raises ValueError for a report outside the model's grid."""
    hs = empty_head_stats(model, buckets)
    disabled: dict[int, str] = {}
    problems: list[str] = []
    rows = 0
    if not reports:
        problems.append("no worker answered")
    for rep in reports:
        if tuple(rep.buckets) != tuple(buckets):
            raise ValueError(f"rank {rep.rank} uses histogram buckets {rep.buckets}, expected {tuple(buckets)}")
        if rep.stock_layers:
            problems.append(f"rank {rep.rank}: {len(rep.stock_layers)} attention layers run without the "
                            f"headwise backend (first: {rep.stock_layers[0]})")
        if not rep.layers and not rep.stock_layers:
            problems.append(f"rank {rep.rank}: no attention layer found")
        for layer in rep.layers:
            h = len(layer.counts)
            if not (0 <= layer.layer < model.num_layers and 0 <= layer.head_offset
                    and layer.head_offset + h <= model.num_heads):
                raise ValueError(f"rank {rep.rank} reports layer {layer.layer} heads {layer.head_offset}.."
                                 f"{layer.head_offset + h - 1}, outside {model.num_layers} x {model.num_heads}")
            heads = slice(layer.head_offset, layer.head_offset + h)
            hs.sums[layer.layer, heads] += torch.tensor(layer.sums, dtype=torch.float64).view(h, NUM_STATS)
            hs.counts[layer.layer, heads] += torch.tensor(layer.counts, dtype=torch.int64)
            hs.histogram[layer.layer] += torch.tensor(layer.histogram, dtype=torch.int64)
            hs.histogram_sum[layer.layer] += layer.histogram_sum
            rows = max(rows, layer.rows)
            if layer.disabled is not None:
                disabled[layer.layer] = layer.disabled
    merged = HeadStats(stat_names=hs.stat_names, buckets=hs.buckets, sums=hs.sums, counts=hs.counts,
                       histogram=hs.histogram, histogram_sum=hs.histogram_sum, head_histogram=None, rows=rows)
    rate = min((rep.sample_rate for rep in reports if rep.layers), default=None)
    return MergedTelemetry(head_stats=merged, disabled=disabled, up=not problems,
                           problem="; ".join(problems) or None, sample_rate=rate)
