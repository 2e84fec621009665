"""TelemetryFeed on a fake engine and a fake clock: window means from snapshot differences,
percentiles over a window, tokens/s, recent requests, bounds, bad input, thread safety."""

from __future__ import annotations

import json
import math
import threading
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from server.api.telemetry_feed import TelemetryFeed, UnknownWindowError, percentile
from server.engine.telemetry import NUM_STATS, STAT_NAMES
from server.engine.engine import EngineStats, FinishedRequest, StepStats
from server.engine.request import FinishReason, RequestStats
from server.engine.telemetry import HeadStatsAccumulator, RequestTelemetry

L, H, K = 3, 4, 2
NE = STAT_NAMES.index("normalized_entropy")


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


class FakeEngine:
    """What the feed uses of Engine: observers, the head accumulators, stats, the model's shape."""

    def __init__(self) -> None:
        self.model_config = SimpleNamespace(name="fake", architecture="llama", num_layers=L, num_heads=H,
                                            num_kv_heads=K, head_dim=8)
        self.max_model_len = 256
        self.config = SimpleNamespace(cache=SimpleNamespace(block_size=16))
        self.acc = HeadStatsAccumulator(L, H, (0.1, 0.5, 0.9))
        self.observers = []
        self.generation_tokens = 0
        self.preemptions = 0
        self.running = 0

    def add_observer(self, cb) -> None:
        self.observers.append(cb)

    def head_stats_snapshot(self):
        return self.acc.snapshot()

    def stats(self) -> EngineStats:
        return EngineStats(num_running=self.running, num_waiting=0, kv_cache_usage=0.25, num_blocks=64,
                           num_free_blocks=48, num_preemptions=self.preemptions, prefix_cache_queries=0,
                           prefix_cache_hits=0, prompt_tokens=0, generation_tokens=self.generation_tokens, steps=0)

    def step(self, *, rows: int = 0, ne: float = 0.5, tokens: int = 0, ttft=(), itl=(), finished=(), running=0):
        """One engine step: `rows` telemetry rows with normalized entropy `ne` on every head."""
        if rows:
            stats = torch.full((L, rows, H, NUM_STATS), 0.3, dtype=torch.float64)  # [L, R, H, 5]
            stats[..., NE] = ne
            self.acc.add(stats)
        self.generation_tokens += tokens
        self.running = running
        st = StepStats(num_scheduled_tokens=tokens, num_sampled=tokens, num_preempted=0, num_running=running,
                       num_waiting=0, kv_cache_usage=0.25, step_time=0.01, telemetry=bool(rows),
                       time_to_first_token=tuple(ttft), inter_token_latencies=tuple(itl), finished=tuple(finished))
        for cb in self.observers:
            cb(st)


def finished(rid: str, ne: float | None = 0.4, reason=FinishReason.STOP, e2e: float = 1.0) -> FinishedRequest:
    head = None
    if ne is not None:
        tel = RequestTelemetry(L, H, K)
        row = torch.full((L, H, NUM_STATS), 0.3, dtype=torch.float64)  # [L, H, 5]
        row[..., NE] = ne
        tel.add_row(row)
        head = tel.result()
    stats = RequestStats(num_prompt_tokens=7, num_output_tokens=5, num_cached_tokens=0, num_preemptions=0,
                         queue_time=0.01, time_to_first_token=0.2, prefill_time=0.19, decode_time=0.4,
                         e2e_latency=e2e, inter_token_latencies=(0.1,) * 4)
    return FinishedRequest(rid, reason, stats, head)


@pytest.fixture
def setup():
    clock, engine = Clock(), FakeEngine()
    rejected = {"queue_full": 2}
    feed = TelemetryFeed(engine, model="fake-model", admission=lambda: rejected, in_flight=lambda: 3,
                         interval=5.0, recent=3, clock=clock, wall=lambda: 1.7e9)
    return clock, engine, feed


