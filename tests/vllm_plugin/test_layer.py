"""LayerTelemetry (per-layer state inside a vLLM worker) and PluginSettings, without vLLM."""

from __future__ import annotations

import logging
import math
from types import SimpleNamespace

import pytest
import torch

from server.vllm_plugin.layer import FLUSH_EVERY, AttentionFeatures, LayerSpec, LayerTelemetry
from server.vllm_plugin.settings import SAMPLE_RATE_ENV, PluginSettings
from tests.vllm_plugin.paged_fixtures import BS, D, H, KVH, paged_cache, reference

SPEC = LayerSpec(num_heads=H, num_kv_heads=KVH, head_dim=D, scale=1 / math.sqrt(D))


def meta(qsl: torch.Tensor, lens: torch.Tensor, table: torch.Tensor) -> SimpleNamespace:
    """A stand-in for vLLM's CPUAttentionMetadata (a fresh object per step, as in vLLM)."""
    return SimpleNamespace(query_start_loc=qsl, seq_lens=lens, block_table=table)


def step(lens: list[int], seed: int = 0):
    """One decode step of len(lens) sequences: q [T, H, D], the cache, and a metadata factory."""
    g = torch.Generator().manual_seed(seed)
    keys = [torch.randn(n, KVH, D, generator=g) for n in lens]
    cache, table = paged_cache(keys, num_blocks=32, seed=seed)
    q = torch.randn(len(lens), H, D, generator=g)
    qsl = torch.arange(len(lens) + 1, dtype=torch.int32)
    return keys, q, cache, lambda: meta(qsl, torch.tensor(lens, dtype=torch.int32), table)


def test_record_adds_one_row_per_sequence_with_the_float64_values():
    lt = LayerTelemetry(SPEC, AttentionFeatures(), PluginSettings(sample_rate=1.0))
    keys, q, cache, m = step([3, 40, 70])
    lt.record("model.layers.0.self_attn.attn", "vec", q, cache, m())
    hs = lt.snapshot()
    assert hs.rows == 3 and hs.counts.tolist() == [[3] * H]
    want = sum(reference(q[b], keys[b]) for b in range(3))                # [H, 5]
    assert torch.allclose(hs.sums[0], want, atol=5e-5)
    assert int(hs.histogram.sum()) == 3 * H


def test_a_prefill_chunk_counts_only_its_last_row():
    lt = LayerTelemetry(SPEC, AttentionFeatures(), PluginSettings(sample_rate=1.0))
    keys, q, cache, m = step([10])
    qfull = torch.randn(10, H, D)
    qfull[9] = q[0]
    prefill = m()
    prefill.query_start_loc = torch.tensor([0, 10], dtype=torch.int32)
    lt.record("l", "vec", qfull, cache, prefill)
    hs = lt.snapshot()
    assert hs.rows == 1 and torch.allclose(hs.sums[0], reference(q[0], keys[0]), atol=2e-5)


def test_sample_rate_zero_records_nothing_and_half_records_every_other_step():
    keys, q, cache, m = step([5, 6])
    off = LayerTelemetry(SPEC, AttentionFeatures(), PluginSettings(sample_rate=0.0))
    half = LayerTelemetry(SPEC, AttentionFeatures(), PluginSettings(sample_rate=0.5))
    assert not off.active
    for _ in range(4):
        half.record("l", "vec", q, cache, m())
    assert off.snapshot().rows == 0 and half.snapshot().rows == 4


@pytest.mark.parametrize("features, reason", [
    (AttentionFeatures(alibi=True), "alibi"),
    (AttentionFeatures(sliding_window=4096), "sliding_window"),
    (AttentionFeatures(sinks=True), "attention_sinks"),
    (AttentionFeatures(softcap=30.0), "softcap"),
    (AttentionFeatures(kv_cache_dtype="fp8_e4m3"), "kv_cache_dtype_fp8_e4m3"),
    (AttentionFeatures(decoder=False), "not_decoder_attention"),
    (AttentionFeatures(kv_cache_dtype="int8_per_token_head"), "kv_cache_dtype_int8_per_token_head"),
    (AttentionFeatures(chunk_lookback=8192), "chunked_local_attention"),
])
def test_unsupported_configuration_turns_the_layer_off_with_one_warning(features, reason, caplog):
    lt = LayerTelemetry(SPEC, features, PluginSettings(sample_rate=1.0))
    keys, q, cache, m = step([5])
    with caplog.at_level(logging.WARNING, logger="server.vllm_plugin.layer"):
        for _ in range(3):
            lt.record("model.layers.4.self_attn.attn", "vec", q, cache, m())
    assert lt.disabled == reason and lt.snapshot().rows == 0
    warnings = [r for r in caplog.records if "telemetry is off" in r.getMessage()]
    assert len(warnings) == 1 and "model.layers.4" in warnings[0].getMessage() and reason in warnings[0].getMessage()


