"""Statistics of a load-test run: pure functions of the records, no I/O, no clocks.

Definitions (the server's, server/engine/engine.py and DESIGN.md; vLLM's for TPOT):
- TTFT: first token's arrival - request sent.
- ITL: gaps between successive token arrivals, one value per token after the first. A chunk that
  carried k tokens after a gap g (the server coalesced them) counts as k arrivals spread evenly
  over g, so the ITL values of a request sum to last token - first token and number tokens - 1,
  as the server's histogram does. Extra tokens in the first chunk have a gap of 0.
- TPOT: (E2E - TTFT) / (output tokens - 1), per request with at least two output tokens.
- E2E: stream end (the finishing chunk, usage or [DONE]) - request sent.
Percentiles interpolate linearly between order statistics (numpy's default, as vLLM reports):
server/latency.py's percentile, the one the server's telemetry feed uses.
Histograms are Prometheus's: cumulative counts of observations <= each upper bound, then +Inf.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from loadtests.records import Chunk, RequestRecord, RunRecord
from server.latency import Histogram, histogram_quantile, percentile  # noqa: F401 (re-exported)

PERCENTILES = (50.0, 90.0, 99.0)
METRICS = ("ttft", "tpot", "itl", "e2e")  # the latency distributions, in this order everywhere


@dataclass(frozen=True)
class RequestMetrics:
    """Derived latencies of one successful request (seconds)."""

    ttft: float
    tpot: float | None  # None with fewer than two output tokens
    itls: tuple[float, ...]
    e2e: float
    output_tokens: int
    prompt_tokens: int | None


@dataclass(frozen=True)
class Distribution:
    count: int
    mean: float | None
    std: float | None
    min: float | None
    max: float | None
    percentiles: dict[float, float]  # percentile (0..100) -> value

    @property
    def median(self) -> float | None:
        return self.percentiles.get(50.0)


@dataclass(frozen=True)
class Slo:
    """Goodput service-level objectives (seconds); None: not constrained."""

    ttft: float | None = None
    tpot: float | None = None
    e2e: float | None = None

    def met_by(self, m: RequestMetrics) -> bool:
        if self.ttft is not None and m.ttft > self.ttft:
            return False
        if self.tpot is not None and m.tpot is not None and m.tpot > self.tpot:
            return False
        return self.e2e is None or m.e2e <= self.e2e

    @property
    def empty(self) -> bool:
        return self.ttft is None and self.tpot is None and self.e2e is None


@dataclass(frozen=True)
class RunSummary:
    """What `vllm bench serve` reports for one run, plus the client's histograms."""

    completed: int
    failed: int
    duration: float
    total_input_tokens: int
    total_output_tokens: int
    request_throughput: float
    output_throughput: float
    total_token_throughput: float
    peak_output_throughput: float  # most tokens received in any one-second window
    peak_concurrency: int
    goodput: float | None  # requests/s meeting every SLO; None without SLOs
    latency: dict[str, Distribution]  # METRICS -> distribution (seconds)
    histograms: dict[str, Histogram]  # METRICS -> histogram over the server's boundaries


# ----------------------------------------------------------------------------- per request
def token_times(chunks: Sequence[Chunk]) -> list[float]:
    """Arrival time of every token: a chunk's k tokens spread evenly over the gap before it."""
    times: list[float] = []
    previous = None
    for chunk in chunks:
        if chunk.tokens <= 0:
            continue
        if previous is None:
            times.extend([chunk.time] * chunk.tokens)
        else:
            gap = chunk.time - previous
            times.extend(previous + gap * (j + 1) / chunk.tokens for j in range(chunk.tokens))
        previous = chunk.time
    return times


def request_metrics(record: RequestRecord) -> RequestMetrics | None:
    """TTFT, TPOT, ITLs and E2E of one request; None when it failed or produced no token."""
    times = token_times(record.chunks)
    if not record.ok or not times:
        return None
    ttft = times[0] - record.send_time
    e2e = max(record.end_time, times[-1]) - record.send_time
    n = record.output_tokens
    tpot = (e2e - ttft) / (n - 1) if n >= 2 else None
    itls = tuple(b - a for a, b in zip(times, times[1:]))
    return RequestMetrics(ttft=ttft, tpot=tpot, itls=itls, e2e=e2e, output_tokens=n,
                          prompt_tokens=record.prompt_tokens)


