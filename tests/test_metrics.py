"""The Prometheus exposition (server/metrics.py over server/exposition.py and server/latency.py).

In-process: exported per-head sums, counts and histograms against a float64 recomputation from
the engine's raw telemetry rows; latency histograms against the requests' own RequestStats;
parsed with prometheus_client's reference parser and checked by promtool; Metrics over a
stand-in that has only EngineView's members. Live: a scrape taken
under load passes `promtool check metrics`; rejections are counted by reason; a real Prometheus
server scrapes the default model's server every second and answers the per-head mean normalized
entropy of all 270 heads, a finite median time to first token and the exact token increase."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from server.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig, TelemetryConfig
from server.engine.telemetry import STAT_NAMES, HeadStatsAccumulator
from server.engine.engine import Engine, EngineStats, FinishedRequest, StepStats
from server.engine.request import FinishReason, RequestStats, SamplingParams
from server.exposition import HEAD_FAMILIES
from server.latency import REQUEST_LATENCY_BUCKETS, TOKEN_LATENCY_BUCKETS, TTFT_BUCKETS
from server.metrics import FINISH_REASONS, EngineView, Metrics
from tests.api.conftest import ServerProcess, free_port, held_streams, metric

PROMTOOL = shutil.which("promtool")
PROMETHEUS = shutil.which("prometheus")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed (Debian package prometheus)")


def samples(text: str) -> dict[str, list]:
    """name -> [Sample] of an exposition, read by the reference parser."""
    out: dict[str, list] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, []).append(s)
    return out


def by_labels(rows, *keys: str) -> dict[tuple, float]:
    return {tuple(s.labels[k] for k in keys): s.value for s in rows}


def promtool_problems(text: str) -> str:
    r = subprocess.run([PROMTOOL, "check", "metrics"], input=text.encode(), capture_output=True, timeout=60)
    return "" if r.returncode == 0 else (r.stdout + r.stderr).decode()


class RecordingEngine:
    """A tiny-model engine whose raw telemetry rows [L, R, H, 5] are kept for a float64 reference."""

    def __init__(self, path: str, **telemetry) -> None:
        self.engine = Engine(EngineConfig(model=path, cache=CacheConfig(num_blocks=128),
                                          scheduler=SchedulerConfig(max_model_len=256),
                                          telemetry=TelemetryConfig(**telemetry)))
        self.rows: list[np.ndarray] = []
        real = self.engine.head_stats.add

        def add(stats):
            self.rows.append(stats.numpy().copy())   # [L, R, H, 5] float64, the rows the sums take
            real(stats)

        self.engine.head_stats.add = add

    def reference_rows(self) -> np.ndarray:
        """[L, N, H, 5] every row so far."""
        return np.concatenate(self.rows, axis=1)


PARAMS = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in (5, 9, 3)]
PROMPTS = ["Hello world", "The capital of France is", "Attention heads look back"]


@pytest.fixture(scope="module")
def served(tiny_llama_dir):
    rec = RecordingEngine(tiny_llama_dir, attention_time_sample_rate=1.0, per_head_histograms=True)
    metrics = Metrics(rec.engine, 'tiny "model" \\ one', "9.9")
    steps = []
    rec.engine.add_observer(steps.append)
    done = rec.engine.generate(PROMPTS, PARAMS)
    return rec, metrics, done, steps, metrics.render().decode()


def test_every_head_counts_one_row_per_generated_token(served):
    rec, metrics, done, _, text = served
    mc = rec.engine.model_config
    generated = sum(len(d.token_ids) for d in done)
    s = samples(text)
    group = mc.num_heads // mc.num_kv_heads
    for stat in STAT_NAMES:
        name = HEAD_FAMILIES[stat][0]
        counts = s[name + "_count"]
        assert len(counts) == mc.num_layers * mc.num_heads
        for c in counts:
            assert c.value == generated
            assert int(c.labels["kv_head"]) == int(c.labels["head"]) // group
            assert c.labels["model"] == 'tiny "model" \\ one'
    assert s["headwise_telemetry_rows_total"][0].value == generated


def test_head_sums_and_histograms_match_float64_reference(served):
    rec, _, _, _, text = served
    ref = rec.reference_rows()                                       # [L, N, H, 5]
    s = samples(text)
    for i, stat in enumerate(STAT_NAMES):
        got = by_labels(s[HEAD_FAMILIES[stat][0] + "_sum"], "layer", "head")
        want = ref[..., i].sum(axis=1)                               # [L, H]
        for (layer, head), value in got.items():
            assert value == pytest.approx(want[int(layer), int(head)], rel=1e-9, abs=1e-12)
    ne = ref[..., STAT_NAMES.index("normalized_entropy")]            # [L, N, H]
    buckets = rec.engine.config.telemetry.histogram_buckets
    le = [*map(float, buckets), math.inf]
    layer_buckets = s["headwise_layer_normalized_entropy_bucket"]
    for row in layer_buckets:
        layer, bound = int(row.labels["layer"]), float(row.labels["le"])
        assert row.value == np.count_nonzero(ne[layer] <= bound)    # Prometheus "le": value <= bound
    assert sorted({float(r.labels["le"]) for r in layer_buckets}) == le
    for row in s["headwise_layer_normalized_entropy_sum"]:
        assert row.value == pytest.approx(ne[int(row.labels["layer"])].sum(), rel=1e-9)
    for row in s["headwise_head_normalized_entropy_distribution_bucket"]:
        layer, head, bound = int(row.labels["layer"]), int(row.labels["head"]), float(row.labels["le"])
        assert row.value == np.count_nonzero(ne[layer, :, head] <= bound)


def test_latency_histograms_match_request_stats(served):
    rec, _, done, _, text = served
    s = samples(text)

    def histogram(name):
        count = s[name + "_count"][0].value
        total = s[name + "_sum"][0].value
        bounds = [float(r.labels["le"]) for r in s[name + "_bucket"]]
        return count, total, bounds

    ttft = [d.stats.time_to_first_token for d in done]
    itl = [x for d in done for x in d.stats.inter_token_latencies]
    count, total, bounds = histogram("headwise_time_to_first_token_seconds")
    assert count == 3 and total == pytest.approx(sum(ttft)) and bounds == [*TTFT_BUCKETS, math.inf]
    count, total, bounds = histogram("headwise_inter_token_latency_seconds")
    assert count == len(itl) == 5 + 9 + 3 - 3 and total == pytest.approx(sum(itl))
    assert bounds == [*TOKEN_LATENCY_BUCKETS, math.inf]
    count, total, _ = histogram("headwise_request_time_per_output_token_seconds")
    assert count == 3 and total == pytest.approx(sum(d.stats.decode_time / (len(d.token_ids) - 1) for d in done))
    for name, field in (("e2e_request_latency", "e2e_latency"), ("request_queue_time", "queue_time"),
                        ("request_prefill_time", "prefill_time"), ("request_decode_time", "decode_time")):
        count, total, bounds = histogram(f"headwise_{name}_seconds")
        assert count == 3 and total == pytest.approx(sum(getattr(d.stats, field) for d in done))
        assert bounds == [*REQUEST_LATENCY_BUCKETS, math.inf]
    success = by_labels(s["headwise_request_success_total"], "finished_reason")
    assert success == {("stop",): 0, ("length",): 3, ("abort",): 0}
    assert s["headwise_generation_tokens_total"][0].value == 17
    assert s["headwise_prompt_tokens_total"][0].value == sum(len(d.prompt_token_ids) for d in done)


def test_attention_time_per_layer_on_sampled_steps(served):
    rec, _, _, steps, text = served
    s = samples(text)
    counts = by_labels(s["headwise_layer_attention_time_seconds_count"], "layer")
    assert len(counts) == rec.engine.model_config.num_layers
    assert set(counts.values()) == {len(steps)}                     # sample rate 1: every step
    sums = by_labels(s["headwise_layer_attention_time_seconds_sum"], "layer")
    assert all(0 < v < sum(st.step_time for st in steps) for v in sums.values())


def test_info_and_load_families(served):
    rec, _, _, _, text = served
    s = samples(text)
    (info,) = s["headwise_model_info"]
    mc = rec.engine.model_config
    assert info.value == 1 and info.labels["layers"] == str(mc.num_layers) and info.labels["heads"] == str(mc.num_heads)
    assert info.labels["kv_heads"] == str(mc.num_kv_heads) and info.labels["version"] == "9.9"
    assert s["headwise_num_requests_running"][0].value == 0 and s["headwise_kv_cache_usage_ratio"][0].value == 0
    assert by_labels(s["headwise_requests_rejected_total"], "reason") == {
        ("queue_full",): 0, ("draining",): 0, ("invalid_request",): 0, ("context_length_exceeded",): 0, ("slow_consumer",): 0}
    assert by_labels(s["headwise_structured_requests_total"], "type") == {
        ("json_object",): 0, ("json_schema",): 0, ("regex",): 0, ("choice",): 0, ("grammar",): 0}


@needs_promtool
def test_promtool_accepts_the_exposition(served):
    assert promtool_problems(served[4]) == ""


def test_aborts_and_errors_are_counted(tiny_llama_dir):
    engine = Engine(EngineConfig(model=tiny_llama_dir, cache=CacheConfig(num_blocks=64),
                                 scheduler=SchedulerConfig(max_model_len=128)))
    metrics = Metrics(engine, "m")
    rid = engine.add_request("Hello", SamplingParams(max_tokens=50))
    engine.step()
    engine.abort(rid)
    assert list(engine.stream(rid))[-1].finish_reason is FinishReason.ABORT
    real = engine.runner.execute
    engine.runner.execute = lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom"))
    rid = engine.add_request("Hello", SamplingParams(max_tokens=5))
    assert list(engine.stream(rid))[-1].finish_reason is FinishReason.ERROR
    engine.runner.execute = real
    s = samples(metrics.render().decode())
    assert by_labels(s["headwise_request_success_total"], "finished_reason")[("abort",)] == 1
    assert by_labels(s["headwise_request_errors_total"], "reason") == {
        ("step_failed",): 1, ("nonfinite_logits",): 0, ("update_failed",): 0, ("other",): 0}
    assert s["headwise_e2e_request_latency_seconds_count"][0].value == 2


def test_engine_is_an_engine_view(served):
    assert isinstance(served[0].engine, EngineView)


def test_finish_reasons_are_the_enums_but_error():
    assert FINISH_REASONS == ("stop", "length", "abort")
    assert set(FINISH_REASONS) | {FinishReason.ERROR.value} == {r.value for r in FinishReason}


class StandInView:
    """Only EngineView's members: Metrics must need nothing else of an engine."""

    model_config = ModelConfig(name="stand-in", architecture="llama", vocab_size=32, hidden_size=16,
                               intermediate_size=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=4,
                               max_position_embeddings=64)
    max_model_len = 48
    block_size = 8

    def __init__(self) -> None:
        self.observers = []
        self.accumulator = HeadStatsAccumulator(2, 4, (0.5,))

    def stats(self) -> EngineStats:
        return EngineStats(num_running=1, num_waiting=2, kv_cache_usage=0.25, num_blocks=16, num_free_blocks=12,
                           num_preemptions=3, prefix_cache_queries=40, prefix_cache_hits=10, prompt_tokens=40,
                           generation_tokens=9, steps=11)

    def head_stats_snapshot(self):
        return self.accumulator.snapshot()

    def add_observer(self, observer) -> None:
        self.observers.append(observer)


