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
import threading
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from server.api.streaming import telemetry_json
from server.latency import percentile
from server.telemetry_window import (LATENCIES, PERCENTILES, Point, UnknownWindowError,  # noqa: F401 (raised here)
                                     baseline, head_means, latency_json, num, series, throughput, window_length)


@dataclass(frozen=True)
class _Recent:
    """One finished request as the dashboard lists it; head is its RequestHeadTelemetry."""

    summary: dict
    head: object | None


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
        self._ring: deque[Point] = deque(maxlen=history)
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
    def _take(self, now: float) -> Point:
        head = self.engine.head_stats_snapshot()
        st = self.engine.stats()
        return Point(now, head.sums, head.counts, st.generation_tokens, st.prompt_tokens, st.num_preemptions,
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
            "id": fin.request_id, "finish_reason": reason, "finished_at": num(self._wall(), 3),
            "prompt_tokens": st.num_prompt_tokens, "output_tokens": st.num_output_tokens,
            "cached_tokens": st.num_cached_tokens, "preemptions": st.num_preemptions,
            "queue_time": num(st.queue_time), "time_to_first_token": num(st.time_to_first_token),
            "e2e_request_latency": num(st.e2e_latency), "decode_tokens_per_s": num(st.decode_tokens_per_s, 3),
            "telemetry_rows": head.rows if head is not None else 0,
            "mean_normalized_entropy": (num(sum(map(sum, head.normalized_entropy)) / (head.layers * head.heads))
                                        if head is not None else None),
        }
        self._recent[fin.request_id] = _Recent(summary, head)
        self._recent.move_to_end(fin.request_id)
        while len(self._recent) > self.max_recent:
            self._recent.popitem(last=False)

    # -- readers (event loop) ---------------------------------------------------------------
    def snapshot(self, window: str = "1m", recent: int = 20) -> dict:
        """Everything the dashboard shows, over `window` (one of WINDOWS). Raises UnknownWindowError."""
        length = window_length(window)
        now = self._clock()
        start = None if length is None else now - length
        with self._lock:
            self._record(now, burst_ended=False)
            current = self._take(now)
            base, since = baseline(self._ring, start)
            points = [p for p in self._ring if p.t >= base.t]
            samples = {k: list(v) for k, v in self._samples.items()}  # sorted outside the lock
            finish_reasons = dict(self._finish_reasons)
            requests = [r.summary for r in reversed(self._recent.values())][:max(0, recent)]
        st = self.engine.stats()
        rejected = {k: int(v) for k, v in self._admission().items()}
        return {
            "object": "telemetry", "server": "headwise", "model": self.model_info(), "window": window,
            "window_seconds": length, "span_seconds": num(current.t - since, 3),
            "uptime_seconds": num(now - self._start, 3), "time": num(self._wall(), 3),
            "heads": head_means(current, base),
            "latency": {k: self._latency(v, start) for k, v in samples.items()},
            "throughput": throughput(current, base, current.t - since),
            "load": {"num_running": st.num_running, "num_waiting": st.num_waiting,
                     "kv_cache_usage": num(st.kv_cache_usage, 4), "kv_cache_blocks": st.num_blocks,
                     "kv_cache_free_blocks": st.num_free_blocks, "api_requests_in_flight": int(self._in_flight())},
            "counters": {
                "prompt_tokens": st.prompt_tokens, "generation_tokens": st.generation_tokens,
                "requests_finished": finish_reasons, "errors": finish_reasons.get("error", 0),
                "preemptions": st.num_preemptions, "preemptions_in_window": current.preemptions - base.preemptions,
                "rejected": rejected, "rejected_total": sum(rejected.values()),
                "prefix_cache_queries": st.prefix_cache_queries, "prefix_cache_hits": st.prefix_cache_hits,
            },
            "series": series(points, self._clock()),
            "recent_requests": requests,
        }

    @staticmethod
    def _latency(samples: list[tuple[float, float]], start: float | None) -> dict:
        values = sorted(v for t, v in samples if start is None or t >= start)
        if not values:
            return latency_json(0, None, None, {})
        return latency_json(len(values), sum(values) / len(values), values[-1],
                            {q: percentile(values, q) for q in PERCENTILES})

    def request(self, request_id: str) -> dict | None:
        """One recent request with its per-head means (non-finite ones null), or None when
        unknown or no longer kept."""
        with self._lock:
            rec = self._recent.get(request_id)
        if rec is None:
            return None
        return {"object": "telemetry.request", **rec.summary, "model": self.model_info(),
                "head_telemetry": telemetry_json(rec.head) if rec.head is not None else None}
