"""VllmFeed (the plugin's GET /v1/telemetry) on a fake clock, a prometheus_client registry holding
vLLM-named metrics as vLLM's stat logger registers them, and a TelemetrySource whose merged
telemetry the test sets: window means from point differences, histogram percentiles over a
window, rates, load, counters, bounds, and the background ticks. Runs without vLLM."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from server.engine.telemetry import STAT_NAMES
from server.latency import Histogram, histogram_quantile
from server.telemetry_window import UnknownWindowError
from server.vllm_plugin.feed import VllmFeed
from server.vllm_plugin.vllm_metrics import LATENCY_FAMILIES, SAMPLE_NAMES, registry_reader
from tests.vllm_plugin.feed_fakes import TTFT_BUCKETS, Setup

LOGGERS = Path(__file__).resolve().parents[2] / ".venv-vllm/lib/python3.11/site-packages/vllm/v1/metrics/loggers.py"


def strict_json(body: dict) -> dict:
    return json.loads(json.dumps(body, allow_nan=False))


def test_window_means_are_differences_of_the_sums():
    s = Setup()
    s.rows(10, 0.2)
    s.tick(100)
    s.rows(30, 0.8)
    s.tick(30)
    one = strict_json(s.feed.snapshot("1m"))
    assert one["object"] == "telemetry" and one["server"] == "vllm" and one["window_seconds"] == 60
    assert one["heads"]["rows"] == 30 and one["heads"]["counts"] == [[30] * 4] * 3
    assert all(v == pytest.approx(0.8) for row in one["heads"]["normalized_entropy"] for v in row)
    every = strict_json(s.feed.snapshot("all"))
    assert every["window_seconds"] is None and every["heads"]["rows"] == 40
    assert every["heads"]["normalized_entropy"][1][2] == pytest.approx((10 * 0.2 + 30 * 0.8) / 40)
    assert every["span_seconds"] == every["uptime_seconds"] == 130
    assert set(STAT_NAMES) <= set(every["heads"])


def test_a_head_without_rows_in_the_window_is_null():
    s = Setup()
    s.rows(5, 0.5)
    s.tick(120)
    snap = strict_json(s.feed.snapshot("1m"))
    assert snap["heads"]["rows"] == 0
    assert all(v is None for stat in STAT_NAMES for row in snap["heads"][stat] for v in row)
    assert strict_json(s.feed.snapshot("all"))["heads"]["rows"] == 5


def test_latency_percentiles_come_from_the_window_s_bucket_deltas():
    s = Setup()
    for _ in range(4):
        s.vllm.ttft.observe(0.3)                       # old: outside the last minute
    s.tick(100)
    recent = (0.05, 0.2, 0.4, 0.7)
    for v in recent:
        s.vllm.ttft.observe(v)
    s.tick(10)
    lat = strict_json(s.feed.snapshot("1m"))["latency"]["time_to_first_token"]
    assert lat["count"] == 4 and lat["mean"] == pytest.approx(sum(recent) / 4) and lat["max"] is None
    window = Histogram(bounds=TTFT_BUCKETS, cumulative=(1, 3, 4, 4), sum=sum(recent), count=4)
    for q in (50, 90, 95, 99):
        assert lat[f"p{q}"] == pytest.approx(histogram_quantile(q / 100, window)), q
    assert lat["p50"] == pytest.approx(0.1 + 0.4 * (2 - 1) / 2)  # rank 2 in (0.1, 0.5]: 1 below, 2 inside
    every = strict_json(s.feed.snapshot("all"))["latency"]["time_to_first_token"]
    assert every["count"] == 8 and every["p50"] == pytest.approx(0.1 + 0.4 * (4 - 1) / 6)
    quiet = strict_json(s.feed.snapshot("all"))["latency"]
    assert quiet["inter_token_latency"] == {"count": 0, "mean": None, "max": None, "p50": None, "p90": None,
                                            "p95": None, "p99": None}           # a family vLLM did not register
    assert quiet["e2e_request_latency"]["count"] == 0 and quiet["e2e_request_latency"]["p50"] is None


def test_throughput_load_counters_and_series():
    s = Setup()
    v = s.vllm
    s.tick(100)
    v.generation.inc(600)
    v.prompt.inc(120)
    v.success["length"].inc(5)
    v.success["stop"].inc(1)
    v.success["error"].inc(1)
    v.preemptions.inc(2)
    v.queries.inc(120)
    v.hits.inc(64)
    v.rejected.inc(3)
    v.running.set(4)
    v.waiting.set(1)
    v.kv.set(0.125)
    s.tick(60)
    snap = strict_json(s.feed.snapshot("1m"))
    assert snap["span_seconds"] == 60
    assert snap["throughput"] == {"generation_tokens_per_s": 10.0, "prompt_tokens_per_s": 2.0,
                                  "requests_per_s": pytest.approx(7 / 60, abs=1e-4)}
    assert snap["load"] == {"num_running": 4, "num_waiting": 1, "kv_cache_usage": 0.125, "kv_cache_blocks": 1456,
                            "kv_cache_free_blocks": None, "api_requests_in_flight": None}
    c = snap["counters"]
    assert c["requests_finished"] == {"abort": 0, "error": 1, "length": 5, "repetition": 0, "stop": 1}
    assert (c["errors"], c["preemptions"], c["preemptions_in_window"]) == (1, 2, 2)
    assert (c["generation_tokens"], c["prompt_tokens"], c["prefix_cache_queries"], c["prefix_cache_hits"]) == \
        (600, 120, 120, 64)
    assert c["rejected"] == {"max_num_queued_reqs": 3} and c["rejected_total"] == 3
    assert snap["recent_requests"] == []
    assert snap["plugin"] == {"up": True, "problem": None, "disabled_layers": {"2": "alibi"}}
    assert snap["model"] == {"id": "m", "name": "/models/m", "architecture": "LlamaForCausalLM", "layers": 3,
                             "heads": 4, "kv_heads": 2, "head_dim": 64, "max_model_len": 1024, "block_size": 16}
    series = snap["series"]
    assert series["t"][-1] == 0 and len(series["t"]) == 12
    assert series["generation_tokens_per_s"][-12] == 120.0 and series["num_running"][-1] == 4
    assert series["kv_cache_usage"][-1] == 0.125 and snap["time"] == 1.7e9
    s.tick(60)
    assert strict_json(s.feed.snapshot("1m"))["counters"]["preemptions_in_window"] == 0


def test_the_plugin_s_health_and_an_unknown_window():
    s = Setup()
    s.publish(up=False)
    assert strict_json(s.feed.snapshot("5m"))["plugin"]["problem"] == "rank 0: no answer"
    for bad in ("2m", "", "x" * 100):
        with pytest.raises(UnknownWindowError, match="use one of 1m, 5m, all"):
            s.feed.snapshot(bad)


def test_a_server_without_vllm_metrics_has_nulls_not_errors():
    s = Setup()
    feed = VllmFeed(s.source, registry_reader(CollectorRegistry()), clock=s.now)
    s.t += 30
    snap = strict_json(feed.snapshot("1m"))
    assert snap["load"]["num_running"] is None and snap["load"]["kv_cache_usage"] is None
    assert snap["latency"]["time_to_first_token"]["count"] == 0 and snap["counters"]["requests_finished"] == {}
    assert snap["model"]["max_model_len"] is None and snap["series"]["num_running"] == [None]


def test_reading_vllms_metrics_never_renders_the_per_head_families(monkeypatch):
    s = Setup()
    calls = []
    monkeypatch.setattr(s.vllm.per_head, "collect", lambda: calls.append(1) or iter(()))
    s.vllm.ttft.observe(0.2)
    s.tick(10)
    assert s.feed.snapshot("1m")["latency"]["time_to_first_token"]["count"] == 1
    assert calls == []
    assert {n for n in SAMPLE_NAMES if not n.startswith("vllm:")} == set()


def test_the_ring_is_bounded_and_reads_add_points_only_when_due():
    s = Setup(history=8)
    s.tick(200)
    assert len(s.feed._ring) == 8
    s.t += 1
    s.feed.snapshot("1m")
    assert len(s.feed._ring) == 8 and s.feed._ring[-1].t == s.t - 1
    s.rows(3, 0.5)
    assert strict_json(s.feed.snapshot("all"))["heads"]["rows"] == 3     # "all" counts from zero


def test_background_ticks_refresh_record_and_survive_failures(caplog):
    async def go():
        s = Setup()
        feed = VllmFeed(s.source, registry_reader(s.vllm.registry), interval=0.01)
        calls = []

        async def refresh():
            calls.append(1)
            if len(calls) in (2, 3):
                raise RuntimeError("rpc timed out")

        task = asyncio.create_task(feed.run(refresh))
        while len(calls) < 6:
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return feed

    feed = asyncio.run(go())
    assert len(feed._ring) >= 4
    logged = [r for r in caplog.records if "could not record a point" in r.getMessage()]
    assert len(logged) == 1                             # the same failure twice is logged once


@pytest.mark.skipif(not LOGGERS.exists(), reason=".venv-vllm is absent: run `bash scripts/setup-vllm.sh`")
def test_the_metric_names_are_vllms():
    """Every family read here is registered by vLLM's stat logger (vllm/v1/metrics/loggers.py)."""
    registered = set(re.findall(r'name\s*=\s*"(vllm:[a-z0-9_:]+)"', LOGGERS.read_text()))
    for sample in SAMPLE_NAMES:
        family = re.sub(r"_(total|bucket|sum|count)$", "", sample)
        assert family in registered, sample
    assert set(LATENCY_FAMILIES.values()) <= registered
