"""The per-head and per-layer exposition (server/exposition.py), without an engine.

The direct text path and the prometheus_client collector render one snapshot (random statistics
for a small grouped-query layout, values on bucket boundaries included); both are read back by
prometheus_client's reference parser and compared family by family, sample by sample. Also: the
statistic names are covered, "le" semantics, the collector in any registry without a snapshot at
registration, promtool on the collector's output, and what importing the module pulls in."""

from __future__ import annotations

import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from server.engine.telemetry import NUM_STATS, STAT_NAMES, HeadStats, HeadStatsAccumulator
from server.exposition import (ATTENTION_TIME_FAMILY, HEAD_ENTROPY_FAMILY, HEAD_FAMILIES, LAYER_ENTROPY_FAMILY,
                               ROWS_FAMILY, HeadStatsCollector, HeadStatsText, LayerHistograms,
                               LayerHistogramSnapshot, ModelDescription)

PROMTOOL = shutil.which("promtool")
BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
TIME_BUCKETS = (1e-4, 1e-3, 1e-2, 0.1)
MODEL = ModelDescription('tiny "model" \\ one\nline', num_layers=3, num_heads=6, num_kv_heads=2)


def head_stats(per_head_histograms: bool, rows: int = 7) -> HeadStats:
    acc = HeadStatsAccumulator(MODEL.num_layers, MODEL.num_heads, BUCKETS, per_head_histograms)
    g = torch.Generator().manual_seed(0)
    stats = torch.rand(MODEL.num_layers, rows, MODEL.num_heads, NUM_STATS, generator=g,
                       dtype=torch.float64)                          # [L, R, H, 5]
    stats[:, 0, 0, STAT_NAMES.index("normalized_entropy")] = 0.2     # exactly on a bucket bound
    stats[..., STAT_NAMES.index("entropy")] *= 1e7                   # large sums: exponent notation
    acc.add(stats)
    return acc.snapshot()


def attention_times() -> LayerHistogramSnapshot:
    h = LayerHistograms(MODEL.num_layers, TIME_BUCKETS)
    for values in ([1e-4, 5e-4, 2.0], [3e-5, 1e-3, 0.05], [0.5, 0.5, 0.5]):  # one per layer
        h.observe(values)
    return h.snapshot()


def parsed(text: str) -> dict[str, tuple[str, str, list]]:
    """family name -> (type, help, samples as sorted (name, sorted labels, value))."""
    out = {}
    for f in text_string_to_metric_families(text):
        assert f.name not in out, f"family {f.name} twice"
        rows = sorted((s.name, tuple(sorted(s.labels.items())), s.value) for s in f.samples)
        out[f.name] = (f.type, f.documentation, rows)
    return out


def collector_text(collector: HeadStatsCollector) -> str:
    registry = CollectorRegistry()
    registry.register(collector)
    return generate_latest(registry).decode()


def test_head_families_cover_the_statistics():
    assert set(HEAD_FAMILIES) == set(STAT_NAMES)
    names = [name for name, _ in HEAD_FAMILIES.values()]
    assert len(set(names)) == len(names) and all(n.startswith("headwise_head_") for n in names)


@pytest.mark.parametrize("per_head", [False, True])
@pytest.mark.parametrize("with_attention", [False, True])
def test_text_and_collector_give_the_same_families(per_head, with_attention):
    hs = head_stats(per_head)
    snap = attention_times() if with_attention else None
    text = HeadStatsText(MODEL).render(hs, snap)
    collected = collector_text(HeadStatsCollector(MODEL, lambda: hs, (lambda: snap) if with_attention else None))
    a, b = parsed(text), parsed(collected)
    assert list(a) == list(b)                                        # same families, same order
    for name in a:
        assert a[name][:2] == b[name][:2], name                      # type and help
        assert len(a[name][2]) == len(b[name][2]), name
        for x, y in zip(a[name][2], b[name][2]):
            assert x == y, name                                      # sample name, labels, value: exact

    expected = {ROWS_FAMILY[0].removesuffix("_total"), *(n for n, _ in HEAD_FAMILIES.values()),
                LAYER_ENTROPY_FAMILY[0]}
    expected |= {ATTENTION_TIME_FAMILY[0]} if with_attention else set()
    expected |= {HEAD_ENTROPY_FAMILY[0]} if per_head else set()
    assert set(a) == expected


