"""The Triton varlen paged prefill kernel (server/engine/attention/triton_prefill.py) against causal
softmax attention in float64 over the gathered keys: chunks of 1, 15, 16, 17, 33 and 70 rows, from
position 0 and after a cached prefix, block sizes 1 and 16 (chunks and prefixes across block
boundaries), several chunks in one call over shuffled, scattered blocks with padded tables, GQA
4/4, 8/2, 9/3, head_dim 64, 24 and 80, fp32 / bf16 / fp16; a chunk gives the same bits alone as in
a step, and split into two chunks (its tiles starting elsewhere); strided q / out and out = q;
the launcher's ValueErrors.

Without CUDA they run in Triton's CPU interpreter: tests/conftest.py chose it for triton_kernels
before any test module, and the kern fixture imports triton_prefill with TRITON_INTERPRET=1 set
(Triton reads it when a kernel is decorated, so importing at this module's top, at collection,
would build a GPU kernel). With CUDA they run the compiled kernel on the GPU. Tiles here are
16 x 16 (the interpreter is slow) so a few dozen rows and keys cross tile boundaries; one test
runs the production tiles."""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed (scripts/setup.sh installs it with the dev extra)")

# (query rows, cached prefix): 1, 15, 16, 17, 33, 70 rows; from 0, after a prefix, prefixes and ends on
# block boundaries of 16 (16 + 16 = 32, 33 + 31 = 64) and off them; a first position of 14 (two
# short of a 16-key tile: the last key tile seen whole by every row of a query tile)
CHUNKS = [(17, 0), (1, 40), (70, 3), (16, 16), (15, 14), (33, 31)]


@pytest.fixture(scope="module")
def kern(triton_dev):
    """The prefill kernel module, built by the interpreter where triton_kernels was (no CUDA)."""
    from server.engine.attention import triton_kernels, triton_prefill

    if triton_prefill.interpreted() != triton_kernels.interpreted():
        pytest.skip("triton_prefill was imported before TRITON_INTERPRET was set; run this module alone")
    return triton_prefill


@pytest.fixture(scope="module")
def dev(triton_dev: torch.device) -> torch.device:
    return triton_dev


@pytest.fixture(scope="module")
def small(kern):
    return kern.PrefillTiles(block_m=16, block_n=16)


