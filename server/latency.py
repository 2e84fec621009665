"""Latency vocabulary shared by the server and the load-test client: histogram boundaries, the
one percentile, and Prometheus-style histograms with histogram_quantile.

Pure Python with no imports of ours or of third parties, so that the load-test client
(loadtests/) bins its own observations exactly as the server's /metrics does (server/metrics.py)
without pulling in prometheus_client or the engine, and server- and client-side percentiles
compare directly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

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

# The server's latency histograms (vLLM's semantics): key -> (family name, help, buckets).
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


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The q-th percentile (q in [0, 100]) of values in ascending order: linear interpolation
    between the closest ranks, at rank (n - 1) q / 100 (numpy.percentile's default, what vLLM
    reports). The caller sorts, once for any number of percentiles; unsorted input gives a wrong
    answer, not an error. Raises ValueError for no values or q outside [0, 100]."""
    if not sorted_values:
        raise ValueError("percentile of no values")
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile {q} outside [0, 100]")
    position = (len(sorted_values) - 1) * q / 100.0
    lo = math.floor(position)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (position - lo)


@dataclass(frozen=True)
class Histogram:
    """Prometheus-style: cumulative[i] counts observations <= bounds[i]; the last entry is +Inf."""

    bounds: tuple[float, ...]
    cumulative: tuple[int, ...]  # len(bounds) + 1
    sum: float
    count: int


def histogram_quantile(q: float, hist: Histogram) -> float | None:
    """Prometheus's histogram_quantile (q in [0, 1]): linear within the bucket holding rank q*count;
    the first bucket's lower edge is 0; a rank in the +Inf bucket answers the highest bound."""
    if hist.count == 0:
        return None
    rank = q * hist.count
    for i, upper in enumerate(hist.bounds):
        if hist.cumulative[i] >= rank:
            below = hist.cumulative[i - 1] if i else 0
            lower = hist.bounds[i - 1] if i else 0.0
            in_bucket = hist.cumulative[i] - below
            if in_bucket == 0:
                return upper
            return lower + (upper - lower) * (rank - below) / in_bucket
    return hist.bounds[-1] if hist.bounds else None
