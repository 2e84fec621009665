"""The C++ prefill-chunk op (csrc/paged_prefill.cpp) against float64 causal attention: GQA
shapes, block and tile boundaries, cached prefixes, both cache dtypes, the portable path, rows
that do not depend on their chunk, and malformed arguments."""

from __future__ import annotations

import math
import shutil

import pytest
import torch

from server.engine.attention import cpu_extension

pytestmark = pytest.mark.skipif(shutil.which("c++") is None, reason="no C++ compiler to build the extension")


@pytest.fixture(scope="module")
def prefill():
    ext = cpu_extension.load_paged_decode()
    assert ext.prefill is not None, ext.reason  # a compiler is present: a build failure is a failure
    return ext.prefill


def sequence(keys: int, kvh: int, d: int, bs: int, seed: int, dtype: torch.dtype = torch.float32):
    """One sequence's keys and values [keys, KVH, D] in scattered blocks of a paged cache whose
    other blocks hold 1e4 (a stray read shows); the block table has spare columns of -1."""
    g = torch.Generator().manual_seed(seed)
    need = -(-keys // bs)
    nb = need + 5
    k = torch.randn(keys, kvh, d, generator=g).to(dtype)              # [keys, KVH, D]
    v = torch.randn(keys, kvh, d, generator=g).to(dtype)              # [keys, KVH, D]
    kc = torch.full((nb, bs, kvh, d), 1e4, dtype=dtype)               # [NB, bs, KVH, D]
    vc = torch.full((nb, bs, kvh, d), 1e4, dtype=dtype)               # [NB, bs, KVH, D]
    blocks = torch.randperm(nb, generator=g)[:need]                   # [need]
    for p in range(keys):
        kc[blocks[p // bs], p % bs] = k[p]
        vc[blocks[p // bs], p % bs] = v[p]
    table = torch.cat([blocks.to(torch.int32), torch.full((2,), -1, dtype=torch.int32)])  # [need + 2]
    return k, v, kc, vc, table


# A bfloat16 cache takes bfloat16 dot products (csrc: pair_tile) where the CPU has them (the
# extension is built with -march=native): q and the softmax weights rounded to bfloat16.
BF16_DOT = "avx512_bf16" in open("/proc/cpuinfo").read()


def float64_causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int, scale: float,
                   bf16_dot: bool = False) -> torch.Tensor:
    """Row i of q [n, H, D] at position start + i over keys 0 .. start + i of k, v [C, KVH, D].
    bf16_dot: q rounded to bfloat16 and the weights e_j = exp(s_j - max s) too, out = sum_j e_j
    v_j / sum_j e_j over the rounded e_j (what the kernel computes for a bfloat16 cache)."""
    n, h, _ = q.shape
    kvh = k.shape[1]
    kk = k.double().repeat_interleave(h // kvh, dim=1)                # [C, H, D]
    vv = v.double().repeat_interleave(h // kvh, dim=1)                # [C, H, D]
    qq = q.bfloat16().double() if bf16_dot else q.double()            # [n, H, D]
    s = torch.einsum("nhd,chd->hnc", qq, kk) * scale                  # [H, n, C]
    pos = torch.arange(k.shape[0])[None, :] <= (torch.arange(n)[:, None] + start)  # [n, C]
    s = s.masked_fill(~pos, -math.inf)                                # [H, n, C]
    e = (s - s.amax(dim=-1, keepdim=True)).exp()                      # [H, n, C]
    if bf16_dot:
        e = e.float().bfloat16().double()                             # [H, n, C]
    return torch.einsum("hnc,chd->nhd", e / e.sum(dim=-1, keepdim=True), vv)  # [n, H, D]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (8, 2), (9, 3), (18, 2)])  # G 1, 4, 3, 9 (two head groups)
@pytest.mark.parametrize("n,start", [(1, 0), (15, 0), (16, 0), (17, 3), (40, 0), (33, 70), (255, 768)])
def test_matches_float64(prefill, dtype, heads, kv_heads, n, start):
    d, bs = 64, 16
    k, v, kc, vc, table = sequence(start + n, kv_heads, d, bs, seed=n * 31 + start + heads, dtype=dtype)
    q = torch.randn(n, heads, d, generator=torch.Generator().manual_seed(n)) * 3   # [n, H, D]
    out = prefill(q, kc, vc, table, start, 1 / math.sqrt(d))                       # [n, H, D]
    bf16_dot = dtype == torch.bfloat16 and BF16_DOT
    ref = float64_causal(q, k, v, start, 1 / math.sqrt(d), bf16_dot)
    assert out.dtype == torch.float32 and out.shape == (n, heads, d)
    err = (out.double() - ref).abs()                                                # [n, H, D]
    tol = tolerance(start + n, v)
    if not bf16_dot:
        assert err.max() < tol
        return
    # the kernel's e_j (float32, ~2 ulp) can round to the other bfloat16 neighbour of the
    # reference's near a midpoint: one such e_j moves a row by up to 2^-8 e_j / l |v_j - out|
    assert err.max() < tol + 2.0**-7 * v.abs().max().item()
    assert (err > tol).double().mean() < 0.01 and err.mean() < 1e-5


def tolerance(keys: int, v: torch.Tensor) -> float:
    """A row's output is a float32 sum over up to `keys` terms e_j v_j, one after the other (the
    scores' sums over d are short): at most keys * 2^-24 * max |v| off float64, twice for the
    error the scores carry into e; never below 1e-5."""
    return max(1e-5, 2 * keys * 2.0**-24 * v.abs().max().item())


@pytest.mark.parametrize("d,bs", [(24, 4), (80, 16), (64, 1)])  # D % 16 != 0: the portable loop; 80: a 16-wide tail
def test_other_head_dims_and_block_sizes(prefill, d, bs):
    n, start, heads, kv_heads = 21, 11, 6, 2
    k, v, kc, vc, table = sequence(start + n, kv_heads, d, bs, seed=d + bs)
    q = torch.randn(n, heads, d, generator=torch.Generator().manual_seed(d))
    out = prefill(q, kc, vc, table, start, 0.3)
    assert (out.double() - float64_causal(q, k, v, start, 0.3)).abs().max() < tolerance(start + n, v)
    if d % 16 == 0 and BF16_DOT:  # the bfloat16 kernel, these shapes too
        k, v, kc, vc, table = sequence(start + n, kv_heads, d, bs, seed=d + bs, dtype=torch.bfloat16)
        out = prefill(q, kc, vc, table, start, 0.3)
        err = (out.double() - float64_causal(q, k, v, start, 0.3, bf16_dot=True)).abs()
        assert err.max() < tolerance(start + n, v) + 2.0**-7 * v.abs().max().item() and err.mean() < 1e-5


def test_a_row_does_not_depend_on_its_chunk(prefill):
    """The rows of a 50-row chunk equal, bit for bit, the same rows computed as chunks of 7, 16 and
    27 rows (other tiles, other splits among the threads)."""
    n, d = 50, 64
    k, v, kc, vc, table = sequence(n, 3, d, 16, seed=3, dtype=torch.bfloat16)
    q = torch.randn(n, 9, d, generator=torch.Generator().manual_seed(4))
    whole = prefill(q, kc, vc, table, 0, 0.125)
    parts, start = [], 0
    for size in (7, 16, 27):
        parts.append(prefill(q[start:start + size].contiguous(), kc, vc, table, start, 0.125))
        start += size
    assert torch.equal(torch.cat(parts), whole)


def test_threads_do_not_change_results(prefill):
    n, d = 64, 64
    _, _, kc, vc, table = sequence(200 + n, 3, d, 16, seed=5, dtype=torch.bfloat16)
    q = torch.randn(n, 9, d, generator=torch.Generator().manual_seed(6))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = prefill(q, kc, vc, table, 200, 0.125)
        torch.set_num_threads(2)
        two = prefill(q, kc, vc, table, 200, 0.125)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)


def test_malformed_arguments_are_clear_errors(prefill):
    _, _, kc, vc, table = sequence(20, 2, 16, 4, seed=7)
    q = torch.randn(4, 4, 16)
    with pytest.raises(RuntimeError, match="q must be a contiguous float32"):
        prefill(q.double(), kc, vc, table, 16, 0.25)
    with pytest.raises(RuntimeError, match="head_dim of q and the cache differ"):
        prefill(torch.randn(4, 4, 8), kc, vc, table, 16, 0.25)
    with pytest.raises(RuntimeError, match="H must be a multiple of KVH"):
        prefill(torch.randn(4, 3, 16), kc, vc, table, 16, 0.25)
    with pytest.raises(RuntimeError, match="need more blocks than block_table holds"):
        prefill(q, kc, vc, table, 100, 0.25)
    with pytest.raises(RuntimeError, match=r"block_table\[5\] = -1 out of range"):
        prefill(q, kc, vc, table, 20, 0.25)          # 24 keys: the 6th block is a spare column
    with pytest.raises(RuntimeError, match="start must be >= 0"):
        prefill(q, kc, vc, table, -1, 0.25)
    with pytest.raises(RuntimeError, match="both float32 or both bfloat16"):
        prefill(q, kc, vc.bfloat16(), table, 16, 0.25)
    with pytest.raises(RuntimeError, match="block_table must be a contiguous int32"):
        prefill(q, kc, vc, table.long(), 16, 0.25)
    assert prefill(torch.empty(0, 4, 16), kc, vc, table, 20, 0.25).shape == (0, 4, 16)
