"""TelemetryFeed: the live data behind GET /v1/telemetry and the /dashboard page.

A publisher beside server/metrics.py, fed by the same engine accumulators, never by parsing
/metrics. It registers an engine step observer and keeps, all bounded:

- a ring of snapshots (time, per-head sums and counts, token and preemption counters, load),
  one every `interval` seconds while the engine steps or the feed is read, and one more when a
  burst of work ends (so an idle gap never blurs a window); a window's per-head means are
  (sums_now - sums_then) / (counts_now - counts_then), with `then` the newest snapshot at or
  before the window's start;
- recent latency samples (time to first token, inter-token latency, end-to-end, queue time) with
  their times, for percentiles over a window;
- the most recent finished requests with their own per-head means, retrievable by id.

Observer callbacks run on the engine thread and only append to deques under a lock (plus a copy
of the accumulators every `interval` s); reads run on the API's event loop. No FastAPI and no
prometheus_client here: the feed returns plain JSON-ready dicts.
"""

from __future__ import annotations

import dataclasses
import math
import threading
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from server.api.streaming import telemetry_json
from server.engine.telemetry import STAT_NAMES
from server.latency import percentile

WINDOWS: dict[str, float | None] = {"1m": 60.0, "5m": 300.0, "all": None}
PERCENTILES = (50, 90, 95, 99)
LATENCIES = ("time_to_first_token", "inter_token_latency", "e2e_request_latency", "queue_time")


class UnknownWindowError(ValueError):
    """The window is not one of WINDOWS."""


@dataclass(frozen=True)
class _Snapshot:
    """The engine's cumulative counters at time t (monotonic seconds)."""

    t: float
    sums: torch.Tensor      # [L, H, NUM_STATS] float64
    counts: torch.Tensor    # [L, H] int64
    generation_tokens: int
    prompt_tokens: int
    preemptions: int
    finished: int
    num_running: int
    num_waiting: int
    kv_cache_usage: float


@dataclass(frozen=True)
class _Recent:
    """One finished request as the dashboard lists it; head is its RequestHeadTelemetry."""

    summary: dict
    head: object | None


def _num(x: float | None, digits: int = 6) -> float | None:
    """A JSON-safe number: None for missing or non-finite values."""
    if x is None or not math.isfinite(x):
        return None
    return round(float(x), digits)


def _grid(values: torch.Tensor, valid: torch.Tensor) -> list[list[float | None]]:
    """[L, H] tensor -> L x H nested lists, None where a head has no rows."""
    return [[_num(v) if ok else None for v, ok in zip(row, okrow)]
            for row, okrow in zip(values.tolist(), valid.tolist())]