def test_metrics_over_a_stand_in_view():
    view = StandInView()
    assert isinstance(view, EngineView)
    metrics = Metrics(view, "m", "1.0")
    assert view.observers == [metrics.observe_step]
    metrics.track_api(lambda: 5, lambda: {"queue_full": 2}, lambda: {"regex": 3, "json_schema": 1})
    view.accumulator.add(torch.full((2, 3, 4, len(STAT_NAMES)), 0.25, dtype=torch.float64))  # [L, R, H, 5]
    st = RequestStats(num_prompt_tokens=4, num_output_tokens=3, num_cached_tokens=0, num_preemptions=0,
                      queue_time=0.01, time_to_first_token=0.1, prefill_time=0.09, decode_time=0.2, e2e_latency=0.3)
    finished = tuple(FinishedRequest(f"r{i}", reason, st, None) for i, reason in enumerate(FinishReason))
    view.observers[0](StepStats(num_scheduled_tokens=4, num_sampled=4, num_preempted=0, num_running=0, num_waiting=0,
                                kv_cache_usage=0.0, step_time=0.05, telemetry=True, time_to_first_token=(0.1,),
                                finished=finished, attention_times=(1e-3, 2e-3)))
    s = samples(metrics.render().decode())
    (info,) = s["headwise_model_info"]
    assert info.labels["block_size"] == "8" and info.labels["max_model_len"] == "48"
    assert info.labels["head_dim"] == "4" and info.labels["kv_heads"] == "2"
    assert s["headwise_num_requests_waiting"][0].value == 2 and s["headwise_kv_cache_free_blocks"][0].value == 12
    assert s["headwise_api_requests_in_flight"][0].value == 5
    assert by_labels(s["headwise_requests_rejected_total"], "reason")[("queue_full",)] == 2
    assert by_labels(s["headwise_structured_requests_total"], "type") == {
        ("json_object",): 0, ("json_schema",): 1, ("regex",): 3, ("choice",): 0, ("grammar",): 0}
    assert by_labels(s["headwise_request_success_total"], "finished_reason") == {(r,): 1 for r in FINISH_REASONS}
    assert sum(x.value for x in s["headwise_request_errors_total"]) == 1
    assert s["headwise_e2e_request_latency_seconds_count"][0].value == len(FinishReason)
    assert s["headwise_telemetry_rows_total"][0].value == 3
    assert set(by_labels(s["headwise_head_sink_mass_sum"], "layer", "head").values()) == {0.75}
    assert by_labels(s["headwise_layer_attention_time_seconds_sum"], "layer") == {("0",): 1e-3, ("1",): 2e-3}


