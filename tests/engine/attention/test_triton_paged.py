"""The Triton backend: the paged decode kernels against float64 math, the torch reference and
telemetry.merge_partials, on tiny shapes (context 1, block and split boundaries, GQA 4/4, 8/2, 9/3,
padded block tables, fp32 / bf16 / fp16), the backend through the runner's metadata (decodes and a
prefill chunk over a cached prefix in one step), the backend choice, and the engine end to end
against the reference backend.

Without CUDA they run in Triton's CPU interpreter: tests/conftest.py imports triton and the kernels
under TRITON_INTERPRET=1 before any test module (transformers imports triton; the interpreter
cannot be chosen later). With CUDA they run the compiled kernels on the GPU. Tiles here are small
(16-key tiles, 32-key splits) so a few dozen keys cross tile and split boundaries."""

from __future__ import annotations

import dataclasses
import functools
import math

import numpy as np
import pytest
import torch

from server.config import ModelConfig
from server.engine.attention import build_backend
from server.engine.attention.torch_ref import attend
from server.engine.kv_cache import KVCache
from server.engine.telemetry import finalize_stats, key_weights, merge_partials
from tests.engine.attention.backend_agreement import (assert_acc_close, assert_engine_matches_torch,
                                                      assert_mixed_step_matches_torch, mixed_step)
from tests.engine.attention.test_cpu_paged import float64_acc, paged
from tests.engine.attention.test_torch_ref import reference_row

pytest.importorskip("triton", reason="triton is not installed (scripts/setup.sh installs it with the dev extra)")

LENS = [1, 15, 16, 17, 31, 32, 33, 64, 65, 100]  # BS = 16: block boundaries; split_keys = 32: split boundaries


@pytest.fixture(scope="module")
def kern(triton_dev):
    """The kernels module (interpreted where there is no CUDA)."""
    from server.engine.attention import triton_kernels

    return triton_kernels


@pytest.fixture(scope="module")
def dev(triton_dev: torch.device) -> torch.device:
    return triton_dev


def on(dev: torch.device, *tensors: torch.Tensor) -> list[torch.Tensor]:
    return [t.to(dev) for t in tensors]


@pytest.fixture
def tiles(kern):
    return kern.DecodeTiles(split_keys=32, block_n=16)


def decode(kern, tiles, q, kc, vc, table, lens, flags=None, upcast=None, sink=4):
    """paged_decode with fresh outputs (NaN where nothing is written), on q's device; flags None:
    every row computes telemetry. Returns (out [B, H, D], acc [B, H, 4], scratch or None) on the CPU."""
    b, h, d = q.shape
    dev = q.device
    flags = torch.ones(b, dtype=torch.int32) if flags is None else flags    # [B]
    out = torch.full_like(q, float("nan"))                                  # [B, H, D]
    acc = torch.full((b, h, 4), float("nan"), device=dev)                   # [B, H, 4]
    splits = kern.num_splits(int(lens.max()), tiles)
    scratch = None if splits == 1 else kern.DecodeScratch.allocate(b, h, splits, d, 4, dev)
    table, lens, flags = on(dev, table, lens, flags)
    kern.paged_decode(q, kc, vc, table, lens, flags, key_weights(int(lens.max()) + 8, sink, dev), out, acc,
                      1 / math.sqrt(d), tiles, scratch, upcast)
    if scratch is not None:
        scratch = kern.DecodeScratch(*(t.cpu() for t in dataclasses.astuple(scratch)))
    return out.cpu(), acc.cpu(), scratch


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (8, 2), (9, 3)])
def test_kernel_matches_float64_and_the_reference(kern, dev, tiles, heads, kv_heads):
    """Every length of LENS in one padded batch (block-table columns past a row's blocks hold an
    out-of-range id, unowned blocks hold 1e4): output within 1e-5 of float64 and of the torch
    reference, accumulators within 1e-5 relative, statistics within 1e-5."""
    d = 32
    q, kc, vc, table, lens, keys, values = paged(LENS, heads, kv_heads, d, seed=heads)
    out, acc, scratch = decode(kern, tiles, *on(dev, q, kc, vc), table, lens)
    assert scratch is not None and scratch.part_m.shape[2] == 4
    stats = finalize_stats(acc, lens)                                   # [B, H, 5]
    for b, n in enumerate(LENS):
        ref_out, ref_stats = reference_row(q[b], keys[b], values[b])
        assert (out[b].double() - ref_out).abs().max() < 1e-5, n
        assert_acc_close(acc[b], float64_acc(q[b], keys[b]))
        assert (stats[b].double() - ref_stats).abs().max() < 1e-5, n
        t_out, t_acc = attend(q[b:b + 1], keys[b][None], values[b][None], lens[b:b + 1], 1 / math.sqrt(d), True)
        assert (out[b] - t_out[0]).abs().max() < 1e-5
        assert_acc_close(acc[b], t_acc[0])