# ----------------------------------------------------------------------------- distributions
def distribution(values: Sequence[float], percentiles: Iterable[float] = PERCENTILES) -> Distribution:
    """Count, mean, population standard deviation (numpy's default), min, max and percentiles."""
    qs = tuple(percentiles)
    if not values:
        return Distribution(0, None, None, None, None, {})
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / n)
    ordered = sorted(values)
    return Distribution(count=n, mean=mean, std=std, min=min(values), max=max(values),
                        percentiles={q: percentile(ordered, q) for q in qs})


def histogram(values: Iterable[float], bounds: Sequence[float]) -> Histogram:
    """Bin values into Prometheus buckets (le = upper bound, inclusive)."""
    ordered_bounds = tuple(sorted(bounds))
    counts = [0] * (len(ordered_bounds) + 1)
    total, n = 0.0, 0
    for v in values:
        n += 1
        total += v
        counts[bisect.bisect_left(ordered_bounds, v)] += 1  # first bound >= v; past the end: +Inf
    cumulative, running = [], 0
    for c in counts:
        running += c
        cumulative.append(running)
    return Histogram(bounds=ordered_bounds, cumulative=tuple(cumulative), sum=total, count=n)


# ----------------------------------------------------------------------------- whole run
def peak_concurrency(intervals: Iterable[tuple[float, float]]) -> int:
    """Most intervals open at once; an interval ending exactly when another starts does not overlap it."""
    events = []
    for start, end in intervals:
        events.append((start, 1))
        events.append((end, -1))
    events.sort(key=lambda e: (e[0], e[1]))  # ends (-1) before starts (+1) at equal times
    running = peak = 0
    for _, delta in events:
        running += delta
        peak = max(peak, running)
    return peak


def peak_window_rate(times: Sequence[float], window: float = 1.0) -> float:
    """Most events in any window of `window` seconds, per second."""
    ordered = sorted(times)
    best, lo = 0, 0
    for hi, t in enumerate(ordered):
        while t - ordered[lo] >= window:
            lo += 1
        best = max(best, hi - lo + 1)
    return best / window


def latency_values(metrics: Sequence[RequestMetrics]) -> dict[str, list[float]]:
    """METRICS -> observations: one per request, except ITL (one per token after the first)."""
    return {
        "ttft": [m.ttft for m in metrics],
        "tpot": [m.tpot for m in metrics if m.tpot is not None],
        "itl": [x for m in metrics for x in m.itls],
        "e2e": [m.e2e for m in metrics],
    }


def summarize(run: RunRecord, bounds: Mapping[str, Sequence[float]], slo: Slo = Slo(),
              percentiles: Iterable[float] = PERCENTILES) -> RunSummary:
    """The run's summary; `bounds` maps each of METRICS to its histogram boundaries."""
    qs = tuple(percentiles)
    metrics = [m for m in (request_metrics(r) for r in run.requests) if m is not None]
    values = latency_values(metrics)
    duration = run.duration
    input_tokens = sum(m.prompt_tokens or 0 for m in metrics)
    output_tokens = sum(m.output_tokens for m in metrics)
    all_token_times = [t for r in run.requests if r.ok for t in token_times(r.chunks)]
    good = None if slo.empty else sum(1 for m in metrics if slo.met_by(m)) / duration
    return RunSummary(
        completed=len(metrics), failed=len(run.requests) - len(metrics), duration=duration,
        total_input_tokens=input_tokens, total_output_tokens=output_tokens,
        request_throughput=len(metrics) / duration, output_throughput=output_tokens / duration,
        total_token_throughput=(input_tokens + output_tokens) / duration,
        peak_output_throughput=peak_window_rate(all_token_times),
        peak_concurrency=peak_concurrency((r.send_time, r.end_time) for r in run.requests),
        goodput=good,
        latency={k: distribution(values[k], qs) for k in METRICS},
        histograms={k: histogram(values[k], bounds[k]) for k in METRICS},
    )
