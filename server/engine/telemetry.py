"""THE per-head attention statistics: names, accumulator layout, merge, finalize, aggregation.

Everything that computes or publishes a statistic imports its vocabulary from here: attention
backends (ours and the vLLM plugin's), the runner, the engine, the exposition and the API. This
module imports torch and nothing else of ours.

Definitions (DESIGN.md, "Per-head telemetry"), for one query row at position i over keys
j = 0..i, scores s_j: a flash-style kernel carries, per (row, query head), the running max m and
the centred sums

    l = sum_j e_j,   t = sum_j e_j (s_j - m) <= 0,   w_c = sum_j e_j W[j, c]

with e_j = exp(s_j - m) and W the per-key weight columns of KEY_WEIGHT_COLUMNS (the sink
indicator j < sink_tokens and the position j). A new statistic built from one more weighted sum
is one more column, not a new kernel. From the accumulators alone:

    entropy H = ln l - t / l (both terms >= 0, nothing cancels),  max weight 1 / l,
    sink mass w_sink / l,  look-back distance (i - w_pos / l) / i,  normalized H / ln(i + 1).

Partial accumulators of disjoint key ranges (split-K tiles, or shards of another rank) merge
exactly with merge_partials (the centred merge).

Aggregation: HeadStatsAccumulator keeps running per-(layer, head) sums, counts and histograms of
every telemetry row (HeadStats is its snapshot, what a publisher exports); RequestTelemetry the
same sums for one request, turned into the per-request means of DESIGN.md's "Contracts"
(RequestHeadTelemetry).

References: FlashAttention-2 (online softmax), StreamingLLM (attention sinks), ViT mean
attention distance.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass

import torch

# Column order of a stats tensor [..., NUM_STATS].
STAT_NAMES = ("entropy", "normalized_entropy", "max_weight", "sink_mass", "lookback_distance")
NUM_STATS = len(STAT_NAMES)
NORMALIZED_ENTROPY = STAT_NAMES.index("normalized_entropy")

# Per-key weight columns W[j, c]; the accumulators carry one weighted sum per column.
KEY_WEIGHT_COLUMNS = ("sink", "position")
# Accumulator layout [..., NUM_ACCUMULATORS]: l, t, then one weighted sum per key-weight column.
ACC_L, ACC_T = 0, 1
NUM_ACCUMULATORS = 2 + len(KEY_WEIGHT_COLUMNS)


def key_weights(n: int, sink_tokens: int, device: torch.device | str = "cpu",
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[n, len(KEY_WEIGHT_COLUMNS)] per-key weights of keys 0..n-1: (j < sink_tokens, j).

    e @ key_weights(n) gives the weighted accumulator columns of a row's unnormalized weights e [.., n].
    """
    pos = torch.arange(n, device=device, dtype=dtype)                # [n]
    return torch.stack([(pos < sink_tokens).to(dtype), pos], dim=-1)  # [n, 2]


def merge_partials(m: torch.Tensor, acc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Centred merge of S partial accumulators over disjoint key ranges (split-K, shards).

    m [S, ...] each partial's running max (a large finite negative for a partial that saw no
    key: never -inf, DESIGN.md's first-tile trap);
    acc [S, ..., NUM_ACCUMULATORS] in the frame of its own m. Returns (M [...], acc [..., NUM_ACCUMULATORS])
    in the frame of M = max m: with w_s = exp(m_s - M), L = sum w_s l_s,
    T = sum w_s (t_s + (m_s - M) l_s), and every weighted column sum w_s c_s. An empty partial
    (l = 0) contributes exactly 0 to each.
    """
    big_m = m.amax(dim=0)                                            # [...]
    delta = m - big_m                                                # [S, ...] <= 0
    w = torch.exp(delta)                                             # [S, ...]
    l = acc[..., ACC_L]                                              # [S, ...]
    shifted = acc.clone()                                            # [S, ..., A]
    # (m_s - M) l_s is 0 for an empty partial (l = 0) even though delta is huge: no NaN, no inf
    shifted[..., ACC_T] = acc[..., ACC_T] + torch.where(l > 0, delta * l, torch.zeros_like(l))  # [S, ...]
    merged = (w[..., None] * shifted).sum(dim=0)                     # [..., A]
    return big_m, merged


def finalize_stats(acc: torch.Tensor, context_lens: torch.Tensor) -> torch.Tensor:
    """Accumulators -> statistics, for any number of rows at once (one call per step).

    acc [..., H, NUM_ACCUMULATORS] holds (l, t, sum_{j<sink} e_j, sum e_j j) in the frame of the
    row maximum; context_lens [...] is each row's key count n (query position n - 1),
    broadcastable to acc's leading dims. Returns [..., H, NUM_STATS] in STAT_NAMES order.
    """
    l, t, sink, pos_sum = acc.unbind(dim=-1)                         # [..., H] each
    inv_l = l.reciprocal()                                           # [..., H] the max weight
    entropy = torch.log(l) - t * inv_l                               # [..., H] both terms >= 0
    n = context_lens.to(acc.dtype)[..., None]                        # [..., 1]
    i = n - 1                                                        # [..., 1] query position
    inv_log_n = torch.where(n > 1, torch.log(n), torch.inf).reciprocal()  # [..., 1], 0 for one key
    inv_i = torch.where(i > 0, i, torch.inf).reciprocal()            # [..., 1], 0 at position 0
    lookback = (i - pos_sum * inv_l) * inv_i                         # [..., H]
    return torch.stack([entropy, entropy * inv_log_n, inv_l, sink * inv_l, lookback], dim=-1)  # [..., H, 5]


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


@dataclass(frozen=True)
class RequestHeadTelemetry:
    """Means per (layer, query head) over a request's telemetry rows (DESIGN.md, "Contracts").

    Each statistic (one field per name of STAT_NAMES) is an L x H nested list. rows is how many
    query rows were averaged.
    """

    layers: int
    heads: int
    kv_heads: int
    rows: int
    entropy: list[list[float]]
    normalized_entropy: list[list[float]]
    max_weight: list[list[float]]
    sink_mass: list[list[float]]
    lookback_distance: list[list[float]]

    def to_dict(self) -> dict:
        return {"layers": self.layers, "heads": self.heads, "kv_heads": self.kv_heads, "rows": self.rows,
                **{name: getattr(self, name) for name in STAT_NAMES}}


def combine_request_telemetry(parts: Sequence[RequestHeadTelemetry]) -> RequestHeadTelemetry:
    """Row-weighted mean of several requests' means (the choices of one API request), as if
    their rows had been averaged together. Parts with no rows weigh equally when all have none."""
    if len(parts) == 1:
        return parts[0]
    rows = sum(p.rows for p in parts)
    weights = [p.rows / rows if rows else 1 / len(parts) for p in parts]
    first = parts[0]
    means = {name: [[sum(w * getattr(p, name)[layer][head] for w, p in zip(weights, parts))
                     for head in range(first.heads)] for layer in range(first.layers)]
             for name in STAT_NAMES}
    return RequestHeadTelemetry(layers=first.layers, heads=first.heads, kv_heads=first.kv_heads, rows=rows, **means)


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
