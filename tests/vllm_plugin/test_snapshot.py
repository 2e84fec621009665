"""Rank reports -> one global HeadStats (tensor-parallel head slices, pipeline layer slices), and
its export through any prometheus_client registry with headwise serve's families."""

from __future__ import annotations

import asyncio
import shutil

import pytest
import torch
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from server.engine.telemetry import HeadStatsAccumulator
from server.exposition import ModelDescription
from server.vllm_plugin.export import PluginCollector, TelemetrySource
from server.vllm_plugin.settings import PluginSettings
from server.vllm_plugin.snapshot import LayerReport, RankReport, merge_reports

MODEL = ModelDescription("m", num_layers=30, num_heads=9, num_kv_heads=3)
BUCKETS = PluginSettings().buckets


def full_accumulator(seed: int = 0, rows: int = 7) -> HeadStatsAccumulator:
    g = torch.Generator().manual_seed(seed)
    acc = HeadStatsAccumulator(MODEL.num_layers, MODEL.num_heads, BUCKETS)
    acc.add(torch.rand(MODEL.num_layers, rows, MODEL.num_heads, 5, generator=g, dtype=torch.float64))
    return acc


def rank_reports(acc: HeadStatsAccumulator, tp: int, pp: int = 1) -> list[dict]:
    """Split a full accumulator the way vLLM splits the model: heads over tp, layers over pp."""
    hs = acc.snapshot()
    h = MODEL.num_heads // tp
    per_stage = MODEL.num_layers // pp
    wires = []
    for stage in range(pp):
        for r in range(tp):
            layers = []
            for layer in range(stage * per_stage, (stage + 1) * per_stage):
                heads = slice(r * h, (r + 1) * h)
                # a layer's histogram covers all its heads: rank 0 carries it whole, the others zeros
                layers.append(LayerReport(layer=layer, head_offset=r * h, sums=hs.sums[layer, heads].tolist(),
                                          counts=hs.counts[layer, heads].tolist(),
                                          histogram=(hs.histogram[layer] if r == 0 else 0 * hs.histogram[layer]).tolist(),
                                          histogram_sum=float(hs.histogram_sum[layer]) if r == 0 else 0.0,
                                          rows=hs.rows, disabled=None))
            wires.append(RankReport(rank=r, buckets=BUCKETS, sample_rate=1.0, layers=tuple(layers),
                                    stock_layers=()).to_wire())
    return wires


@pytest.mark.parametrize("tp, pp", [(1, 1), (3, 1), (9, 1), (3, 2)])
def test_merging_rank_slices_gives_back_the_whole(tp, pp):
    acc = full_accumulator()
    merged = merge_reports([RankReport.from_wire(w) for w in rank_reports(acc, tp, pp)], MODEL, BUCKETS)
    want = acc.snapshot()
    assert merged.up and merged.problem is None and merged.disabled == {}
    assert torch.equal(merged.head_stats.sums, want.sums) and torch.equal(merged.head_stats.counts, want.counts)
    assert torch.equal(merged.head_stats.histogram, want.histogram) and merged.head_stats.rows == want.rows


def test_disabled_layers_and_stock_layers_are_reported():
    acc = full_accumulator()
    wires = rank_reports(acc, 3)
    wires[1]["layers"][4]["disabled"] = "sliding_window"
    wires[2]["stock_layers"] = ["model.layers.0.self_attn.attn"]
    merged = merge_reports([RankReport.from_wire(w) for w in wires], MODEL, BUCKETS)
    assert merged.disabled == {4: "sliding_window"}
    assert not merged.up and "rank 2" in merged.problem and "without the headwise backend" in merged.problem


def test_no_reports_is_down():
    merged = merge_reports([], MODEL, BUCKETS)
    assert not merged.up and merged.head_stats.counts.sum() == 0 and merged.sample_rate is None


def test_the_exported_sample_rate_is_the_lowest_rank_rate():
    wires = rank_reports(full_accumulator(), 3)
    wires[1]["sample_rate"] = 0.2
    assert merge_reports([RankReport.from_wire(w) for w in wires], MODEL, BUCKETS).sample_rate == 0.2