# ------------------------------------------------------------------------------- live servers
def stream_completion(url: str, prompt: str, max_tokens: int) -> int:
    """One streamed completion; returns the completion tokens its usage reports."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    used = None
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=300) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    used = chunk["usage"]["completion_tokens"]
    assert used is not None
    return used


def concurrently(n: int, fn, *args) -> list:
    results: list = [None] * n
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, fn(*args))) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    return results


@pytest.fixture
def tiny_server(tiny_llama_dir, tmp_path):
    srv = ServerProcess(["--model", tiny_llama_dir, "--max-model-len", "256", "--max-num-seqs", "4",
                         "--max-queue", "0"], tmp_path, "metrics").wait_ready()
    yield srv
    srv.stop()


@needs_promtool
def test_scrape_under_load_passes_promtool_and_counts_rejections(tiny_server):
    url = tiny_server.base_url
    scrapes: list[str] = []
    stop = threading.Event()

    def scrape():
        while not stop.is_set():
            scrapes.append(httpx.get(url + "/metrics", timeout=30).text)

    def running(text: str) -> bool:
        return ('headwise_num_requests_running{model=' in text
                and samples(text)["headwise_num_requests_running"][0].value > 0)

    scraper = threading.Thread(target=scrape)
    scraper.start()
    served: list[int] = []
    # a tiny model on a fast machine can finish a round between two scrapes: load in rounds until
    # a scrape lands inside one (the first nearly always does)
    for _ in range(5):
        served += concurrently(4, stream_completion, url, "Hello world, this is a test", 200)
        if any(running(t) for t in list(scrapes)):
            break
    stop.set()
    scraper.join()
    busy = [t for t in scrapes if running(t)]
    assert busy, "no scrape caught a running request"
    assert promtool_problems(busy[len(busy) // 2]) == ""
    assert metric(tiny_server, "headwise_generation_tokens_total") == sum(served)
    # rejections by reason: a bad body, a prompt over the window, a full queue (capacity 4)
    assert httpx.post(url + "/v1/completions", json={"prompt": "x", "max_tokens": -1}).status_code == 400
    assert httpx.post(url + "/v1/completions", json={"prompt": "x", "max_tokens": 10_000}).status_code == 400
    long_stream = {"prompt": "Hello", "max_tokens": 240, "ignore_eos": True, "stream": True}
    with held_streams(url + "/v1/completions", long_stream, 4):   # the server's whole capacity
        assert httpx.post(url + "/v1/completions", json={"prompt": "x", "max_tokens": 2}).status_code == 503
    for reason, n in (("invalid_request", 1), ("context_length_exceeded", 1), ("queue_full", 1), ("draining", 0)):
        assert metric(tiny_server, "headwise_requests_rejected_total", reason=reason) == n, reason


PROMETHEUS_CONFIG = """
global:
  scrape_interval: 1s
  evaluation_interval: 1s
