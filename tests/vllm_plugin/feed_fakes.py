"""Fakes for the plugin's telemetry feed: vLLM's metric families in a prometheus_client
registry (names and labels as vLLM's stat logger registers them) and a TelemetrySource whose
merged telemetry the test sets (tests/vllm_plugin/test_feed.py, test_endpoint.py)."""

from __future__ import annotations

import dataclasses

import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from server.engine.telemetry import NUM_STATS, STAT_NAMES, HeadStatsAccumulator
from server.exposition import ModelDescription
from server.vllm_plugin.export import PluginCollector, TelemetrySource
from server.vllm_plugin.feed import ModelDetails, VllmFeed
from server.vllm_plugin.settings import PluginSettings
from server.vllm_plugin.snapshot import LayerReport, RankReport, merge_reports
from server.vllm_plugin.vllm_metrics import registry_reader

MODEL = ModelDescription("m", num_layers=3, num_heads=4, num_kv_heads=2)
BUCKETS = PluginSettings().buckets
NE = STAT_NAMES.index("normalized_entropy")
TTFT_BUCKETS = (0.1, 0.5, 1.0)


class FakeVllm:
    """vLLM's stat logger's families (names, labels model_name and engine) in a registry of their
    own, plus the plugin's per-head collector as the server has it."""

    def __init__(self, source: TelemetrySource) -> None:
        self.registry = reg = CollectorRegistry()
        labels = ["model_name", "engine"]
        self.ttft = Histogram("vllm:time_to_first_token_seconds", "ttft", labels, buckets=TTFT_BUCKETS,
                              registry=reg).labels("m", "0")
        self.e2e = Histogram("vllm:e2e_request_latency_seconds", "e2e", labels, registry=reg).labels("m", "0")
        self.generation = Counter("vllm:generation_tokens", "gen", labels, registry=reg).labels("m", "0")
        self.prompt = Counter("vllm:prompt_tokens", "prompt", labels, registry=reg).labels("m", "0")
        success = Counter("vllm:request_success", "ok", [*labels, "finished_reason"], registry=reg)
        self.success = {r: success.labels("m", "0", r) for r in ("stop", "length", "abort", "error", "repetition")}
        self.preemptions = Counter("vllm:num_preemptions", "p", labels, registry=reg).labels("m", "0")
        self.queries = Counter("vllm:prefix_cache_queries", "q", labels, registry=reg).labels("m", "0")
        self.hits = Counter("vllm:prefix_cache_hits", "h", labels, registry=reg).labels("m", "0")
        rejections = Counter("vllm:admission_rejections", "r", ["model_name", "reason"], registry=reg)
        self.rejected = rejections.labels("m", "max_num_queued_reqs")
        self.running = Gauge("vllm:num_requests_running", "r", labels, registry=reg).labels("m", "0")
        self.waiting = Gauge("vllm:num_requests_waiting", "w", labels, registry=reg).labels("m", "0")
        self.kv = Gauge("vllm:kv_cache_usage_perc", "kv", labels, registry=reg).labels("m", "0")
        Gauge("vllm:cache_config_info", "info", ["block_size", "num_gpu_blocks", "engine"],
              registry=reg).labels("16", "1456", "0").set(1)
        self.per_head = PluginCollector(source)
        reg.register(self.per_head)


class Setup:
    """A feed over FakeVllm and one rank whose cumulative sums are `acc` (layer 2 disabled), on a
    clock that moves only when the test moves `t`."""

    def __init__(self, **feed_kwargs) -> None:
        async def fetch() -> list[dict]:
            return [self.report().to_wire()]

        self.t = 1000.0
        self.acc = HeadStatsAccumulator(MODEL.num_layers, MODEL.num_heads, BUCKETS)
        self.source = TelemetrySource(MODEL, BUCKETS, fetch)
        self.publish()
        self.vllm = FakeVllm(self.source)
        self.feed = VllmFeed(self.source, registry_reader(self.vllm.registry),
                             ModelDetails(name="/models/m", architecture="LlamaForCausalLM", head_dim=64,
                                          max_model_len=1024, block_size=16),
                             clock=self.now, wall=lambda: 1.7e9, **feed_kwargs)

    def now(self) -> float:
        return self.t

    def report(self) -> RankReport:
        hs = self.acc.snapshot()
        return RankReport(rank=0, buckets=BUCKETS, sample_rate=1.0, stock_layers=(), layers=tuple(
            LayerReport(layer=l, head_offset=0, sums=hs.sums[l].tolist(), counts=hs.counts[l].tolist(),
                        histogram=hs.histogram[l].tolist(), histogram_sum=float(hs.histogram_sum[l]), rows=hs.rows,
                        disabled="alibi" if l == 2 else None) for l in range(MODEL.num_layers)))

    def publish(self, up: bool = True) -> None:
        """What the source's refresh() would set: the rank's report merged, or a failure."""
        merged = merge_reports([self.report()], MODEL, BUCKETS)
        self.source.latest = merged if up else dataclasses.replace(merged, up=False, problem="rank 0: no answer")

    def rows(self, n: int, ne: float) -> None:
        """n telemetry rows with normalized entropy `ne` on every head (the workers' sums grow)."""
        stats = torch.full((MODEL.num_layers, n, MODEL.num_heads, NUM_STATS), 0.3, dtype=torch.float64)  # [L, R, H, 5]
        stats[..., NE] = ne
        self.acc.add(stats)
        self.publish()

    def tick(self, seconds: float) -> None:
        """Let time pass in 5 s steps, the background task recording a point at each."""
        for _ in range(int(seconds // 5)):
            self.t += 5
            self.feed.record()