def test_values_labels_and_kv_heads():
    hs = head_stats(per_head_histograms=True)
    fams = {f.name: f for f in text_string_to_metric_families(HeadStatsText(MODEL).render(hs, attention_times()))}
    (rows,) = fams["headwise_telemetry_rows"].samples
    assert rows.value == 7 and rows.labels == {"model": MODEL.name}
    for i, stat in enumerate(STAT_NAMES):
        samples = fams[HEAD_FAMILIES[stat][0]].samples
        assert len(samples) == 2 * MODEL.num_layers * MODEL.num_heads
        for s in samples:
            layer, head = int(s.labels["layer"]), int(s.labels["head"])
            assert int(s.labels["kv_head"]) == head // 3 and s.labels["model"] == MODEL.name
            want = hs.counts[layer, head].item() if s.name.endswith("_count") else hs.sums[layer, head, i].item()
            assert s.value == want
    layer = {(s.labels["layer"], s.labels["le"]): s.value
             for s in fams[LAYER_ENTROPY_FAMILY[0]].samples if s.name.endswith("_bucket")}
    cumulative = hs.histogram.cumsum(dim=1)                          # [L, NB+1]
    for (lay, le), value in layer.items():
        b = len(BUCKETS) if le == "+Inf" else BUCKETS.index(float(le))
        assert value == cumulative[int(lay), b].item()
    ne = STAT_NAMES.index("normalized_entropy")
    for s in fams[HEAD_ENTROPY_FAMILY[0]].samples:
        if s.name.endswith("_sum"):
            assert s.value == hs.sums[int(s.labels["layer"]), int(s.labels["head"]), ne].item()


def test_layer_histograms_count_le_inclusively():
    h = LayerHistograms(2, TIME_BUCKETS)
    h.observe([1e-3, 7.0])                                           # on a bound; above every bound
    h.observe([0.0, 1e-3])
    snap = h.snapshot()
    assert snap.buckets == TIME_BUCKETS
    assert snap.cumulative == ((1, 2, 2, 2, 2), (0, 1, 1, 1, 2))
    assert snap.sums == (1e-3, 7.0 + 1e-3)
    h.observe([1.0, 1.0])
    assert snap.cumulative[0][-1] == 2                               # a snapshot is a copy


def test_collector_takes_no_snapshot_at_registration():
    calls = []

    def snapshot() -> HeadStats:
        calls.append(1)
        return head_stats(per_head_histograms=False)

    collector = HeadStatsCollector(MODEL, snapshot)
    registries = [CollectorRegistry(auto_describe=True), CollectorRegistry()]
    for registry in registries:
        registry.register(collector)
    assert calls == []
    for registry in registries:
        assert b"headwise_head_sink_mass_count{" in generate_latest(registry)
    assert len(calls) == 2
    described = {f.name for f in collector.describe()}
    assert {f.name for f in collector.collect()} <= described


def test_empty_snapshot_renders_zeros():
    hs = HeadStatsAccumulator(MODEL.num_layers, MODEL.num_heads, BUCKETS).snapshot()
    fams = parsed(HeadStatsText(MODEL).render(hs))
    assert fams["headwise_telemetry_rows"][2][0][2] == 0
    for _, _, samples in fams.values():
        assert all(value == 0 and not math.isnan(value) for _, _, value in samples)


@pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed (Debian package prometheus)")
def test_promtool_accepts_the_collector_output():
    text = collector_text(HeadStatsCollector(MODEL, lambda: head_stats(True), attention_times))
    r = subprocess.run([PROMTOOL, "check", "metrics"], input=text.encode(), capture_output=True, timeout=60)
    assert r.returncode == 0, (r.stdout + r.stderr).decode()


def test_import_pulls_in_neither_the_engine_loop_nor_the_web_framework():
    code = ("import sys, server.exposition; "
            "print(sorted(m for m in sys.modules if m.startswith(('server', 'fastapi', 'pydantic', 'starlette'))))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True,
                       cwd=Path(__file__).resolve().parents[1])
    assert r.stdout.strip() == str(["server", "server.engine", "server.engine.telemetry", "server.exposition"])