class TelemetryFeed:
    """Windows over the engine's accumulators. `admission()` returns the API's rejection counts
    by reason (read on the event loop, never from the engine thread); `in_flight()` its admitted
    engine requests."""

    def __init__(self, engine, *, model: str, admission: Callable[[], Mapping[str, int]] | None = None,
                 in_flight: Callable[[], int] | None = None, interval: float = 5.0, history: int = 400,
                 recent: int = 100, max_samples: int = 20_000,
                 clock: Callable[[], float] = time.monotonic, wall: Callable[[], float] = time.time) -> None:
        self.engine = engine
        self.model = model
        self.interval = interval
        self._admission = admission or (lambda: {})
        self._in_flight = in_flight or (lambda: 0)
        self._clock = clock
        self._wall = wall
        self._lock = threading.Lock()
        self._ring: deque[_Snapshot] = deque(maxlen=history)
        self._samples: dict[str, deque[tuple[float, float]]] = {k: deque(maxlen=max_samples) for k in LATENCIES}
        self._recent: OrderedDict[str, _Recent] = OrderedDict()
        self.max_recent = recent
        self._finish_reasons: Counter[str] = Counter()
        self._finished = 0
        self._idle = True          # no step since the last snapshot of an idle engine
        self._start = clock()
        self._ring.append(self._take(self._start))
        engine.add_observer(self._on_step)

    # -- model ------------------------------------------------------------------------------
    def model_info(self) -> dict:
        mc = self.engine.model_config
        return {"id": self.model, "name": mc.name, "architecture": mc.architecture, "layers": mc.num_layers,
                "heads": mc.num_heads, "kv_heads": mc.num_kv_heads, "head_dim": mc.head_dim,
                "max_model_len": self.engine.max_model_len, "block_size": self.engine.config.cache.block_size}

    # -- engine thread ----------------------------------------------------------------------
    def _take(self, now: float) -> _Snapshot:
        head = self.engine.head_stats_snapshot()
        st = self.engine.stats()
        return _Snapshot(now, head.sums, head.counts, st.generation_tokens, st.prompt_tokens, st.num_preemptions,
                         self._finished, st.num_running, st.num_waiting, st.kv_cache_usage)

    def _record(self, now: float, burst_ended: bool, step_start: float | None = None) -> None:
        """Keep the ring about `interval`-spaced and exact across idle gaps: append a snapshot
        when the last is `interval` old; when work resumes after such a gap, first append the
        idle state again, stamped with the time the step began (nothing changed until then);
        when a burst of work ends, take one anyway (replacing a recent one, never the first)."""
        ring = self._ring
        if self._idle and step_start is not None and step_start - ring[-1].t >= self.interval:
            ring.append(dataclasses.replace(ring[-1], t=step_start))
        if now - ring[-1].t >= self.interval:
            ring.append(self._take(now))
        elif burst_ended:
            if len(ring) > 1 and now - ring[-2].t < 2 * self.interval:
                ring[-1] = self._take(now)
            else:
                ring.append(self._take(now))
        if step_start is not None:
            self._idle = burst_ended

    def _on_step(self, step) -> None:
        now = self._clock()
        with self._lock:
            s = self._samples
            s["time_to_first_token"].extend((now, v) for v in step.time_to_first_token)
            s["inter_token_latency"].extend((now, v) for v in step.inter_token_latencies)
            for fin in step.finished:
                self._finished += 1
                reason = getattr(fin.finish_reason, "value", str(fin.finish_reason))
                self._finish_reasons[reason] += 1
                st = fin.stats
                s["e2e_request_latency"].append((now, st.e2e_latency))
                s["queue_time"].append((now, st.queue_time))
                self._remember(fin, reason)
            self._record(now, burst_ended=step.num_running == 0 and step.num_waiting == 0,
                         step_start=now - step.step_time)

    def _remember(self, fin, reason: str) -> None:
        st, head = fin.stats, fin.head_telemetry
        summary = {
            "id": fin.request_id, "finish_reason": reason, "finished_at": _num(self._wall(), 3),
            "prompt_tokens": st.num_prompt_tokens, "output_tokens": st.num_output_tokens,
            "cached_tokens": st.num_cached_tokens, "preemptions": st.num_preemptions,
            "queue_time": _num(st.queue_time), "time_to_first_token": _num(st.time_to_first_token),
            "e2e_request_latency": _num(st.e2e_latency), "decode_tokens_per_s": _num(st.decode_tokens_per_s, 3),
            "telemetry_rows": head.rows if head is not None else 0,
            "mean_normalized_entropy": (_num(sum(map(sum, head.normalized_entropy)) / (head.layers * head.heads))
                                        if head is not None else None),
        }
        self._recent[fin.request_id] = _Recent(summary, head)
        self._recent.move_to_end(fin.request_id)
        while len(self._recent) > self.max_recent:
            self._recent.popitem(last=False)

    # -- readers (event loop) ---------------------------------------------------------------
    def _baseline(self, start: float | None) -> tuple[_Snapshot, float]:
        """The newest snapshot at or before `start` (the oldest kept when none is that old), and
        the time the window's counters start from: `start` itself when the engine provably did
        nothing between that snapshot and `start` (the next snapshot holds the same counters)."""
        if start is None:
            return self._ring[0], self._ring[0].t
        base, after = self._ring[0], None
        for snap in self._ring:
            if snap.t > start:
                after = snap
                break
            base = snap
        unchanged = (after is not None and after.finished == base.finished
                     and after.generation_tokens == base.generation_tokens and after.prompt_tokens == base.prompt_tokens
                     and torch.equal(after.counts, base.counts))
        return base, (max(base.t, start) if unchanged else base.t)

    def snapshot(self, window: str = "1m", recent: int = 20) -> dict:
        """Everything the dashboard shows, over `window` (one of WINDOWS). Raises UnknownWindowError."""
        if window not in WINDOWS:
            raise UnknownWindowError(f"unknown window {window!r}; use one of {', '.join(WINDOWS)}")
        length = WINDOWS[window]
        now = self._clock()
        start = None if length is None else now - length
        with self._lock:
            self._record(now, burst_ended=False)
            current = self._take(now)
            base, since = self._baseline(start)
            series = [p for p in self._ring if p.t >= base.t]
            samples = {k: list(v) for k, v in self._samples.items()}  # sorted outside the lock
            finish_reasons = dict(self._finish_reasons)
            requests = [r.summary for r in reversed(self._recent.values())][:max(0, recent)]
        st = self.engine.stats()
        span = max(current.t - since, 1e-9)
        rejected = {k: int(v) for k, v in self._admission().items()}
        return {
            "object": "telemetry", "model": self.model_info(), "window": window,
            "window_seconds": length, "span_seconds": _num(current.t - since, 3),
            "uptime_seconds": _num(now - self._start, 3), "time": _num(self._wall(), 3),
            "heads": self._heads(current, base),
            "latency": {k: self._latency(v, start) for k, v in samples.items()},
            "throughput": {
                "generation_tokens_per_s": _num((current.generation_tokens - base.generation_tokens) / span, 3),
                "prompt_tokens_per_s": _num((current.prompt_tokens - base.prompt_tokens) / span, 3),
                "requests_per_s": _num((current.finished - base.finished) / span, 4),
            },
            "load": {"num_running": st.num_running, "num_waiting": st.num_waiting,
                     "kv_cache_usage": _num(st.kv_cache_usage, 4), "kv_cache_blocks": st.num_blocks,
                     "kv_cache_free_blocks": st.num_free_blocks, "api_requests_in_flight": int(self._in_flight())},
            "counters": {
                "prompt_tokens": st.prompt_tokens, "generation_tokens": st.generation_tokens,
                "requests_finished": finish_reasons, "errors": finish_reasons.get("error", 0),
                "preemptions": st.num_preemptions, "preemptions_in_window": current.preemptions - base.preemptions,
                "rejected": rejected, "rejected_total": sum(rejected.values()),
                "prefix_cache_queries": st.prefix_cache_queries, "prefix_cache_hits": st.prefix_cache_hits,
            },
            "series": self._series(series),
            "recent_requests": requests,
        }

    def _heads(self, current: _Snapshot, base: _Snapshot) -> dict:
        counts = current.counts - base.counts                                   # [L, H]
        sums = current.sums - base.sums                                         # [L, H, S]
        valid = counts > 0
        means = sums / counts.clamp_min(1)[..., None].to(torch.float64)        # [L, H, S]
        out: dict = {"rows": int(counts.max().item()) if counts.numel() else 0, "counts": counts.tolist()}
        for i, name in enumerate(STAT_NAMES):
            out[name] = _grid(means[..., i], valid)
        return out

    @staticmethod
    def _latency(samples: list[tuple[float, float]], start: float | None) -> dict:
        values = sorted(v for t, v in samples if start is None or t >= start)
        if not values:
            return {"count": 0, "mean": None, "max": None, **{f"p{q}": None for q in PERCENTILES}}
        return {"count": len(values), "mean": _num(sum(values) / len(values)), "max": _num(values[-1]),
                **{f"p{q}": _num(percentile(values, q)) for q in PERCENTILES}}

    def _series(self, points: list[_Snapshot]) -> dict:
        """Per snapshot: seconds before now, tokens/s since the previous one, load at that time."""
        now = self._clock()
        out: dict[str, list] = {"t": [], "generation_tokens_per_s": [], "num_running": [], "num_waiting": [],
                                "kv_cache_usage": []}
        for prev, p in zip(points, points[1:]):
            dt = p.t - prev.t
            if dt <= 0:
                continue
            out["t"].append(_num(p.t - now, 3))
            out["generation_tokens_per_s"].append(_num((p.generation_tokens - prev.generation_tokens) / dt, 3))
            out["num_running"].append(p.num_running)
            out["num_waiting"].append(p.num_waiting)
            out["kv_cache_usage"].append(_num(p.kv_cache_usage, 4))
        return out

    def request(self, request_id: str) -> dict | None:
        """One recent request with its per-head means (non-finite ones null), or None when
        unknown or no longer kept."""
        with self._lock:
            rec = self._recent.get(request_id)
        if rec is None:
            return None
        return {"object": "telemetry.request", **rec.summary, "model": self.model_info(),
                "head_telemetry": telemetry_json(rec.head) if rec.head is not None else None}