def test_reduce_is_the_centred_merge_of_the_split_partials(kern, dev, tiles):
    """The reduce kernel's accumulators equal telemetry.merge_partials over the partials the split
    kernel wrote (each centred at its own max), and the merged output is sum w_s o_s / L."""
    q, kc, vc, table, lens, _, _ = paged([100, 33, 70], 9, 3, 16, seed=4, qscale=6.0)
    out, acc, scratch = decode(kern, tiles, *on(dev, q, kc, vc), table, lens)
    for b, n in enumerate(lens.tolist()):
        s = -(-n // tiles.split_keys)
        m = scratch.part_m[b, :, :s].transpose(0, 1)                    # [S, H]
        parts = scratch.part_a[b, :, :s].transpose(0, 1)                # [S, H, 4]
        big_m, merged = merge_partials(m, parts)                        # [H], [H, 4]
        assert_acc_close(acc[b], merged, rel=1e-6)
        w = torch.exp(m - big_m)                                        # [S, H]
        o = (w[..., None] * scratch.part_o[b, :, :s].transpose(0, 1)).sum(0) / merged[:, 0, None]  # [H, D]
        assert (out[b] - o).abs().max() < 1e-6


def test_sharp_attention_and_sink_tokens(kern, dev, tiles):
    """Large logits (near one-hot rows) across splits: accumulators within 1e-4 relative of float64
    (scores of magnitude ~300 carry ~3e-5 relative float32 error into each e_j, as in
    test_cpu_paged), statistics within 1e-5; a sink of 7 keys comes from the key-weight column."""
    q, kc, vc, table, lens, keys, values = paged([100], 4, 1, 64, seed=11, qscale=50.0)
    out, acc, _ = decode(kern, tiles, *on(dev, q, kc, vc), table, lens, sink=7)
    assert_acc_close(acc[0], float64_acc(q[0], keys[0], sink=7), rel=1e-4)
    ref_out, ref_stats = reference_row(q[0], keys[0], values[0], sink=7)
    assert (out[0].double() - ref_out).abs().max() < 1e-4
    assert (finalize_stats(acc, lens)[0].double() - ref_stats).abs().max() < 1e-5


def test_telemetry_flags_and_batch_change_no_output_bit(kern, dev, tiles):
    """Output bit-identical with telemetry on, off or on some rows; accumulators of flagged rows
    unchanged by the others' flags; each row alone (a single split where it is short) gives bit
    for bit what it gives in the batch, and so does the batch reversed."""
    q, kc, vc, table, lens, _, _ = paged(LENS, 9, 3, 16, seed=8)
    q, kc, vc = on(dev, q, kc, vc)
    out, acc, _ = decode(kern, tiles, q, kc, vc, table, lens)
    off, acc_off, _ = decode(kern, tiles, q, kc, vc, table, lens, torch.zeros(len(LENS), dtype=torch.int32))
    some = torch.tensor([b % 3 == 0 for b in range(len(LENS))], dtype=torch.int32)
    part, acc_part, _ = decode(kern, tiles, q, kc, vc, table, lens, some)
    assert torch.equal(out, off) and torch.equal(out, part)
    assert acc_off.isnan().all()                                        # nothing written without the flag
    assert torch.equal(acc_part[some.bool()], acc[some.bool()]) and acc_part[~some.bool()].isnan().all()
    for b in range(len(LENS)):
        o1, a1, _ = decode(kern, tiles, q[b:b + 1], kc, vc, table[b:b + 1], lens[b:b + 1])
        assert torch.equal(o1[0], out[b]) and torch.equal(a1[0], acc[b]), LENS[b]
    rev = list(reversed(range(len(LENS))))
    o2, a2, _ = decode(kern, tiles, q[rev], kc, vc, table[rev], lens[rev])
    assert torch.equal(o2, out[rev]) and torch.equal(a2, acc[rev])


def exact_bf16_dot(builder_cls):
    """The interpreter's create_dot with bf16 operands widened to fp32 first (triton 3.9's numpy
    matmul multiplies their raw uint16 bits): the GPU's bf16-in, fp32-accumulate dot."""
    import triton.language as tl
    from triton.runtime.interpreter import TensorHandle

    orig = builder_cls.create_dot

    def widen(x):
        if x.dtype != tl.bfloat16:
            return x
        return TensorHandle((x.data.astype(np.uint32) << 16).view(np.float32), tl.float32)

    @functools.wraps(orig)
    def create_dot(self, a, b, d, *args):
        return orig(self, widen(a), widen(b), d, *args)

    return create_dot


@pytest.mark.parametrize("dtype,upcast,tol", [(torch.bfloat16, None, 2e-2), (torch.bfloat16, False, 2e-2),
                                              (torch.float16, None, 2e-3)],
                         ids=["bf16", "bf16-gpu-path", "fp16"])
def test_half_precision_caches(kern, dev, tiles, monkeypatch, dtype, upcast, tol):
    """bf16 / fp16 caches and queries: output within the dtype's tolerance of float64 over the same
    rounded inputs; the accumulators (fp32 scores, fp32 softmax) within 1e-5 relative. Under the
    interpreter "bf16" upcasts the dot operands (its bf16 dot is wrong) and "bf16-gpu-path" runs
    the kernel the GPU runs (bf16 dot operands, p rounded to bf16 before p @ V) on an interpreter
    whose dot is made exact for bf16."""
    if upcast is False and kern.interpreted():
        from triton.runtime.interpreter import InterpreterBuilder

        monkeypatch.setattr(InterpreterBuilder, "create_dot", exact_bf16_dot(InterpreterBuilder))
    q, kc, vc, table, lens, keys, values = paged([1, 17, 40, 65], 8, 2, 32, seed=2, qscale=2.0)
    q, kc, vc = q.to(dtype), kc.to(dtype), vc.to(dtype)
    out, acc, _ = decode(kern, tiles, *on(dev, q, kc, vc), table, lens, upcast=upcast)
    assert out.dtype == dtype and acc.dtype == torch.float32
    for b in range(len(lens)):
        k, v = keys[b].to(dtype), values[b].to(dtype)
        ref_out, _ = reference_row(q[b], k, v)
        assert (out[b].double() - ref_out).abs().max() < tol
        assert_acc_close(acc[b], float64_acc(q[b], k))


@pytest.mark.parametrize("stats", [[0, 1, 2], [1, 2], [0], [2], None], ids=["all", "some", "decode", "prefill", "off"])
def test_mixed_step_matches_the_torch_backend(kern, dev, stats):
    """Two decode rows and a prefill chunk over a cached prefix in one forward: decode rows and
    prefill rows (the prefill kernel, the chunk's last row through the decode kernel) within 1e-5
    of the reference, telemetry rows in the asked order, the output bit-identical with telemetry
    off (there from a backend with 16-key tiles)."""
    from server.engine.attention.triton_paged import TritonPagedBackend

    built = []

    def make(cache):
        backend = (build_backend("triton", cache, dev, sink_tokens=4, max_positions=64) if not built else
                   TritonPagedBackend(cache, 4, 64, tiles=kern.DecodeTiles(split_keys=16, block_n=16)))
        built.append(backend)
        assert isinstance(backend, TritonPagedBackend) and backend.name == "triton"
        return backend

    assert_mixed_step_matches_torch(make, stats, dev, prefill_tol=1e-5)


def test_backend_choice(kern, dev, monkeypatch):
    """auto takes triton on CUDA, never on a CPU (cpu, else torch); naming it on a CPU without the
    interpreter, or over an int8 cache, is an error that says why."""
    from server.engine.attention import cpu_paged

    cache, *_ = mixed_step(None)
    cpu = torch.device("cpu")
    if dev.type == "cuda":
        gpu_cache = KVCache(k=on(dev, *cache.k), v=on(dev, *cache.v))
        assert build_backend("auto", gpu_cache, dev, sink_tokens=4, max_positions=64).name == "triton"
    picked = build_backend("auto", cache, cpu, sink_tokens=4, max_positions=64).name
    assert picked == ("cpu" if cpu_paged.CpuPagedBackend.supports(cpu) else "torch")
    monkeypatch.setattr(cpu_paged.CpuPagedBackend, "supports", staticmethod(lambda device: False))
    assert build_backend("auto", cache, cpu, sink_tokens=4, max_positions=64).name == "torch"
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match=r"attention backend 'triton' does not run on cpu: .*TRITON_INTERPRET=1"):
        build_backend("triton", cache, cpu, sink_tokens=4, max_positions=64)
    int8 = KVCache(k=[t.to(dev, torch.int8) for t in cache.k], v=[t.to(dev, torch.int8) for t in cache.v])
    if dev.type == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(ValueError, match="float32, bfloat16 or float16 caches, not torch.int8"):
        build_backend("triton", int8, dev, sink_tokens=4, max_positions=64)