def test_unsupported_defaults_are_supported():
    assert AttentionFeatures(sliding_window=-1, softcap=0).unsupported_reason() is None
    for plain in ("auto", "bfloat16", "float16", "float32"):      # unquantized caches store keys as they are
        assert AttentionFeatures(kv_cache_dtype=plain).unsupported_reason() is None


@pytest.mark.parametrize("isa", ["amx", "vec16", "neon", "hnd", None])
def test_an_unknown_kv_layout_turns_the_layer_off(isa):
    lt = LayerTelemetry(SPEC, AttentionFeatures(), PluginSettings(sample_rate=1.0))
    keys, q, cache, m = step([5])
    lt.record("l", isa, q, cache, m())
    assert lt.disabled == f"kv_layout_{isa}" and lt.snapshot().rows == 0


def test_a_cache_of_another_shape_turns_the_layer_off():
    lt = LayerTelemetry(SPEC, AttentionFeatures(), PluginSettings(sample_rate=1.0))
    keys, q, cache, m = step([5])
    lt.record("l", "vec", q, cache[..., :D], m())
    assert lt.disabled == "kv_layout_shape"


def test_a_failure_inside_telemetry_is_contained(caplog):
    lt = LayerTelemetry(SPEC, AttentionFeatures(), PluginSettings(sample_rate=1.0))
    keys, q, cache, m = step([5, 6])
    bad = m()
    bad.block_table = torch.full_like(bad.block_table, 10_000)           # block ids outside the cache
    with caplog.at_level(logging.ERROR, logger="server.vllm_plugin.layer"):
        lt.record("model.layers.7.self_attn.attn", "vec", q, cache, bad)
    assert lt.disabled is not None and lt.disabled.startswith("error_")
    assert any("telemetry failed" in r.getMessage() for r in caplog.records)
    lt.record("model.layers.7.self_attn.attn", "vec", q, cache, m())   # stays off, no raise
    assert lt.snapshot().rows == 0


def test_pending_steps_are_flushed_in_batches_and_before_a_snapshot():
    lt = LayerTelemetry(SPEC, AttentionFeatures(), PluginSettings(sample_rate=1.0))
    keys, q, cache, m = step([7, 8])
    for _ in range(FLUSH_EVERY + 3):
        lt.record("l", "vec", q, cache, m())
    assert lt.accumulator.snapshot().rows == 2 * FLUSH_EVERY                 # one batch flushed, 3 steps waiting
    hs = lt.snapshot()
    assert hs.rows == 2 * (FLUSH_EVERY + 3)
    want = (reference(q[0], keys[0]) + reference(q[1], keys[1])) * (FLUSH_EVERY + 3)
    assert torch.allclose(hs.sums[0], want, rtol=1e-5, atol=1e-4)


def test_settings_from_env():
    assert PluginSettings.from_env({}).sample_rate == PluginSettings().sample_rate
    assert PluginSettings.from_env({SAMPLE_RATE_ENV: " 0.25 "}).sample_rate == 0.25
    for bad in ["abc", "1.5", "-0.1", "nan", "inf"]:
        with pytest.raises(ValueError, match=SAMPLE_RATE_ENV):
            PluginSettings.from_env({SAMPLE_RATE_ENV: bad})


def test_grouping_must_divide():
    with pytest.raises(ValueError, match="do not group"):
        LayerTelemetry(LayerSpec(9, 2, D, 1.0), AttentionFeatures(), PluginSettings(sample_rate=1.0))
