"""An attention backend against the torch reference (shared by the backends' tests): one mixed
step (decode rows and a prefill chunk over a cached prefix) through forward, and the whole
engine (greedy tokens and per-head telemetry over a continuous batch with chunked prefill)."""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch

from server.engine.attention import build_backend
from server.engine.kv_cache import KVCache
from server.engine.telemetry import STAT_NAMES
from tests.engine.attention.test_torch_ref import _meta


def assert_acc_close(got: torch.Tensor, want: torch.Tensor, rel: float = 1e-5) -> None:
    err = (got.double() - want.double()).abs()
    assert (err <= rel * want.double().abs() + 1e-30).all(), (err / want.double().abs()).max()


def mixed_step(stats, device: torch.device | str = "cpu", cache_dtype: torch.dtype = torch.float32):
    """Two decode rows and a prefill chunk over a cached prefix (test_torch_ref's step), as
    (cache, q, k_new, v_new, metadata) on device, the cache in cache_dtype."""
    from server.config import ModelConfig

    g = torch.Generator().manual_seed(5)
    h, kvh, d, bs = 9, 3, 64, 4
    mc = ModelConfig(name="t", architecture="llama", vocab_size=10, hidden_size=h * d, intermediate_size=8,
                     num_layers=2, num_heads=h, num_kv_heads=kvh, head_dim=d, max_position_embeddings=64)
    cache = KVCache.allocate(mc, num_blocks=16, block_size=bs, device=device, dtype=cache_dtype)
    tables, lens, new = [[7, 2, 11], [5, 1], [3, 9, 0, 14]], [10, 6, 15], [1, 1, 9]
    for t, n, nn in zip(tables, lens, new):
        idx = torch.tensor([t[p // bs] * bs + p % bs for p in range(n - nn)], dtype=torch.long, device=device)
        cache.write(1, idx, torch.randn(len(idx), kvh, d, generator=g).to(device),
                    torch.randn(len(idx), kvh, d, generator=g).to(device))
    q = torch.randn(sum(new), h, d, generator=g).to(device)           # [T, H, D]
    k_new = torch.randn(sum(new), kvh, d, generator=g).to(device)     # [T, KVH, D]
    v_new = torch.randn(sum(new), kvh, d, generator=g).to(device)     # [T, KVH, D]
    meta = _meta(tables, lens, new, bs, stats)
    moved = {f: getattr(meta, f).to(device) for f in ("slot_mapping", "query_start_loc", "seq_lens", "block_table")}
    return cache, q, k_new, v_new, dataclasses.replace(meta, **moved)


def assert_mixed_step_matches_torch(make: Callable[[KVCache], object], stats, device: torch.device | str = "cpu",
                                    cache_dtype: torch.dtype = torch.float32, prefill_tol: float = 0.0):
    """make(cache) -> the backend under test. Decode rows within 1e-5 of the reference, prefill
    rows within prefill_tol (0: bit for bit, for a backend that runs the reference's code),
    telemetry rows in the asked order (fp32), and the output bit-identical with telemetry off (a
    second backend from make over a copy of the cache)."""
    cache, q, k_new, v_new, meta = mixed_step(stats, device, cache_dtype)
    ref_cache = KVCache(k=[t.clone() for t in cache.k], v=[t.clone() for t in cache.v])
    tested = make(cache)
    ref = build_backend("torch", ref_cache, torch.device(device), sink_tokens=4, max_positions=64)
    out, acc = tested.forward(1, q, k_new, v_new, tested.prepare(meta))
    ref_out, ref_acc = ref.forward(1, q, k_new, v_new, ref.prepare(meta))
    for a, b in ((cache.k[1], ref_cache.k[1]), (cache.v[1], ref_cache.v[1])):  # pages never written may hold NaN
        assert torch.allclose(a, b, rtol=0, atol=0, equal_nan=True)
    assert (out[:2] - ref_out[:2]).abs().max() < 1e-5
    if prefill_tol:
        assert (out[2:] - ref_out[2:]).abs().max() < prefill_tol
    else:
        assert torch.equal(out[2:], ref_out[2:])
    if stats is None:
        assert acc is None and ref_acc is None
    else:
        assert acc.shape == ref_acc.shape == (len(stats), 9, 4) and acc.dtype == torch.float32
        assert_acc_close(acc.cpu(), ref_acc.cpu())
    _, q2, k2, v2, meta_off = mixed_step(None, device, cache_dtype)
    again = make(KVCache(k=[t.clone() for t in ref_cache.k], v=[t.clone() for t in ref_cache.v]))
    out_off, none = again.forward(1, q2, k2, v2, again.prepare(meta_off))
    assert none is None and torch.equal(out_off, out)


def assert_engine_matches_torch(model_dir: str, backend: str, prompts: list[str], max_tokens: int,
                                device: str = "cpu", kv_cache_dtype: str = "auto", tol: float = 1e-5) -> None:
    """Greedy tokens identical, per-request telemetry and the per-head snapshot within tol, over
    a continuous batch with chunked prefill (steps that mix decode rows and prefill chunks)."""
    from server.config import CacheConfig, EngineConfig, SchedulerConfig
    from server.engine.engine import Engine
    from server.engine.request import SamplingParams

    def run(name: str):
        engine = Engine(EngineConfig(model=model_dir, device=device,
                                     cache=CacheConfig(num_blocks=64, dtype=kv_cache_dtype),
                                     attention_backend=name,
                                     scheduler=SchedulerConfig(max_model_len=256, max_num_batched_tokens=16)))
        assert engine.runner.attention.name == name
        params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True, head_telemetry=True)
        return engine.generate(prompts, params), engine.head_stats_snapshot()

    got, got_snap = run(backend)
    ref, ref_snap = run("torch")
    for a, b in zip(got, ref):
        assert a.token_ids == b.token_ids
        assert a.head_telemetry.rows == b.head_telemetry.rows == max_tokens
        for name in STAT_NAMES:
            mine, want = torch.tensor(getattr(a.head_telemetry, name)), torch.tensor(getattr(b.head_telemetry, name))
            assert (mine - want).abs().max() < tol, name
    assert torch.equal(got_snap.counts, ref_snap.counts)
    assert (got_snap.means() - ref_snap.means()).abs().max() < tol