def test_a_report_outside_the_model_is_refused():
    wire = rank_reports(full_accumulator(), 3)[2]
    wire["layers"][0]["head_offset"] = 7
    with pytest.raises(ValueError, match="outside 30 x 9"):
        merge_reports([RankReport.from_wire(wire)], MODEL, BUCKETS)
    wire = rank_reports(full_accumulator(), 1)[0]
    wire["buckets"] = [0.5]
    with pytest.raises(ValueError, match="buckets"):
        merge_reports([RankReport.from_wire(wire)], MODEL, BUCKETS)


def scrape(source: TelemetrySource) -> tuple[str, dict]:
    reg = CollectorRegistry()
    reg.register(PluginCollector(source))
    text = generate_latest(reg).decode()
    return text, {f.name: f for f in text_string_to_metric_families(text)}


def test_export_has_every_head_of_every_family_and_the_health_gauges():
    acc = full_accumulator(rows=5)
    wires = rank_reports(acc, 3)
    wires[0]["layers"][2]["disabled"] = "softcap"

    async def fetch():
        return wires

    source = TelemetrySource(MODEL, BUCKETS, fetch)
    asyncio.run(source.refresh())
    text, families = scrape(source)
    for name in ("headwise_head_entropy_nats", "headwise_head_normalized_entropy", "headwise_head_max_weight",
                 "headwise_head_sink_mass", "headwise_head_lookback_distance"):
        counts = [s for s in families[name].samples if s.name.endswith("_count")]
        assert len(counts) == 270 and {s.value for s in counts} == {5.0}
        assert {(s.labels["layer"], s.labels["head"]) for s in counts} == {(str(l), str(h)) for l in range(30) for h in range(9)}
        assert all(int(s.labels["kv_head"]) == int(s.labels["head"]) // 3 for s in counts)
    assert families["headwise_telemetry_up"].samples[0].value == 1.0
    assert families["headwise_telemetry_sample_rate"].samples[0].value == 1.0
    off = families["headwise_telemetry_layer_disabled"].samples
    assert [(s.labels["layer"], s.labels["reason"], s.value) for s in off] == [("2", "softcap", 1.0)]
    if shutil.which("promtool"):
        from tests.test_metrics import promtool_problems

        assert promtool_problems(text) == ""


def test_a_failed_fetch_keeps_the_last_values_and_reads_down(caplog):
    acc = full_accumulator(rows=3)
    calls = {"n": 0}

    async def fetch():
        calls["n"] += 1
        if calls["n"] > 1:
            raise RuntimeError("worker has no method headwise_snapshot")
        return rank_reports(acc, 1)

    source = TelemetrySource(MODEL, BUCKETS, fetch)
    assert asyncio.run(source.refresh()).up
    merged = asyncio.run(source.refresh())
    assert not merged.up and "headwise_snapshot" in merged.problem
    assert int(merged.head_stats.counts[0, 0]) == 3 and merged.sample_rate == 1.0
    _, families = scrape(source)
    assert families["headwise_telemetry_up"].samples[0].value == 0.0


def test_telemetry_json_has_headwise_serves_heads_shape():
    from server.vllm_plugin.feed import VllmFeed
    from server.vllm_plugin.vllm_metrics import empty_counters

    acc = full_accumulator(rows=4)
    wires = rank_reports(acc, 3)
    for layer in wires[1]["layers"][:2]:                                   # rank 1's heads of layers 0, 1 saw no row
        layer["counts"] = [0, 0, 0]
        layer["sums"] = [[0.0] * 5] * 3
        layer["disabled"] = "alibi"

    async def fetch():
        return wires

    source = TelemetrySource(MODEL, BUCKETS, fetch)
    asyncio.run(source.refresh())
    body = VllmFeed(source, empty_counters).snapshot("all")
    assert body["model"]["id"] == "m" and (body["model"]["layers"], body["model"]["heads"]) == (30, 9)
    assert body["server"] == "vllm" and body["window"] == "all"
    heads = body["heads"]
    assert heads["rows"] == 4 and len(heads["counts"]) == 30 and heads["counts"][0][3] == 0
    assert heads["entropy"][0][3] is None and heads["entropy"][0][0] == pytest.approx(
        float(acc.snapshot().means()[0, 0, 0]))
    assert body["plugin"] == {"up": True, "problem": None, "disabled_layers": {"0": "alibi", "1": "alibi"}}
