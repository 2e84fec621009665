"""Windows over cumulative counters: the part of GET /v1/telemetry (docs/telemetry-api.md) that
headwise serve's TelemetryFeed (server/api/telemetry_feed.py) and the vLLM plugin's feed
(server/vllm_plugin/feed.py) share.

A feed keeps a ring of Points (cumulative per-head sums and counts, token and request counters,
load) taken every few seconds. A window's values are differences between the newest point and
the baseline: the newest point at or before the window's start. Per-head means over a window are
(sums_now - sums_then) / (counts_now - counts_then); rates divide counter differences by the
span the window actually covers.

Imports torch and server.engine.telemetry's names only: no engine loop, no web framework.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from server.engine.telemetry import STAT_NAMES

WINDOWS: dict[str, float | None] = {"1m": 60.0, "5m": 300.0, "all": None}
PERCENTILES = (50, 90, 95, 99)
LATENCIES = ("time_to_first_token", "inter_token_latency", "e2e_request_latency", "queue_time")


class UnknownWindowError(ValueError):
    """The window is not one of WINDOWS."""


def window_length(window: str) -> float | None:
    """Seconds of a window (None for "all"). Raises UnknownWindowError."""
    if window not in WINDOWS:
        raise UnknownWindowError(f"unknown window {window[:20]!r}; use one of {', '.join(WINDOWS)}")
    return WINDOWS[window]


@dataclass(frozen=True)
class Point:
    """A server's cumulative counters at time t (monotonic seconds), and its load then."""

    t: float
    sums: torch.Tensor      # [L, H, NUM_STATS] float64
    counts: torch.Tensor    # [L, H] int64
    generation_tokens: int
    prompt_tokens: int
    preemptions: int
    finished: int
    num_running: int | None
    num_waiting: int | None
    kv_cache_usage: float | None


def num(x: float | None, digits: int = 6) -> float | None:
    """A JSON-safe number: None for missing or non-finite values."""
    if x is None or not math.isfinite(x):
        return None
    return round(float(x), digits)


def grid(values: torch.Tensor, valid: torch.Tensor) -> list[list[float | None]]:
    """[L, H] tensor -> L x H nested lists, None where a head has no rows."""
    return [[num(v) if ok else None for v, ok in zip(row, okrow)]
            for row, okrow in zip(values.tolist(), valid.tolist())]


def baseline(ring: Sequence[Point], start: float | None) -> tuple[Point, float]:
    """The newest point at or before `start` (the oldest kept when none is that old), and the
    time the window's counters start from: `start` itself when the server provably did nothing
    between that point and `start` (the next point holds the same counters)."""
    if start is None:
        return ring[0], ring[0].t
    base, after = ring[0], None
    for point in ring:
        if point.t > start:
            after = point
            break
        base = point
    unchanged = (after is not None and after.finished == base.finished
                 and after.generation_tokens == base.generation_tokens and after.prompt_tokens == base.prompt_tokens
                 and torch.equal(after.counts, base.counts))
    return base, (max(base.t, start) if unchanged else base.t)


def head_means(current: Point, base: Point) -> dict:
    """The "heads" object: rows and counts per head in the window, and each statistic's means."""
    counts = current.counts - base.counts                                   # [L, H]
    sums = current.sums - base.sums                                         # [L, H, S]
    valid = counts > 0                                                      # [L, H]
    means = sums / counts.clamp_min(1)[..., None].to(torch.float64)        # [L, H, S]
    out: dict = {"rows": int(counts.max().item()) if counts.numel() else 0, "counts": counts.tolist()}
    for i, name in enumerate(STAT_NAMES):
        out[name] = grid(means[..., i], valid)
    return out


def throughput(current: Point, base: Point, span: float) -> dict:
    """Generated and prompt tokens and finished requests per second over `span` seconds."""
    span = max(span, 1e-9)
    return {"generation_tokens_per_s": num((current.generation_tokens - base.generation_tokens) / span, 3),
            "prompt_tokens_per_s": num((current.prompt_tokens - base.prompt_tokens) / span, 3),
            "requests_per_s": num((current.finished - base.finished) / span, 4)}


def series(points: Sequence[Point], now: float) -> dict:
    """Per point: seconds before now, tokens/s since the previous one, load at that time."""
    out: dict[str, list] = {"t": [], "generation_tokens_per_s": [], "num_running": [], "num_waiting": [],
                            "kv_cache_usage": []}
    for prev, p in zip(points, points[1:]):
        dt = p.t - prev.t
        if dt <= 0:
            continue
        out["t"].append(num(p.t - now, 3))
        out["generation_tokens_per_s"].append(num((p.generation_tokens - prev.generation_tokens) / dt, 3))
        out["num_running"].append(p.num_running)
        out["num_waiting"].append(p.num_waiting)
        out["kv_cache_usage"].append(num(p.kv_cache_usage, 4))
    return out


def latency_json(count: int, mean: float | None, maximum: float | None,
                 quantiles: Mapping[int, float | None]) -> dict:
    """One latency entry: count, mean, max and p<q> for each of PERCENTILES (null when unknown)."""
    return {"count": count, "mean": num(mean), "max": num(maximum),
            **{f"p{q}": num(quantiles.get(q)) for q in PERCENTILES}}