@pytest.mark.slow
def test_engine_generates_the_same_tokens_and_telemetry_as_torch(kern, dev, tiny_llama_dir, monkeypatch):
    """Greedy tokens identical, per-request telemetry within 1e-5, over a continuous batch with
    chunked prefill (steps that mix decode rows and prefill chunks), with 16-key splits so decode
    rows past 16 keys go through the reduce kernel."""
    monkeypatch.setattr(kern, "DecodeTiles", functools.partial(kern.DecodeTiles, split_keys=16, block_n=16))
    prompts = ["The capital of France is", "Hello world! 1 2 3 4 5 6 7 8 9 10. A quick brown fox jumps over", "A"]
    assert_engine_matches_torch(tiny_llama_dir, "triton", prompts, max_tokens=12, device=str(dev))
    # a bfloat16 cache under float32 activations (--kv-cache-dtype bfloat16): the prefill kernel's
    # dots take bfloat16 operands (q and the softmax weights rounded, as a GPU's bf16 dot does)
    # where the reference widens the cache to float32; the tolerance of the C++ backend's same
    # check (test_cpu_paged.py), whose bf16 prefill rounds the same operands
    assert_engine_matches_torch(tiny_llama_dir, "triton", prompts, max_tokens=12, device=str(dev),
                                kv_cache_dtype="bfloat16", tol=1e-2)