scrape_configs:
  - job_name: headwise
    scrape_interval: 1s
    scrape_timeout: 900ms
    static_configs:
      - targets: ["127.0.0.1:{port}"]
"""


class Prometheus:
    """A real Prometheus server on loopback, scraping one target every second."""

    def __init__(self, target_port: int, workdir: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cfg = workdir / "prometheus.yml"
        cfg.write_text(PROMETHEUS_CONFIG.replace("{port}", str(target_port)))
        self.log = open(workdir / "prometheus.log", "wb")
        self.proc = subprocess.Popen([PROMETHEUS, f"--config.file={cfg}", f"--storage.tsdb.path={workdir / 'tsdb'}",
                                      f"--web.listen-address=127.0.0.1:{self.port}"],
                                     stdout=self.log, stderr=subprocess.STDOUT)

    def query(self, expr: str, at: float | None = None) -> list[dict]:
        params = {"query": expr} | ({"time": f"{at:.3f}"} if at is not None else {})
        r = httpx.get(self.url + "/api/v1/query", params=params, timeout=30).json()
        assert r["status"] == "success", r
        return r["data"]["result"]

    def wait_for_scrapes(self, n: int, timeout: float = 90.0) -> float:
        """Wait until n more successful scrapes of the target happened; returns the time of the last."""
        deadline = time.monotonic() + timeout
        seen: list[float] = []
        while time.monotonic() < deadline:
            try:
                res = self.query('up{job="headwise"}')
            except (httpx.HTTPError, ValueError):
                res = []
            if res and res[0]["value"][1] == "1" and (not seen or res[0]["value"][0] != seen[-1]):
                stamp = self.query('timestamp(up{job="headwise"})')[0]["value"][1]
                if not seen or float(stamp) > seen[-1]:
                    seen.append(float(stamp))
                    if len(seen) > n:
                        return seen[-1]
            time.sleep(0.25)
        raise AssertionError(f"Prometheus did not scrape {n} times in {timeout} s")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)
        self.log.close()


@pytest.mark.slow
@pytest.mark.skipif(PROMETHEUS is None, reason="prometheus not installed (Debian package prometheus)")
def test_real_prometheus_scrapes_all_heads(default_model, tmp_path):
    srv = ServerProcess(["--max-model-len", "1024", "--kv-cache-memory", "0.1"], tmp_path, "default").wait_ready(300)
    prom = Prometheus(srv.port, tmp_path)
    try:
        before_at = prom.wait_for_scrapes(1)
        before = srv_text = httpx.get(srv.url("/metrics")).text
        served = sum(concurrently(2, stream_completion, srv.base_url, "Tell me about attention heads.", 12))
        after_at = prom.wait_for_scrapes(2)
        srv_text = httpx.get(srv.url("/metrics")).text

        # per-head mean normalized entropy: rate of sum over rate of count, all 30 x 9 heads
        expr = ("rate(headwise_head_normalized_entropy_sum[2m]) / rate(headwise_head_normalized_entropy_count[2m])")
        res = prom.query(expr, at=after_at)
        got = {(r["metric"]["layer"], r["metric"]["head"]): float(r["value"][1]) for r in res}
        assert len(got) == 270
        s0, s1 = samples(before), samples(srv_text)
        d_sum = {k: v - by_labels(s0["headwise_head_normalized_entropy_sum"], "layer", "head")[k]
                 for k, v in by_labels(s1["headwise_head_normalized_entropy_sum"], "layer", "head").items()}
        d_cnt = {k: v - by_labels(s0["headwise_head_normalized_entropy_count"], "layer", "head")[k]
                 for k, v in by_labels(s1["headwise_head_normalized_entropy_count"], "layer", "head").items()}
        for key, value in got.items():
            assert 0.0 <= value <= 1.0
            assert value == pytest.approx(d_sum[key] / d_cnt[key], rel=1e-6)
        assert all(c == served for c in d_cnt.values())

        # a finite median time to first token from the histogram
        (p50,) = prom.query("histogram_quantile(0.5, sum by (le) (rate(headwise_time_to_first_token_seconds_bucket[2m])))",
                            at=after_at)
        assert math.isfinite(float(p50["value"][1])) and float(p50["value"][1]) > 0

        # the generation-token counter rose by exactly the tokens the test was served
        (t0,) = prom.query("headwise_generation_tokens_total", at=before_at)
        (t1,) = prom.query("headwise_generation_tokens_total", at=after_at)
        assert float(t1["value"][1]) - float(t0["value"][1]) == served
        (layers,) = prom.query('count(count by (layer) (headwise_layer_normalized_entropy_bucket{le="+Inf"}))')
        assert layers["value"][1] == "30"
    finally:
        prom.stop()
        srv.stop()