def test_window_means_come_from_snapshot_differences(setup):
    clock, engine, feed = setup
    clock.t += 1
    engine.step(rows=10, ne=0.8, tokens=10)            # an early burst, then idle
    clock.t += 99
    engine.step(rows=30, ne=0.2, tokens=30, running=1)  # a burst 100 s later
    clock.t += 4
    engine.step(rows=10, ne=0.2, tokens=10)
    clock.t += 30

    last_minute = feed.snapshot("1m")
    grid = last_minute["heads"]["normalized_entropy"]
    assert len(grid) == L and all(len(row) == H for row in grid)
    assert all(v == pytest.approx(0.2) for row in grid for v in row)  # the early 0.8 rows are out of the window
    assert last_minute["heads"]["rows"] == 40
    assert last_minute["heads"]["counts"] == [[40] * H] * L

    since_start = feed.snapshot("all")
    assert since_start["heads"]["normalized_entropy"][1][2] == pytest.approx((10 * 0.8 + 40 * 0.2) / 50)
    assert since_start["heads"]["rows"] == 50
    assert since_start["heads"]["sink_mass"][0][0] == pytest.approx(0.3)

    clock.t += 120  # nothing happened for two minutes: the last minute has no rows
    idle = feed.snapshot("1m")
    assert idle["heads"]["rows"] == 0
    assert all(v is None for row in idle["heads"]["normalized_entropy"] for v in row)
    assert idle["throughput"]["generation_tokens_per_s"] == 0
    json.dumps(idle, allow_nan=False)  # None, never NaN


def test_latency_percentiles_and_throughput_over_the_window(setup):
    clock, engine, feed = setup
    clock.t += 1
    engine.step(ttft=[9.0, 9.0], itl=[5.0] * 10, tokens=12)      # old: outside the last minute later
    clock.t += 200
    itl = [0.01 * i for i in range(1, 101)]
    engine.step(ttft=[0.1, 0.2, 0.3, 0.4], itl=itl, tokens=60, running=2)
    clock.t += 10
    engine.step(tokens=60, finished=[finished("r1", e2e=2.0), finished("r2", e2e=4.0)])
    clock.t += 10

    snap = feed.snapshot("1m")
    ttft = snap["latency"]["time_to_first_token"]
    assert ttft["count"] == 4 and ttft["max"] == pytest.approx(0.4)
    assert ttft["p50"] == pytest.approx(float(np.percentile([0.1, 0.2, 0.3, 0.4], 50)))
    lat = snap["latency"]["inter_token_latency"]
    assert lat["count"] == 100
    for q in (50, 90, 95, 99):
        assert lat[f"p{q}"] == pytest.approx(float(np.percentile(itl, q)))
    assert snap["latency"]["e2e_request_latency"]["mean"] == pytest.approx(3.0)
    assert snap["latency"]["queue_time"]["count"] == 2
    assert feed.snapshot("all")["latency"]["time_to_first_token"]["count"] == 6

    # tokens/s: the 120 tokens of the window over the time its baseline snapshot covers
    tput = snap["throughput"]
    assert tput["generation_tokens_per_s"] == pytest.approx(120 / snap["span_seconds"], rel=1e-3)
    assert snap["span_seconds"] == pytest.approx(60)  # idle before the window: exactly its length
    assert tput["requests_per_s"] > 0

    assert snap["load"] == {"num_running": 0, "num_waiting": 0, "kv_cache_usage": 0.25, "kv_cache_blocks": 64,
                            "kv_cache_free_blocks": 48, "api_requests_in_flight": 3}
    counters = snap["counters"]
    assert counters["rejected"] == {"queue_full": 2} and counters["rejected_total"] == 2
    assert counters["requests_finished"] == {"stop": 2} and counters["errors"] == 0
    series = snap["series"]
    assert len(series["t"]) == len(series["generation_tokens_per_s"]) >= 1
    assert all(t <= 0 for t in series["t"])