@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("src_dtype", [torch.float32, torch.bfloat16])
def test_store_kv_is_cache_write_and_skips_negative_slots(kern, dev, cache_dtype, src_dtype):
    """One launch writes what KVCache.write writes (rounded to nearest even, as torch casts),
    from strided K/V views (a qkv split), and nothing where the slot is -1 (a graph's padded row)."""
    g = torch.Generator().manual_seed(7)
    qkv = (torch.randn(12, 9 + 3 + 3, 24, generator=g) * 3).to(src_dtype)        # [T, H + 2 KVH, D]
    k, v = qkv[:, 9:12], qkv[:, 12:]                                             # [T, KVH, D] views
    slots = torch.randperm(5 * 4, generator=g)[:12]                              # [T]
    slots[[2, 7]] = -1
    mc = ModelConfig(name="t", architecture="llama", vocab_size=10, hidden_size=9 * 24, intermediate_size=8,
                     num_layers=1, num_heads=9, num_kv_heads=3, head_dim=24, max_position_embeddings=64)
    got = KVCache.allocate(mc, 5, 4, dev, cache_dtype)
    want = KVCache.allocate(mc, 5, 4, "cpu", cache_dtype)
    for c in (got, want):
        for t in c.k + c.v:
            t.zero_()
    kern.store_kv(*on(dev, k, v), got.k[0], got.v[0], slots.to(dev))
    keep = slots >= 0
    want.write(0, slots[keep], k[keep], v[keep])
    assert torch.equal(got.k[0].cpu(), want.k[0]) and torch.equal(got.v[0].cpu(), want.v[0])