def step(chunks: list[tuple[int, int]], h: int, kvh: int, d: int, bs: int, seed: int, lead: int = 2,
         tail: int = 1, pad_cols: int = 2, dtype: torch.dtype = torch.float32):
    """A step's chunks over a random paged cache: each chunk owns shuffled, scattered blocks; blocks
    no chunk owns and slots past each chunk's keys hold 1e4 (a stray read shows); table columns past
    a chunk's blocks hold an out-of-range id. lead / tail rows of q belong to no chunk (as decode
    rows would). Returns q [T, H, D], k_cache, v_cache [NB + 1, bs, KVH, D] (dtype), table [C, W],
    q_start [C + 1], seq_lens [C] int32, and per chunk its keys and values [L, KVH, D] (dtype)."""
    g = torch.Generator().manual_seed(seed)
    lens = [n + p for n, p in chunks]
    need = [-(-n // bs) for n in lens]
    nb = sum(need) + 3
    kc = torch.full((nb + 1, bs, kvh, d), 1e4)                        # [NB + 1, bs, KVH, D]
    vc = torch.full((nb + 1, bs, kvh, d), 1e4)                        # [NB + 1, bs, KVH, D]
    order = torch.randperm(nb, generator=g).tolist()
    table = torch.full((len(chunks), max(need) + pad_cols), 10**6, dtype=torch.int32)  # [C, W]
    keys, values = [], []
    for c, n in enumerate(lens):
        blocks, order = order[:need[c]], order[need[c]:]
        table[c, :need[c]] = torch.tensor(blocks, dtype=torch.int32)
        k = torch.randn(n, kvh, d, generator=g).to(dtype)           # [L, KVH, D]
        v = torch.randn(n, kvh, d, generator=g).to(dtype)           # [L, KVH, D]
        idx = torch.tensor(blocks)[torch.arange(n) // bs]            # [L] block of each key
        kc[idx, torch.arange(n) % bs] = k.float()
        vc[idx, torch.arange(n) % bs] = v.float()
        keys.append(k)
        values.append(v)
    starts = [lead]
    for n, _ in chunks:
        starts.append(starts[-1] + n)
    q = (torch.randn(starts[-1] + tail, h, d, generator=g) * 2.0).to(dtype)  # [T, H, D]
    return (q, kc.to(dtype), vc.to(dtype), table, torch.tensor(starts, dtype=torch.int32),
            torch.tensor(lens, dtype=torch.int32), keys, values)


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal softmax attention in float64 of a chunk's n rows (the last n positions) over its L keys.
    q [n, H, D]; k, v [L, KVH, D] -> [n, H, D] float64."""
    q, k, v = q.double(), k.double(), v.double()
    n, h, d = q.shape
    L, kvh, _ = k.shape
    kk = k.repeat_interleave(h // kvh, dim=1)                        # [L, H, D]
    vv = v.repeat_interleave(h // kvh, dim=1)                        # [L, H, D]
    s = torch.einsum("nhd,lhd->hnl", q, kk) / math.sqrt(d)           # [H, n, L]
    pos = torch.arange(n)[:, None] + (L - n)                         # [n, 1] query positions
    s = s.masked_fill(torch.arange(L)[None, :] > pos, float("-inf"))  # [H, n, L]
    return torch.einsum("hnl,lhd->nhd", torch.softmax(s, dim=-1), vv)  # [n, H, D]


def run(kern, dev, q, kc, vc, table, q_start, lens, tiles, out=None, **kw) -> torch.Tensor:
    """paged_prefill on dev into out (default: NaN, q's dtype); returns out on the CPU."""
    q, kc, vc, table, q_start, lens = (t.to(dev) for t in (q, kc, vc, table, q_start, lens))
    out = torch.full_like(q, float("nan")) if out is None else out.to(dev)  # [T, H, D]
    kern.paged_prefill(q, kc, vc, table, q_start, lens, out, 1 / math.sqrt(q.shape[-1]), tiles, **kw)
    return out.cpu()


def max_error(out, q, q_start, keys, values) -> float:
    """Max abs difference of every chunk's rows from float64 (0 without rows)."""
    qs = q_start.tolist()
    return max([(out[qs[c]:qs[c + 1]].double() - reference(q[qs[c]:qs[c + 1]], keys[c], values[c])).abs().max().item()
                for c in range(len(keys)) if qs[c + 1] > qs[c]], default=0.0)


@pytest.mark.parametrize("heads,kv_heads,d,bs", [(4, 4, 64, 16), (8, 2, 24, 1), (9, 3, 80, 16)])
def test_fp32_matches_float64(kern, dev, small, heads, kv_heads, d, bs):
    """Every chunk of CHUNKS in one call (shuffled blocks, padded table, rows outside every chunk):
    within 1e-5 of float64; rows of no chunk untouched; the host-side content check passes."""
    q, kc, vc, table, q_start, lens, keys, values = step(CHUNKS, heads, kv_heads, d, bs, seed=heads + d)
    out = run(kern, dev, q, kc, vc, table, q_start, lens, small, q_start_cpu=q_start, seq_lens_cpu=lens)
    assert max_error(out, q, q_start, keys, values) <= 1e-5
    assert out[:q_start[0]].isnan().all() and out[q_start[-1]:].isnan().all()


@pytest.mark.parametrize("dtype,q_dtype,tol", [
    (torch.bfloat16, torch.bfloat16, 1e-2),   # unit roundoff u = 2^-8 = 3.9e-3
    (torch.float16, torch.float16, 2e-3),     # u = 2^-11 = 4.9e-4
    (torch.bfloat16, torch.float32, 1e-2),    # fp32 activations over a bf16 cache (q rounded for the dots)
])
def test_low_precision_within_the_rounding_bound(kern, dev, small, dtype, q_dtype, tol):
    """bf16 / fp16 caches against float64 over the same rounded inputs (q rounded to the cache's
    dtype, as the kernel's dots see it). What remains is the probabilities rounded to the cache's
    dtype before the second dot (relative error <= u each, so <= u max|v| on the output, l being
    summed unrounded in fp32) and the output rounded to its dtype (<= u |out| <= u max|v|): at most
    2u max|v|, under tol * max|v| (fp32 scores and sums add ~1e-6)."""
    q, kc, vc, table, q_start, lens, keys, values = step(CHUNKS[:4], 9, 3, 64, 16, seed=5, dtype=dtype)
    if q_dtype == torch.float32:                                     # values bf16 cannot hold: the kernel rounds them
        q = q.float() + 1e-3 * torch.randn(q.shape, generator=torch.Generator().manual_seed(6))  # [T, H, D]
    out = run(kern, dev, q, kc, vc, table, q_start, lens, small)
    vmax = max(v.abs().max().item() for v in values)
    assert out.dtype == q_dtype
    assert max_error(out, q.to(dtype), q_start, keys, values) <= tol * vmax


def test_a_chunk_alone_gives_the_bits_it_gives_in_a_step(kern, dev, small):
    """Each chunk alone (its own q rows, table row, length) equals bit for bit its rows in the step,
    and so does the step with its chunks in reverse order; the 70-row chunk split into chunks of 23
    and 47 rows over the same table row (the 47 rows' tiles now start elsewhere) equals it too."""
    chunks = CHUNKS + [(0, 5)]                                       # and an empty chunk
    q, kc, vc, table, q_start, lens, _, _ = step(chunks, 9, 3, 24, 16, seed=3)
    out = run(kern, dev, q, kc, vc, table, q_start, lens, small)
    qs = q_start.tolist()
    for c in range(len(chunks)):
        a, b = qs[c], qs[c + 1]
        alone = run(kern, dev, q[a:b], kc, vc, table[c:c + 1], torch.tensor([0, b - a], dtype=torch.int32),
                    lens[c:c + 1], small)
        assert torch.equal(alone, out[a:b]), chunks[c]
    rev = list(reversed(range(len(chunks))))
    rows = torch.cat([torch.arange(qs[c], qs[c + 1]) for c in rev])  # [R] the chunks' rows, reversed
    starts = torch.tensor([0] + [qs[c + 1] - qs[c] for c in rev], dtype=torch.int32).cumsum(0).int()  # [C + 1]
    back = run(kern, dev, q[rows], kc, vc, table[rev], starts, lens[rev], small)
    assert torch.equal(back, out[rows])
    a, b = qs[2], qs[3]                                              # the 70-row chunk, 3 cached keys
    split = run(kern, dev, q[a:b], kc, vc, table[[2, 2]], torch.tensor([0, 23, 70], dtype=torch.int32),
                torch.tensor([3 + 23, 73], dtype=torch.int32), small)
    assert torch.equal(split, out[a:b])


def test_strided_q_out_and_in_place(kern, dev, small):
    """q a view of a fused qkv buffer and out a view of a wider buffer (row strides != H * D) give
    the same bits as contiguous ones; out = q (in place) too; rows outside every chunk keep their values."""
    heads, kvh, d = 8, 2, 24
    q, kc, vc, table, q_start, lens, _, _ = step(CHUNKS[:3], heads, kvh, d, 16, seed=9)
    want = run(kern, dev, q, kc, vc, table, q_start, lens, small)
    t = q.shape[0]
    qkv = torch.zeros(t, (heads + 2 * kvh) * d)                      # [T, (H + 2 KVH) D]
    qkv[:, :heads * d] = q.reshape(t, -1)
    wide = torch.full((t, heads, 2 * d), float("nan"))              # [T, H, 2D]
    q_view = qkv.to(dev)[:, :heads * d].view(t, heads, d)            # [T, H, D] row stride (H + 2 KVH) D
    got = run(kern, dev, q_view, kc, vc, table, q_start, lens, small, out=wide.to(dev)[:, :, :d])
    torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)  # NaN: rows of no chunk
    q_dev = q.to(dev)                                                # [T, H, D]
    run(kern, dev, q_dev, kc, vc, table, q_start, lens, small, out=q_dev)  # hands back a copy; q_dev holds it
    inside = slice(int(q_start[0]), int(q_start[-1]))
    assert torch.equal(q_dev.cpu()[inside], want[inside])
    assert torch.equal(q_dev.cpu()[:inside.start], q[:inside.start])


def test_production_tiles(kern, dev):
    """The default PrefillTiles (64 x 64: a tile packs 64 / G rows' heads) on a small step, fp32."""
    q, kc, vc, table, q_start, lens, keys, values = step([(70, 3), (5, 60), (1, 0)], 9, 3, 24, 16, seed=1)
    out = run(kern, dev, q, kc, vc, table, q_start, lens, kern.PrefillTiles())
    assert max_error(out, q, q_start, keys, values) <= 1e-5


def test_bad_inputs(kern, dev, small):
    """Clear ValueErrors for shapes, dtypes, layouts and (given host copies) contents; no chunks: nothing to do."""
    q, kc, vc, table, q_start, lens, _, _ = step([(5, 3), (4, 0)], 4, 2, 24, 16, seed=2)
    args = dict(q=q, k_cache=kc, v_cache=vc, table=table, q_start=q_start, seq_lens=lens, out=torch.empty_like(q))

    def call(**change):
        a = {**args, **change}
        kern.paged_prefill(a["q"], a["k_cache"], a["v_cache"], a["table"], a["q_start"], a["seq_lens"], a["out"],
                           0.2, small, q_start_cpu=a.get("q_start_cpu"), seq_lens_cpu=a.get("seq_lens_cpu"))

    bad = [
        (dict(q=q[:, :3]), "of one shape"),
        (dict(q=q[:, :3], out=torch.empty(q.shape[0], 3, 24)), "KV heads do not divide"),
        (dict(v_cache=vc[..., :16]), "k_cache and v_cache"),
        (dict(q=q[..., :16].contiguous(), out=torch.empty(q.shape[0], 4, 16)), "head_dim differs"),
        (dict(k_cache=kc.double(), v_cache=vc.double()), "float32, bfloat16 or float16"),
        (dict(v_cache=vc.half()), "share a dtype"),
        (dict(out=torch.empty_like(q, dtype=torch.float64)), "q and out must be float32"),
        (dict(k_cache=kc.transpose(2, 3).contiguous().transpose(2, 3)), "contiguous"),
        (dict(q=torch.randn(q.shape[0], 4, 48)[..., ::2]), "contiguous last dim"),
        (dict(table=table.long()), "int32"),
        (dict(seq_lens=lens[:1]), "seq_lens must be"),
        (dict(q_start=q_start.long()), "q_start must be"),
        (dict(seq_lens_cpu=lens, q_start_cpu=torch.tensor([2, 7, 6], dtype=torch.int32)), "must not decrease"),
        (dict(seq_lens_cpu=lens, q_start_cpu=torch.tensor([2, 7, 99], dtype=torch.int32)), "query rows"),
        (dict(seq_lens_cpu=torch.tensor([4, 4], dtype=torch.int32), q_start_cpu=q_start), "fewer than its 5"),
        (dict(seq_lens_cpu=torch.tensor([8, 4 + 16 * 3], dtype=torch.int32), q_start_cpu=q_start), "block table has"),
    ]
    for change, message in bad:
        with pytest.raises(ValueError, match=message):
            call(**change)
    with pytest.raises(ValueError, match="scale"):
        kern.paged_prefill(q, kc, vc, table, q_start, lens, torch.empty_like(q), float("nan"), small)
    with pytest.raises(ValueError, match="power of 2"):
        kern.PrefillTiles(block_m=8)
    out = torch.full_like(q, 7.0)                                    # [T, H, D]
    kern.paged_prefill(q, kc, vc, table[:0], q_start[:1], lens[:0], out, 0.2, small)  # no chunks
    assert (out == 7.0).all()