def test_recent_requests_are_bounded_and_retrievable(setup):
    clock, engine, feed = setup
    for i in range(5):
        clock.t += 1
        engine.step(finished=[finished(f"r{i}", ne=0.1 * i,
                                       reason=FinishReason.ERROR if i == 4 else FinishReason.LENGTH)])
    snap = feed.snapshot("all", recent=10)
    ids = [r["id"] for r in snap["recent_requests"]]
    assert ids == ["r4", "r3", "r2"]  # newest first, only the last 3 kept
    assert snap["recent_requests"][0]["finish_reason"] == "error"
    assert snap["counters"]["errors"] == 1
    assert feed.snapshot("all", recent=1)["recent_requests"][0]["id"] == "r4"
    assert feed.snapshot("all", recent=0)["recent_requests"] == []

    one = feed.request("r3")
    assert one["id"] == "r3" and one["prompt_tokens"] == 7 and one["output_tokens"] == 5
    assert one["mean_normalized_entropy"] == pytest.approx(0.3)
    tel = one["head_telemetry"]
    assert (tel["layers"], tel["heads"], tel["kv_heads"], tel["rows"]) == (L, H, K, 1)
    assert tel["normalized_entropy"][2][3] == pytest.approx(0.3)
    assert feed.request("r0") is None   # evicted
    assert feed.request("nope") is None
    json.dumps(one, allow_nan=False)


def test_request_without_head_telemetry(setup):
    clock, engine, feed = setup
    engine.step(finished=[finished("plain", ne=None)])
    one = feed.request("plain")
    assert one["head_telemetry"] is None and one["telemetry_rows"] == 0 and one["mean_normalized_entropy"] is None


def test_unknown_window_is_refused(setup):
    _, _, feed = setup
    for bad in ("2m", "", "ALL", "1h"):
        with pytest.raises(UnknownWindowError):
            feed.snapshot(bad)


def test_model_info(setup):
    _, _, feed = setup
    info = feed.snapshot()["model"]
    assert info == {"id": "fake-model", "name": "fake", "architecture": "llama", "layers": L, "heads": H,
                    "kv_heads": K, "head_dim": 8, "max_model_len": 256, "block_size": 16}


def test_ring_and_samples_stay_bounded():
    clock, engine = Clock(), FakeEngine()
    feed = TelemetryFeed(engine, model="m", interval=5.0, history=10, max_samples=50, clock=clock)
    for _ in range(500):
        clock.t += 3
        engine.step(rows=1, tokens=1, itl=[0.1] * 3, running=1)
        clock.t += 3
        engine.step(rows=1, tokens=1)                      # a burst ends every other step
    assert len(feed._ring) == 10
    assert all(len(s) <= 50 for s in feed._samples.values())
    ts = [s.t for s in feed._ring]
    assert ts == sorted(ts)


def test_observer_and_readers_on_different_threads():
    engine = FakeEngine()
    feed = TelemetryFeed(engine, model="m", interval=0.001)
    stop = threading.Event()
    errors: list[BaseException] = []

    def engine_thread() -> None:
        i = 0
        try:
            while not stop.is_set():
                i += 1
                engine.step(rows=1, tokens=1, ttft=[0.1], itl=[0.01], finished=[finished(f"r{i}")],
                            running=i % 2)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    t = threading.Thread(target=engine_thread)
    t.start()
    try:
        for _ in range(200):
            snap = feed.snapshot("all", recent=5)
            json.dumps(snap, allow_nan=False)
            for r in snap["recent_requests"]:
                feed.request(r["id"])
    finally:
        stop.set()
        t.join()
    assert not errors


@pytest.mark.parametrize("n", [1, 2, 7, 100])
def test_percentile_matches_numpy(n):
    values = sorted(math.sin(i) * 10 for i in range(n))
    for q in (0, 50, 90, 95, 99, 100):
        assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)))
