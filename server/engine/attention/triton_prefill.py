"""Triton kernel: varlen paged prefill attention (causal, GQA), no telemetry.

A step holds C prefill chunks. Chunk c owns the query rows q_start[c] .. q_start[c + 1] - 1 of the
flat q [T, H, D] (n_c rows), at positions seq_len_c - n_c .. seq_len_c - 1 (a chunk may follow a
cached prefix); the row at position i attends over keys 0 .. i of its sequence, read straight from
one layer's paged cache through the chunk's block-table row (key j: block table[c, j // BS],
offset j % BS; no gathered copy). The chunk's own K/V are in the cache already.

Programs. A program takes one (tile, KV head): BLOCK_M entries of the chunk's (row, query head)
pairs of that KV head, packed row-major (entry e = r * G + g: row r, query head kvh * G + g), so
the G query heads of a KV head share every K/V tile (GQA 4/4, 8/2, 9/3 alike; a chunk has
cdiv(n_c * G, BLOCK_M) tiles). It walks the key tiles of BLOCK_N with an online softmax
(FlashAttention-2): first the tiles every entry sees whole (no mask), then the tiles up to its
last row's position with the causal mask applied by a where (masked scores -inf, probabilities
0); tiles wholly above the diagonal are never visited. The running max starts at the finite
MASK_M, so exp(m - m') is 0 on the first tile, never NaN. Scores are kept in the log2 domain
(scale * log2 e folded into one multiply, exp2).

Mapping programs to (chunk, tile): a grid with early exit, but not (chunks, max tiles) and no
host-built tile list: vLLM's bound (its Triton unified attention). Chunk c's tiles are numbered
from base(c) = (q_start[c] - q_start[0]) * G // BLOCK_M + c, which never decreases and leaves every
chunk at least its cdiv(n_c * G, BLOCK_M) numbers, so cdiv(T * G, BLOCK_M) + C programs per KV
head cover any step; each finds its chunk by a binary search over q_start (log2 C scalar loads)
and exits when its number is past its chunk's tiles.
Why: the launch needs no host values at all (no device-to-host sync, no per-step host-to-device
copy, no per-layer rebuild) and its grid depends only on T and C, so a CUDA graph over fixed
buffers replays it; a (chunks, max tiles) grid would need the longest chunk on the host and
launch C * max tiles programs (mostly empty with one long chunk among many short ones), a tile
list a host build and a copy per step. At most C programs per KV head find nothing and exit.
Programs run last tile first, so each chunk's longest tiles (most keys) start earliest.

Determinism. A row's result depends only on its own chunk: the key tiles always start at key 0
in steps of BLOCK_N, both stages run the same arithmetic (key_tile, the mask compiled in or out),
and a tile's keys a row does not see add exactly nothing (probability 0, max unchanged, rescale
by exactly 1), so neither the other chunks nor where the row's tile starts within its chunk
change a bit of it (checked under the interpreter).

fp32, bf16 and fp16 caches; q and out any of them (q is cast to the cache's dtype for the dots,
as the decode kernel does). Scores, softmax and accumulator in fp32; with fp32 inputs the dots
run in IEEE fp32 (never TF32); with bf16 / fp16 caches the dot operands (q, k, v and the
probabilities) are rounded to the cache's dtype and the dots accumulate in fp32. Triton's
interpreter (TRITON_INTERPRET=1, triton 3.9) multiplies the raw bits of bf16 dot operands, so
there the rounded bf16 operands are widened to fp32 before the dots (UPCAST: the same operand
values as on a GPU, only the accumulation order differs). Any head_dim: BLOCK_D is the next power
of 2, at least 16 (tl.dot wants every tile dim >= 16), with masks.

References: FlashAttention-2 (online softmax, causal tile skipping), the Triton fused-attention
tutorial (exp2 with a folded scale, masked diagonal stage), vLLM's Triton unified attention
(paged varlen prefill, GQA packing into M, q-block bound with a binary search over
query_start_loc), triton_kernels.py (block-table addressing, UPCAST, PRECISION).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

MASK_M = tl.constexpr(-1.0e30)       # the running max before any key: finite, so exp(m - m') is 0, never NaN
LOG2E = 1.4426950408889634           # scores go to the log2 domain: exp(x) = exp2(x * log2 e)
FLOATS = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def prefill_kernel(
    Q, K, V, TABLE, QSTART, LENS, OUT,
    qk_scale, num_chunks,
    stride_qt, stride_qh, stride_kb, stride_ks, stride_kh, stride_tb, stride_ot, stride_oh,
    G: tl.constexpr, D: tl.constexpr, BS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """Grid (cdiv(T * G, BLOCK_M) + C, KV heads). Q [T, H, D], OUT [T, H, D] (last dims contiguous);
    K, V [blocks, BS, KVH, D]; TABLE [C, W] int32; QSTART [C + 1], LENS [C] int32. qk_scale: the
    softmax scale times log2 e."""
    t = tl.num_programs(0) - 1 - tl.program_id(0)                                # last tile first
    kvh = tl.program_id(1)
    q0 = tl.load(QSTART)
    lo = tl.zeros([], tl.int32)                                                  # [] invariant: base(lo) <= t
    hi = lo + num_chunks                                                         # [] ... and base(hi) > t (or hi = C)
    while lo + 1 < hi:
        mid = (lo + hi) // 2
        ok = (tl.load(QSTART + mid) - q0) * G // BLOCK_M + mid <= t
        lo = tl.where(ok, mid, lo)
        hi = tl.where(ok, hi, mid)
    c = lo
    row0 = tl.load(QSTART + c)
    n = tl.load(QSTART + c + 1) - row0                                           # [] the chunk's rows
    tile = t - ((row0 - q0) * G // BLOCK_M + c)
    if tile * BLOCK_M >= n * G:                                                  # past the chunk's tiles
        return
    seq_len = tl.load(LENS + c)
    first = seq_len - n                                                          # [] position of row 0

    offs_e = tile * BLOCK_M + tl.arange(0, BLOCK_M)                              # [BM] packed (row, head) entries
    offs_d = tl.arange(0, BLOCK_D)                                               # [BD]
    e_mask = offs_e < n * G                                                      # [BM]
    d_mask = offs_d < D                                                          # [BD]
    rows = offs_e // G                                                           # [BM] row in the chunk
    heads = kvh * G + offs_e % G                                                 # [BM] query heads
    pos = first + rows                                                           # [BM] query positions
    grow = (row0 + rows).to(tl.int64)                                            # [BM] rows of q / out
    q = tl.load(Q + grow[:, None] * stride_qt + heads[:, None] * stride_qh + offs_d[None, :],
                mask=e_mask[:, None] & d_mask[None, :], other=0.0)               # [BM, BD]
    q = operand(q, K, UPCAST)                                                    # [BM, BD] cache dtype (fp32: UPCAST)

    pos_lo = first + (tile * BLOCK_M) // G                                       # [] the tile's first position
    pos_hi = first + (tl.minimum(tile * BLOCK_M + BLOCK_M, n * G) - 1) // G + 1  # [] its last + 1 (<= seq_len)
    full = (pos_lo + 1) // BLOCK_N * BLOCK_N                                     # [] keys < full: every entry sees them
    m_i = tl.full([BLOCK_M], MASK_M, tl.float32)                                 # [BM]
    l_i = tl.zeros([BLOCK_M], tl.float32)                                        # [BM]
    o_i = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)                               # [BM, BD]
    for j0 in range(0, full, BLOCK_N):
        m_i, l_i, o_i = key_tile(q, K, V, TABLE, m_i, l_i, o_i, j0, pos, pos_hi, c, kvh, qk_scale,
                                 stride_kb, stride_ks, stride_kh, stride_tb, offs_d, d_mask,
                                 BS, BLOCK_N, PRECISION, UPCAST, False)
    for j0 in range(full, pos_hi, BLOCK_N):
        m_i, l_i, o_i = key_tile(q, K, V, TABLE, m_i, l_i, o_i, j0, pos, pos_hi, c, kvh, qk_scale,
                                 stride_kb, stride_ks, stride_kh, stride_tb, offs_d, d_mask,
                                 BS, BLOCK_N, PRECISION, UPCAST, True)
    out = o_i / l_i[:, None]                                                     # [BM, BD] l > 0 on real entries
    tl.store(OUT + grow[:, None] * stride_ot + heads[:, None] * stride_oh + offs_d[None, :],
             out.to(OUT.dtype.element_ty), mask=e_mask[:, None] & d_mask[None, :])


@triton.jit
def key_tile(q, K, V, TABLE, m_i, l_i, o_i, j0, pos, hi, c, kvh, qk_scale,
             stride_kb, stride_ks, stride_kh, stride_tb, offs_d, d_mask,
             BS: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
             CAUSAL: tl.constexpr):
    """One online-softmax step over keys j0 .. j0 + BLOCK_N - 1 (those < hi) through the chunk's
    block table; CAUSAL: mask key j > pos per entry (else every entry sees every key of the tile).
    q [BM, BD]; pos [BM]; m_i, l_i [BM], o_i [BM, BD] fp32 (scores in the log2 domain)."""
    offs_n = j0 + tl.arange(0, BLOCK_N)                                          # [BN] key positions
    if CAUSAL:
        valid = offs_n < hi                                                      # [BN]
        block = tl.load(TABLE + c * stride_tb + offs_n // BS, mask=valid, other=0)  # [BN] int32
        kv_mask = valid[:, None] & d_mask[None, :]                               # [BN, BD]
    else:
        block = tl.load(TABLE + c * stride_tb + offs_n // BS)                    # [BN] int32
        kv_mask = d_mask[None, :]                                                # [1, BD] d only
    slot = block.to(tl.int64) * stride_kb + (offs_n % BS) * stride_ks + kvh * stride_kh  # [BN]
    k = operand(tl.load(K + slot[:, None] + offs_d[None, :], mask=kv_mask, other=0.0), K, UPCAST)  # [BN, BD]
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale            # [BM, BN] fp32, log2 domain
    if CAUSAL:
        s = tl.where(offs_n[None, :] <= pos[:, None], s, float("-inf"))          # [BM, BN] -inf above the diagonal
    m_new = tl.maximum(m_i, tl.max(s, axis=1))                                   # [BM] finite
    alpha = tl.exp2(m_i - m_new)                                                 # [BM] 0 on the first tile
    p = tl.exp2(s - m_new[:, None])                                              # [BM, BN] exactly 0 where masked
    v = operand(tl.load(V + slot[:, None] + offs_d[None, :], mask=kv_mask, other=0.0), K, UPCAST)  # [BN, BD]
    o_i = o_i * alpha[:, None] + tl.dot(operand(p, K, UPCAST), v, input_precision=PRECISION)  # [BM, BD]
    l_i = l_i * alpha + tl.sum(p, axis=1)                                        # [BM]
    return m_new, l_i, o_i


@triton.jit
def operand(x, K, UPCAST: tl.constexpr):
    """x as a dot operand: rounded to the cache's dtype, then (UPCAST) widened to fp32 exactly, so
    an upcast dot sees the same operand values as a bf16 / fp16 one and differs only in how it
    accumulates."""
    x = x.to(K.dtype.element_ty)
    if UPCAST:
        x = x.to(tl.float32)
    return x


@dataclass(frozen=True)
class PrefillTiles:
    """Launch shape of the prefill kernel (a row's result depends on block_n, never on the step)."""

    block_m: int = 64       # (row, query head) entries per program (>= 16: tl.dot's minimum)
    block_n: int = 64       # keys per tile (>= 16)
    num_warps: int = 4

    def __post_init__(self) -> None:
        for name in ("block_m", "block_n"):
            v = getattr(self, name)
            if v < 16 or v & (v - 1):
                raise ValueError(f"{name} must be a power of 2 >= 16, got {self}")
        if self.num_warps < 1 or self.num_warps & (self.num_warps - 1):
            raise ValueError(f"num_warps must be a power of 2, got {self}")


def interpreted() -> bool:
    """Whether this module's kernel was built by Triton's CPU interpreter (TRITON_INTERPRET=1 when
    the module was first imported)."""
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(prefill_kernel, InterpretedFunction)


def num_programs(num_tokens: int, num_chunks: int, group: int, tiles: PrefillTiles) -> int:
    """Programs per KV head: a bound on the step's tiles that needs no host copy of q_start."""
    return -(-num_tokens * group // tiles.block_m) + num_chunks


def check_chunks(q_start: list[int], seq_lens: list[int], num_tokens: int, table_width: int,
                 block_size: int) -> None:
    """ValueError unless q_start (C + 1 host ints) and seq_lens (C) describe chunks of rows within
    0 .. num_tokens, in order, each seeing at least its own rows and at most table_width blocks."""
    if q_start and not 0 <= q_start[0] <= num_tokens:
        raise ValueError(f"q_start[0] = {q_start[0]} is outside the {num_tokens} query rows")
    for c, n_keys in enumerate(seq_lens):
        rows = q_start[c + 1] - q_start[c]
        if rows < 0 or q_start[c + 1] > num_tokens:
            raise ValueError(f"chunk {c}: q_start {q_start[c]} .. {q_start[c + 1]} must not decrease and "
                             f"stay within the {num_tokens} query rows")
        if n_keys < rows:
            raise ValueError(f"chunk {c}: seq_lens = {n_keys} is fewer than its {rows} query rows "
                             f"(the chunk's own keys are in the cache)")
        if -(-n_keys // block_size) > table_width:
            raise ValueError(f"chunk {c}: {n_keys} keys need {-(-n_keys // block_size)} blocks of {block_size}, "
                             f"the block table has {table_width} columns")


def paged_prefill(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, table: torch.Tensor,
                  q_start: torch.Tensor, seq_lens: torch.Tensor, out: torch.Tensor, scale: float,
                  tiles: PrefillTiles = PrefillTiles(), upcast: bool | None = None,
                  q_start_cpu: torch.Tensor | None = None, seq_lens_cpu: torch.Tensor | None = None) -> None:
    """Causal attention of every prefill chunk's rows over their paged keys, written into out.

    q [T, H, D] (last dim contiguous; fp32, bf16 or fp16); k_cache, v_cache [blocks, BS, KVH, D]
    contiguous, one dtype (fp32, bf16 or fp16), KVH dividing H; table [C, W] int32 (last dim
    contiguous; columns past a chunk's blocks are never read); q_start [C + 1] int32: chunk c's
    rows are q_start[c] .. q_start[c + 1] - 1 (non-decreasing; rows outside every chunk are left
    untouched); seq_lens [C] int32: keys the chunk's last row sees (>= its rows; its K/V in the
    cache already); out [T, H, D] (last dim contiguous, fp32, bf16 or fp16; may be q itself: each
    (row, head) is read and written by one program only).
    scale: the softmax scale (1 / sqrt(D)). upcast: the dots in fp32, on operands rounded to the
    cache's dtype (None: only for bf16 under the interpreter, whose bf16 dot is wrong).
    q_start_cpu, seq_lens_cpu: host copies; given (both), their contents are checked too
    (check_chunks); the launch itself never needs them. Every tensor on one device. Raises
    ValueError on any mismatch; reads no device value.
    """
    check_inputs(q, k_cache, v_cache, table, q_start, seq_lens, out, scale)
    if (q_start_cpu is None) != (seq_lens_cpu is None):
        raise ValueError("give both host copies (q_start_cpu and seq_lens_cpu) or neither")
    if q_start_cpu is not None and seq_lens_cpu is not None:
        if q_start_cpu.shape != q_start.shape or seq_lens_cpu.shape != seq_lens.shape:
            raise ValueError(f"q_start_cpu {tuple(q_start_cpu.shape)} / seq_lens_cpu {tuple(seq_lens_cpu.shape)} "
                             f"do not match q_start {tuple(q_start.shape)} / seq_lens {tuple(seq_lens.shape)}")
        check_chunks(q_start_cpu.tolist(), seq_lens_cpu.tolist(), q.shape[0], table.shape[1], k_cache.shape[1])
    chunks = seq_lens.shape[0]
    tokens, heads, d = q.shape
    _, bs, kvh, _ = k_cache.shape
    if chunks == 0 or tokens == 0:
        return
    group = heads // kvh
    if upcast is None:
        upcast = k_cache.dtype == torch.bfloat16 and interpreted()
    precision = "ieee" if upcast or k_cache.dtype == torch.float32 else "tf32"
    grid = (num_programs(tokens, chunks, group, tiles), kvh)
    prefill_kernel[grid](
        q, k_cache, v_cache, table, q_start, seq_lens, out,
        scale * LOG2E, chunks,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), table.stride(0),
        out.stride(0), out.stride(1),
        G=group, D=d, BS=bs, BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n,
        BLOCK_D=max(16, triton.next_power_of_2(d)), PRECISION=precision, UPCAST=upcast,
        num_warps=tiles.num_warps, enable_fp_fusion=True)


def check_inputs(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, table: torch.Tensor,
                 q_start: torch.Tensor, seq_lens: torch.Tensor, out: torch.Tensor, scale: float) -> None:
    """ValueError unless the shapes, dtypes, layouts and devices meet paged_prefill's contract
    (no device value is read)."""
    if q.dim() != 3 or out.shape != q.shape:
        raise ValueError(f"q and out must be [T, H, D] of one shape, got {tuple(q.shape)} and {tuple(out.shape)}")
    if k_cache.dim() != 4 or v_cache.shape != k_cache.shape:
        raise ValueError(f"k_cache and v_cache must be [blocks, BS, KVH, D] of one shape, got "
                         f"{tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    tokens, heads, d = q.shape
    kvh = k_cache.shape[2]
    if k_cache.shape[3] != d:
        raise ValueError(f"head_dim differs: q has {d}, the cache {k_cache.shape[3]}")
    if heads % kvh:
        raise ValueError(f"{kvh} KV heads do not divide {heads} query heads")
    if k_cache.dtype not in FLOATS or v_cache.dtype != k_cache.dtype:
        raise ValueError(f"k_cache and v_cache must share a dtype of float32, bfloat16 or float16, got "
                         f"{k_cache.dtype} and {v_cache.dtype}")
    if q.dtype not in FLOATS or out.dtype not in FLOATS:
        raise ValueError(f"q and out must be float32, bfloat16 or float16, got {q.dtype} and {out.dtype}")
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("k_cache and v_cache must be contiguous")
    if q.stride(-1) != 1 or out.stride(-1) != 1:
        raise ValueError(f"q and out need a contiguous last dim, got strides {q.stride()} and {out.stride()}")
    if table.dim() != 2 or table.dtype != torch.int32 or (table.shape[1] > 1 and table.stride(1) != 1):
        raise ValueError(f"table must be [C, W] int32 with a contiguous last dim, got "
                         f"{tuple(table.shape)} {table.dtype}")
    chunks = table.shape[0]
    if seq_lens.shape != (chunks,) or seq_lens.dtype != torch.int32:
        raise ValueError(f"seq_lens must be [C] = [{chunks}] int32 (one per block-table row), got "
                         f"{tuple(seq_lens.shape)} {seq_lens.dtype}")
    if q_start.shape != (chunks + 1,) or q_start.dtype != torch.int32:
        raise ValueError(f"q_start must be [C + 1] = [{chunks + 1}] int32, got {tuple(q_start.shape)} {q_start.dtype}")
    if not (q_start.is_contiguous() and seq_lens.is_contiguous()):
        raise ValueError("q_start and seq_lens must be contiguous")
    devices = {t.device for t in (q, k_cache, v_cache, table, q_start, seq_lens, out)}
    if len(devices) != 1:
        raise ValueError(f"every tensor must be on one device, got {sorted(map(str, devices))}")
    if not scale > 0 or scale == float("inf"):
        raise ValueError(f"scale must be a positive finite number, got {scale}")
