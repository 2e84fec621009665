"""The CPU fast path: the C++ paged-decode op against float64 math and the torch reference, the
backend through the runner's metadata (decodes and prefill chunks in one step), the fallback when
the extension cannot be built, and the engine end to end against the reference backend."""

from __future__ import annotations

import functools
import logging
import math
import shutil

import pytest
import torch

from server.engine.attention import build_backend, cpu_extension, cpu_paged
from server.engine.attention.torch_ref import attend
from server.engine.kv_cache import KVCache
from server.engine.telemetry import finalize_stats
from tests.engine.attention.backend_agreement import (assert_acc_close, assert_engine_matches_torch,
                                                      assert_mixed_step_matches_torch, mixed_step)
from tests.engine.attention.test_torch_ref import reference_row
from tests.engine.attention.test_paged_prefill import BF16_DOT

pytestmark = pytest.mark.skipif(shutil.which("c++") is None, reason="no C++ compiler to build the extension")

BS = 16


@pytest.fixture(scope="module")
def op():
    ext = cpu_extension.load_paged_decode()
    assert ext.op is not None, ext.reason  # a compiler is present: a build failure is a failure
    return ext.op


def paged(lens: list[int], h: int, kvh: int, d: int, seed: int, qscale: float = 3.0, pad_cols: int = 2):
    """Random paged cache whose rows own scattered blocks; every block no row owns holds 1e4 (so a
    stray read shows), block-table columns past each row's blocks hold an out-of-range id."""
    g = torch.Generator().manual_seed(seed)
    need = [-(-n // BS) for n in lens]
    nb = sum(need) + 3
    kc = torch.full((nb + 1, BS, kvh, d), 1e4)                       # [NB + 1, bs, KVH, D]
    vc = torch.full((nb + 1, BS, kvh, d), 1e4)                       # [NB + 1, bs, KVH, D]
    order = torch.randperm(nb, generator=g).tolist()
    width = max(need) + pad_cols
    table = torch.full((len(lens), width), 10**6, dtype=torch.int32)  # [B, W] padding never read
    keys, values = [], []
    for b, n in enumerate(lens):
        blocks, order = order[:need[b]], order[need[b]:]
        table[b, :need[b]] = torch.tensor(blocks, dtype=torch.int32)
        k = torch.randn(n, kvh, d, generator=g)                      # [n, KVH, D]
        v = torch.randn(n, kvh, d, generator=g)                      # [n, KVH, D]
        for p in range(n):
            kc[blocks[p // BS], p % BS] = k[p]
            vc[blocks[p // BS], p % BS] = v[p]
        keys.append(k)
        values.append(v)
    q = torch.randn(len(lens), h, d, generator=g) * qscale           # [B, H, D]
    return q, kc, vc, table, torch.tensor(lens, dtype=torch.int32), keys, values


def float64_acc(q: torch.Tensor, k: torch.Tensor, sink: int = 4) -> torch.Tensor:
    """(l, t, sink sum, position sum) in float64 for one row. q [H, D]; k [n, KVH, D] -> [H, 4]."""
    q, k = q.double(), k.double()
    h, d = q.shape
    kk = k.repeat_interleave(h // k.shape[1], dim=1)                 # [n, H, D]
    s = torch.einsum("hd,nhd->hn", q, kk) / math.sqrt(d)             # [H, n]
    shifted = s - s.amax(-1, keepdim=True)                           # [H, n]
    e = torch.exp(shifted)                                           # [H, n]
    j = torch.arange(k.shape[0], dtype=torch.float64)                # [n]
    return torch.stack([e.sum(-1), (e * shifted).sum(-1), e[:, :sink].sum(-1), (e * j).sum(-1)], -1)  # [H, 4]


@pytest.mark.parametrize("n", [1, 15, 16, 17, 33, 300, 511, 512, 513, 1024, 1100])  # > 512: split rows
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (8, 2), (9, 3), (9, 1), (14, 2)])  # G = H / KVH: 1, 4, 3, 9 (past the specialised 1 .. 8: the generic loops), 7
def test_op_matches_float64_and_the_reference(op, n, heads, kv_heads):
    d = 64
    q, kc, vc, table, lens, keys, values = paged([n], heads, kv_heads, d, seed=n * 7 + heads)
    out, acc = op(q, kc, vc, table, lens, 1 / math.sqrt(d), True, 4)  # [1, H, D], [1, H, 4]
    ref_out, ref_stats = reference_row(q[0], keys[0], values[0])
    assert (out[0].double() - ref_out).abs().max() < 1e-5
    assert_acc_close(acc[0], float64_acc(q[0], keys[0]))
    assert (finalize_stats(acc, lens)[0].double() - ref_stats).abs().max() < 1e-5
    t_out, t_acc = attend(q, keys[0][None], values[0][None], lens, 1 / math.sqrt(d), True, 4)
    assert (out - t_out).abs().max() < 1e-5
    assert_acc_close(acc, t_acc)


@pytest.mark.parametrize("d", [64, 8])  # 8: the portable loops (no 16-wide vectors)
def test_batch_of_lengths_telemetry_off_and_row_independence(op, d):
    """Different lengths in one call; output bit-identical with telemetry off; each row alone
    gives bit for bit what it gives inside the batch."""
    lens = [1, 15, 16, 17, 33, 130, 600, 1030]                        # the last two run in splits
    q, kc, vc, table, seq, keys, values = paged(lens, 9, 3, d, seed=d)
    scale = 1 / math.sqrt(d)
    out, acc = op(q, kc, vc, table, seq, scale, True, 4)
    off, none = op(q, kc, vc, table, seq, scale, False, 4)
    assert none.numel() == 0 and torch.equal(out, off)
    stats = finalize_stats(acc, seq)                                  # [B, H, 5]
    for b, n in enumerate(lens):
        ref_out, ref_stats = reference_row(q[b], keys[b], values[b])
        assert (out[b].double() - ref_out).abs().max() < 1e-5
        assert (stats[b].double() - ref_stats).abs().max() < 1e-5
        assert_acc_close(acc[b], float64_acc(q[b], keys[b]))
        o1, a1 = op(q[b:b + 1].contiguous(), kc, vc, table[b:b + 1], seq[b:b + 1], scale, True, 4)
        assert torch.equal(o1[0], out[b]) and torch.equal(a1[0], acc[b])
    reordered = list(reversed(range(len(lens))))
    o2, a2 = op(q[reordered].contiguous(), kc, vc, table[reordered], seq[reordered], scale, True, 4)
    assert torch.equal(o2, out[reordered]) and torch.equal(a2, acc[reordered])


def test_thread_count_and_work_split_change_nothing(op):
    """A long row alone on two threads (its KV heads split between them), the same row next to
    others, and one thread: bit for bit the same."""
    q, kc, vc, table, seq, _, _ = paged([1000, 40, 700], 9, 3, 64, seed=3)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        alone = op(q[:1].contiguous(), kc, vc, table[:1], seq[:1], 0.125, True, 4)
        batch = op(q, kc, vc, table, seq, 0.125, True, 4)
        torch.set_num_threads(1)
        serial = op(q, kc, vc, table, seq, 0.125, True, 4)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(alone[0][0], batch[0][0]) and torch.equal(alone[1][0], batch[1][0])
    assert torch.equal(batch[0], serial[0]) and torch.equal(batch[1], serial[1])


def test_sharp_attention_and_sink_tokens(op):
    """Large logits (near one-hot rows): statistics within 1e-5; sink_tokens other than 4
    honoured. Scores of magnitude ~300 carry ~3e-5 relative float32 error into each e_j (the
    torch reference misses 1e-5 relative on these sums too), hence 1e-4 on the sums and output."""
    q, kc, vc, table, lens, keys, values = paged([700], 4, 1, 64, seed=11, qscale=50.0)
    out, acc = op(q, kc, vc, table, lens, 0.125, True, 7)              # two splits: 512 + 188 keys
    assert_acc_close(acc[0], float64_acc(q[0], keys[0], sink=7), rel=1e-4)
    ref_out, ref_stats = reference_row(q[0], keys[0], values[0], sink=7)
    assert (out[0].double() - ref_out).abs().max() < 1e-4
    assert (finalize_stats(acc, lens)[0].double() - ref_stats).abs().max() < 1e-5


@pytest.mark.parametrize("sink", [0, 4, 520])  # 520: the sink spans the first split and part of the second
def test_split_rows_merge_every_accumulator(op, sink):
    """A 1,100-key row runs as splits of 512, 512 and 76 keys, merged in order: accumulators
    (positions counted from the row's start, the sink across splits) equal float64."""
    q, kc, vc, table, lens, keys, values = paged([1100], 9, 3, 64, seed=21)
    out, acc = op(q, kc, vc, table, lens, 0.125, True, sink)
    assert_acc_close(acc[0], float64_acc(q[0], keys[0], sink=sink))
    ref_out, _ = reference_row(q[0], keys[0], values[0], sink=max(sink, 1))
    assert (out[0].double() - ref_out).abs().max() < 1e-5


@pytest.mark.parametrize("d", [64, 8])  # 8: the portable loops
def test_a_bfloat16_cache_reads_exactly_its_values(op, d):
    """A bfloat16 cache gives bit for bit what a float32 cache holding the same (rounded) values
    gives: each element is widened exactly, the arithmetic is the float32 kernel's."""
    q, kc, vc, table, lens, _, _ = paged([1, 17, 40, 100], 9, 3, d, seed=4)
    kb, vb = kc.bfloat16(), vc.bfloat16()
    for stats in (True, False):
        want = op(q, kb.float(), vb.float(), table, lens, 1 / math.sqrt(d), stats, 4)
        got = op(q, kb, vb, table, lens, 1 / math.sqrt(d), stats, 4)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    with pytest.raises(RuntimeError, match="both float32 or both bfloat16"):
        op(q, kb, vc, table, lens, 0.125, False, 4)


def test_bad_inputs_are_refused(op):
    q, kc, vc, table, lens, _, _ = paged([20], 4, 2, 16, seed=1)
    with pytest.raises(RuntimeError, match="block_table"):
        op(q, kc, vc, table.long(), lens, 0.25, False, 4)
    with pytest.raises(RuntimeError, match="out of range"):
        op(q, kc, vc, table.clone().fill_(10**6), lens, 0.25, False, 4)
    with pytest.raises(RuntimeError, match="seq_lens"):
        op(q, kc, vc, table, torch.tensor([10**4], dtype=torch.int32), 0.25, False, 4)


@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("stats", [[0, 1, 2], [1, 2], [0], [2], None], ids=["all", "some", "decode", "prefill", "off"])
def test_mixed_step_matches_the_torch_backend(op, stats, cache_dtype):
    """Decode rows and a prefill chunk through the same forward: decode rows within 1e-5 of the
    reference, prefill rows within 1e-5 (csrc/paged_prefill.cpp; with a bfloat16 cache, bfloat16
    dot products where the CPU has them: q and the softmax weights rounded, 0.004 off here, its
    exact arithmetic checked in test_paged_prefill.py), telemetry rows in the asked order, and the
    output bit-identical with telemetry off."""
    def make(cache):
        backend = build_backend("cpu", cache, torch.device("cpu"), sink_tokens=4, max_positions=64)
        assert backend.name == "cpu"
        return backend

    tol = 2.0**-6 if cache_dtype == torch.bfloat16 and BF16_DOT else 1e-5
    assert_mixed_step_matches_torch(make, stats, cache_dtype=cache_dtype, prefill_tol=tol)


def test_auto_prefers_cpu_on_a_cpu_device(op):
    cache, *_ = mixed_step(None)
    assert build_backend("auto", cache, torch.device("cpu"), sink_tokens=4, max_positions=64).name == "cpu"
    assert not cpu_paged.CpuPagedBackend.supports(torch.device("meta"))
    half = KVCache(k=[t.half() for t in cache.k], v=[t.half() for t in cache.v])
    with pytest.raises(ValueError, match="float32 or bfloat16 KV cache on the CPU, not torch.float16"):
        cpu_paged.CpuPagedBackend(half, 4, 64)


def test_without_a_compiler_auto_warns_once_and_cpu_fails_clearly(monkeypatch, caplog):
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    unbuilt = functools.cache(cpu_extension.load_paged_decode.__wrapped__)
    monkeypatch.setattr(cpu_paged, "load_paged_decode", unbuilt)
    cache, *_ = mixed_step(None)
    with caplog.at_level(logging.WARNING, logger=cpu_extension.__name__):
        for _ in range(2):
            assert build_backend("auto", cache, torch.device("cpu"), sink_tokens=4, max_positions=64).name == "torch"
        with pytest.raises(ValueError, match=r"attention backend 'cpu' does not run on cpu: no C\+\+ compiler"):
            build_backend("cpu", cache, torch.device("cpu"), sink_tokens=4, max_positions=64)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "no C++ compiler ('/nonexistent/c++' not found" in warnings[0] and "--attention-backend cpu cannot run" in warnings[0]
    assert unbuilt().op is None and "no C++ compiler" in unbuilt().reason


def test_a_compile_error_is_a_reason_not_an_exception(monkeypatch, tmp_path, caplog):
    broken = tmp_path / "paged_decode.cpp"
    broken.write_text("#error headwise test: this source does not compile\n")
    monkeypatch.setattr(cpu_extension, "SOURCES", [broken])
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    with caplog.at_level(logging.WARNING, logger=cpu_extension.__name__):
        ext = cpu_extension.load_paged_decode.__wrapped__()
    assert ext.op is None and ext.reason.startswith("building paged_decode.cpp failed: RuntimeError")
    assert sum(r.levelno == logging.WARNING for r in caplog.records) == 1


def test_engine_generates_the_same_tokens_and_telemetry_as_torch(op, tiny_llama_dir):
    """Greedy tokens identical, per-request telemetry within 1e-5, over a continuous batch with
    chunked prefill (steps that mix decode rows and prefill chunks)."""
    prompts = ["The capital of France is", "Hello world! 1 2 3 4 5 6 7 8 9 10. A quick brown fox jumps over",
               "Attention heads look back", "A"]
    assert_engine_matches_torch(tiny_llama_dir, "cpu", prompts, max_tokens=40)
    # bfloat16 cache: the prefill rows' attention takes bfloat16 dot products (q and the softmax
    # weights rounded, csrc/paged_prefill.cpp) where the reference computes in float32, so the
    # K / V that later layers write move by bfloat16 steps: measured 2.3e-3 at most on entropy
    # over 40 tokens. A CPU without AVX-512 BF16 runs the float32 prefill kernel: only the float32
    # kernels' rounding differences then, which now and then push a key across a bfloat16
    # boundary when it is written (2.2e-5 at most)
    assert_engine_matches_torch(tiny_llama_dir, "cpu", prompts, max_tokens=40, kv_cache_dtype="bfloat16",
                                tol=1e-2 if BF16_DOT else 1e-4)


@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("src_dtype", [torch.float32, torch.bfloat16])
def test_write_kv_equals_the_caches_own_write(cache_dtype, src_dtype):
    """The backend's one-call write stores exactly what KVCache.write (cast, index_copy_) does,
    and refuses a slot outside the cache before writing anything."""
    write = cpu_extension.load_paged_decode().write
    shape = (5, 4, 3, 16)                                                  # [NB, bs, KVH, D]
    ours = KVCache(k=[torch.zeros(shape, dtype=cache_dtype)], v=[torch.zeros(shape, dtype=cache_dtype)])
    ref = KVCache(k=[torch.zeros(shape, dtype=cache_dtype)], v=[torch.zeros(shape, dtype=cache_dtype)])
    slots = torch.tensor([7, 0, 19, 12])                                   # [T]
    k, v = (torch.randn(4, 3, 16) * 100).to(src_dtype), torch.randn(4, 3, 16).to(src_dtype)  # [T, KVH, D]
    special = torch.tensor([math.nan, math.inf, -math.inf, -0.0, 1e-40, -3e-39, 1 + 2**-8, 1 + 3 * 2**-8,
                            -(1 + 2**-8), 3.3961e38, 2**-126, 65504.0, 1 + 2**-9 + 2**-20, 0.1, -7.7, 1e30])
    k[0, 0] = special.to(src_dtype)                                        # ties, subnormals, NaN, overflow
    write(ours.k[0], ours.v[0], slots, k, v)
    ref.write(0, slots, k, v)
    bits = torch.int32 if cache_dtype == torch.float32 else torch.int16
    nan = ref.k[0].isnan()                                                 # NaN stays NaN (payloads may differ)
    assert torch.equal(ours.k[0].isnan(), nan) and nan.sum() == 1
    assert torch.equal(ours.k[0].masked_fill(nan, 0).view(bits), ref.k[0].masked_fill(nan, 0).view(bits))
    assert torch.equal(ours.v[0], ref.v[0])
    before = ours.k[0].clone()
    with pytest.raises(RuntimeError, match="slot 20 out of range"):
        write(ours.k[0], ours.v[0], torch.tensor([3, 20]), k[:2], v[:2])
    assert torch.equal(ours.k[0].masked_fill(nan, 0), before.masked_fill(nan, 0))
