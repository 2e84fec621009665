"""Triton kernels: paged decode attention with headwise's telemetry accumulators, split-K.

One query row per sequence (the decode rows of a step) attends over its n = seq_len keys, read
straight from one layer's paged K/V cache through its block table (no gathered copy). A program
takes one (row, KV head, split): the G query heads sharing that KV head, padded to BLOCK_G with
masks (GQA 4/4, 8/2, 9/3 alike), against keys [split * split_keys, min((split + 1) * split_keys, n))
in tiles of BLOCK_N, with an online softmax (FlashAttention-2) carrying, per query head,

    m (running max, starts at the finite MASK_M, never -inf), l = sum e, o = sum e v, and, on rows
    whose flag asks for telemetry, t = sum e (s - m) and c_k = sum e W[j, k]

where e_j = exp(s_j - m) and W the per-key weight columns of server/engine/telemetry.py
(key_weights: the sink indicator, the position). When a tile raises the max from m to m' with
a = exp(m - m'):  t <- a (t + (m - m') l) + sum_tile e' (s - m'),  c <- a c + sum_tile e' W,
l <- a l + sum_tile e'  (DESIGN.md, "Per-head telemetry"; (m - m') l is 0 on the first tile
because m starts finite). Masked keys are zeroed with a where, never multiplied.

With a single split (every row's keys fit one) the split kernel writes the normalized output and
the accumulators itself; otherwise each split writes its partial (o, m, l, t, c) centred at its own
m, and the reduce kernel merges a row's splits one after another with the centred merge of
telemetry.merge_partials:  M = max m_s, w_s = exp(m_s - M), L = sum w_s l_s,
T = sum w_s (t_s + (m_s - M) l_s), C = sum w_s c_s, out = sum w_s o_s / L.

Telemetry is switched per row by a flag read on the device (no recompilation, one binary for
sampled and unsampled steps, so a CUDA graph can serve both): the output path is the same code
whether the flag is set or not, so the output is bit-identical with telemetry on or off. A row's
splits depend only on its own length and split_keys, and the reduce walks them in order, so a
row's result never depends on the rest of the batch.

fp32, bf16 and fp16 caches and queries; scores, softmax and every accumulator in fp32. With fp32
inputs the dots run in IEEE fp32 (never TF32). Triton's interpreter (TRITON_INTERPRET=1, triton
3.9) multiplies the raw bits of bf16 dot operands, so there bf16 operands are upcast to fp32
first (UPCAST; on a GPU the dots take bf16 and accumulate in fp32).

References: FlashAttention-2 (online softmax), Flash-Decoding (split-K), vLLM / SGLang Triton
paged decode kernels (block-table addressing), DESIGN.md "Per-head telemetry".
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from server.engine.triton_numerics import narrow

MASK_M = tl.constexpr(-1.0e30)  # the running max before any key: finite, so (m - m') * l is 0, never NaN


@triton.jit
def decode_split_kernel(
    Q, K, V, TABLE, LENS, FLAGS, KW, OUT, ACC, PART_O, PART_M, PART_A,
    scale, split_keys,
    stride_qb, stride_qh, stride_kb, stride_ks, stride_kh, stride_tb, stride_ob, stride_oh,
    H: tl.constexpr, G: tl.constexpr, D: tl.constexpr, BS: tl.constexpr, C: tl.constexpr, S: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
    DIRECT: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """Grid (rows, KV heads, splits). Q [B, H, D]; K, V [blocks, BS, KVH, D]; TABLE [B, W] int32;
    LENS, FLAGS [B] int32; KW [P, C] fp32. DIRECT: OUT [B, H, D], ACC [B, H, 2 + C] fp32; else
    PART_O [B, H, S, D], PART_M [B, H, S], PART_A [B, H, S, 2 + C] fp32."""
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    n = tl.load(LENS + b)
    want = tl.load(FLAGS + b) != 0
    lo = split * split_keys
    hi = tl.minimum(lo + split_keys, n)

    offs_g = tl.arange(0, BLOCK_G)                                               # [BG]
    offs_d = tl.arange(0, BLOCK_D)                                               # [BD]
    offs_c = tl.arange(0, BLOCK_C)                                               # [BC]
    g_mask = offs_g < G                                                          # [BG]
    d_mask = offs_d < D                                                          # [BD]
    heads = kvh * G + offs_g                                                     # [BG] query heads
    q = tl.load(Q + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                mask=g_mask[:, None] & d_mask[None, :], other=0.0)               # [BG, BD]
    dot_ty = tl.float32 if UPCAST else K.dtype.element_ty
    q = q.to(dot_ty)

    m_i = tl.full([BLOCK_G], MASK_M, tl.float32)                                 # [BG]
    l_i = tl.zeros([BLOCK_G], tl.float32)                                        # [BG]
    t_i = tl.zeros([BLOCK_G], tl.float32)                                        # [BG]
    c_i = tl.zeros([BLOCK_G, BLOCK_C], tl.float32)                               # [BG, BC]
    o_i = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)                               # [BG, BD]
    for j0 in range(lo, hi, BLOCK_N):
        offs_n = j0 + tl.arange(0, BLOCK_N)                                      # [BN] key positions
        valid = offs_n < hi                                                      # [BN]
        block = tl.load(TABLE + b * stride_tb + offs_n // BS, mask=valid, other=0)  # [BN] int32
        slot = block.to(tl.int64) * stride_kb + (offs_n % BS) * stride_ks + kvh * stride_kh  # [BN]
        kv_mask = valid[:, None] & d_mask[None, :]                               # [BN, BD]
        k = tl.load(K + slot[:, None] + offs_d[None, :], mask=kv_mask, other=0.0).to(dot_ty)  # [BN, BD]
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale           # [BG, BN] fp32
        m_new = tl.maximum(m_i, tl.max(tl.where(valid[None, :], s, float("-inf")), axis=1))  # [BG]
        alpha = tl.exp(m_i - m_new)                                              # [BG] 0 on the first tile
        shifted = s - m_new[:, None]                                             # [BG, BN] finite
        p = tl.where(valid[None, :], tl.exp(shifted), 0.0)                       # [BG, BN] 0 where masked
        v = tl.load(V + slot[:, None] + offs_d[None, :], mask=kv_mask, other=0.0).to(dot_ty)  # [BN, BD]
        o_i = o_i * alpha[:, None] + tl.dot(p.to(dot_ty), v, input_precision=PRECISION)  # [BG, BD]
        if want:
            t_i = alpha * (t_i + (m_i - m_new) * l_i) + tl.sum(p * shifted, axis=1)  # [BG] <= 0
            w = tl.load(KW + offs_n[:, None] * C + offs_c[None, :],
                        mask=valid[:, None] & (offs_c[None, :] < C), other=0.0)  # [BN, BC]
            c_i = c_i * alpha[:, None] + tl.sum(p[:, :, None] * w[None, :, :], axis=1)  # [BG, BC]
        l_i = l_i * alpha + tl.sum(p, axis=1)                                    # [BG]
        m_i = m_new

    A: tl.constexpr = 2 + C
    if DIRECT:
        out = o_i / l_i[:, None]                                                 # [BG, BD]
        tl.store(OUT + b * stride_ob + heads[:, None] * stride_oh + offs_d[None, :],
                 out.to(OUT.dtype.element_ty), mask=g_mask[:, None] & d_mask[None, :])
        if want:
            store_accumulators(ACC + (b * H + heads) * A, l_i, t_i, c_i, g_mask, C, BLOCK_C)
    else:
        part = (b * H + heads) * S + split                                       # [BG] partial index
        tl.store(PART_O + part[:, None] * D + offs_d[None, :], o_i, mask=g_mask[:, None] & d_mask[None, :])
        tl.store(PART_M + part, m_i, mask=g_mask)
        if want:
            store_accumulators(PART_A + part * A, l_i, t_i, c_i, g_mask, C, BLOCK_C)
        else:
            tl.store(PART_A + part * A, l_i, mask=g_mask)                        # l: the reduce needs it


@triton.jit
def store_accumulators(ptr, l, t, c, mask, C: tl.constexpr, BLOCK_C: tl.constexpr):
    """(l, t, c_0 .. c_{C-1}) of each query head at ptr [BG] (telemetry.py's layout)."""
    offs_c = tl.arange(0, BLOCK_C)                                               # [BC]
    tl.store(ptr, l, mask=mask)
    tl.store(ptr + 1, t, mask=mask)
    tl.store(ptr[:, None] + 2 + offs_c[None, :], c, mask=mask[:, None] & (offs_c[None, :] < C))


@triton.jit
def decode_reduce_kernel(
    PART_O, PART_M, PART_A, LENS, FLAGS, OUT, ACC,
    split_keys, stride_ob, stride_oh,
    H: tl.constexpr, D: tl.constexpr, C: tl.constexpr, S: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Grid (rows, query heads): the centred merge of a row's cdiv(n, split_keys) partials, in
    split order. OUT [B, H, D]; ACC [B, H, 2 + C] fp32 (written on flagged rows)."""
    b = tl.program_id(0)
    h = tl.program_id(1)
    n = tl.load(LENS + b)
    want = tl.load(FLAGS + b) != 0
    num_splits = tl.cdiv(n, split_keys)
    A: tl.constexpr = 2 + C
    base = (b * H + h) * S
    offs_d = tl.arange(0, BLOCK_D)                                               # [BD]
    offs_c = tl.arange(0, BLOCK_C)                                               # [BC]
    d_mask = offs_d < D                                                          # [BD]
    c_mask = offs_c < C                                                          # [BC]

    big_m = tl.load(PART_M + base)                                               # [] split 0 is never empty
    for s in range(1, num_splits):
        big_m = tl.maximum(big_m, tl.load(PART_M + base + s))
    big_l = tl.zeros([1], tl.float32)                                            # [1]
    big_t = tl.zeros([1], tl.float32)                                            # [1]
    big_c = tl.zeros([BLOCK_C], tl.float32)                                      # [BC]
    big_o = tl.zeros([BLOCK_D], tl.float32)                                      # [BD]
    for s in range(0, num_splits):
        delta = tl.load(PART_M + base + s) - big_m                               # [] <= 0
        w = tl.exp(delta)                                                        # []
        l_s = tl.load(PART_A + (base + s) * A)                                   # [] > 0: every split has a key
        big_l += w * l_s
        big_o += w * tl.load(PART_O + (base + s) * D + offs_d, mask=d_mask, other=0.0)  # [BD]
        if want:
            t_s = tl.load(PART_A + (base + s) * A + 1)                           # []
            big_t += w * (t_s + tl.where(l_s > 0, delta * l_s, 0.0))
            big_c += w * tl.load(PART_A + (base + s) * A + 2 + offs_c, mask=c_mask, other=0.0)  # [BC]
    out = big_o / big_l                                                          # [BD]
    tl.store(OUT + b * stride_ob + h * stride_oh + offs_d, out.to(OUT.dtype.element_ty), mask=d_mask)
    if want:
        zero = tl.arange(0, 1)                                                   # [1]
        tl.store(ACC + (b * H + h) * A + zero, big_l)
        tl.store(ACC + (b * H + h) * A + 1 + zero, big_t)
        tl.store(ACC + (b * H + h) * A + 2 + offs_c, big_c, mask=c_mask)


@triton.jit
def store_kv_kernel(K, V, SLOTS, K_CACHE, V_CACHE, stride_kt, stride_kh, stride_vt, stride_vh,
                    KVH: tl.constexpr, D: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
                    SOFT_ROUND: tl.constexpr):
    """Grid (tokens,): token t's K [KVH, D] and V into cache slot SLOTS[t] of K_CACHE, V_CACHE
    [slots, KVH, D] (contiguous), rounded to the cache's dtype; a slot < 0 is skipped (a padded
    row of a CUDA graph's batch, vLLM's convention). SOFT_ROUND: a bfloat16 cache under the
    interpreter, which truncates in .to(bfloat16) (triton_numerics.py); a GPU rounds to
    nearest even, as torch does."""
    t = tl.program_id(0)
    slot = tl.load(SLOTS + t).to(tl.int64)
    if slot >= 0:
        offs_h = tl.arange(0, BLOCK_H)                                           # [BH]
        offs_d = tl.arange(0, BLOCK_D)                                           # [BD]
        mask = (offs_h[:, None] < KVH) & (offs_d[None, :] < D)                   # [BH, BD]
        dst = slot * (KVH * D) + offs_h[:, None] * D + offs_d[None, :]           # [BH, BD]
        k = tl.load(K + t * stride_kt + offs_h[:, None] * stride_kh + offs_d[None, :], mask=mask)  # [BH, BD]
        v = tl.load(V + t * stride_vt + offs_h[:, None] * stride_vh + offs_d[None, :], mask=mask)  # [BH, BD]
        tl.store(K_CACHE + dst, narrow(k.to(tl.float32), K_CACHE.dtype.element_ty, SOFT_ROUND), mask=mask)
        tl.store(V_CACHE + dst, narrow(v.to(tl.float32), V_CACHE.dtype.element_ty, SOFT_ROUND), mask=mask)



def store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Write new tokens' K/V into one layer's paged cache in one launch (KVCache.write's job):
    k, v [T, KVH, D] (last dim contiguous, any float dtype); k_cache, v_cache [blocks, bs, KVH, D]
    contiguous; slot_mapping [T] int64, where a slot < 0 writes nothing."""
    t, kvh, d = k.shape
    if v.shape != k.shape or k_cache.shape[2:] != (kvh, d) or v_cache.shape != k_cache.shape:
        raise ValueError(f"store_kv: k {tuple(k.shape)}, v {tuple(v.shape)} do not fit caches {tuple(k_cache.shape)}")
    if k.stride(-1) != 1 or v.stride(-1) != 1 or not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("store_kv: k and v need a contiguous last dim and the caches must be contiguous")
    if t == 0:
        return
    store_kv_kernel[(t,)](k, v, slot_mapping, k_cache, v_cache, k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                          KVH=kvh, D=d, BLOCK_H=triton.next_power_of_2(kvh), BLOCK_D=triton.next_power_of_2(d),
                          SOFT_ROUND=k_cache.dtype == torch.bfloat16 and interpreted(),
                          num_warps=1)


@dataclass(frozen=True)
class DecodeTiles:
    """Launch shape of the decode kernels (a row's result depends on split_keys and block_n, never
    on the batch)."""

    split_keys: int = 512   # keys per split; a multiple of block_n
    block_n: int = 64       # keys per tile (>= 16: tl.dot's minimum)
    num_warps: int = 4

    def __post_init__(self) -> None:
        if self.block_n < 16 or self.block_n & (self.block_n - 1) or self.split_keys % self.block_n:
            raise ValueError(f"block_n must be a power of 2 >= 16 dividing split_keys, got {self}")


@dataclass(frozen=True)
class DecodeScratch:
    """fp32 partials of every (decode row, query head, split) of one layer's decode call."""

    part_o: torch.Tensor   # [B, H, S, D] sum e v of each split
    part_m: torch.Tensor   # [B, H, S] each split's max score
    part_a: torch.Tensor   # [B, H, S, 2 + C] (l, t, c...) centred at the split's max

    @classmethod
    def allocate(cls, rows: int, heads: int, splits: int, head_dim: int, num_acc: int,
                 device: torch.device) -> DecodeScratch:
        f32 = dict(device=device, dtype=torch.float32)
        return cls(torch.empty(rows, heads, splits, head_dim, **f32),   # [B, H, S, D]
                   torch.empty(rows, heads, splits, **f32),             # [B, H, S]
                   torch.empty(rows, heads, splits, num_acc, **f32))    # [B, H, S, A]


def num_splits(max_len: int, tiles: DecodeTiles) -> int:
    """Splits of the longest row (1: the split kernel finishes every row itself)."""
    return max(1, -(-max_len // tiles.split_keys))


def interpreted() -> bool:
    """Whether these kernels were built by Triton's CPU interpreter (TRITON_INTERPRET=1 at import)."""
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(decode_split_kernel, InterpretedFunction)


def paged_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, table: torch.Tensor,
                 lens: torch.Tensor, flags: torch.Tensor, key_weights: torch.Tensor, out: torch.Tensor,
                 acc: torch.Tensor, scale: float, tiles: DecodeTiles, scratch: DecodeScratch | None,
                 upcast: bool | None = None) -> None:
    """Attention of each decode row over its paged keys, written into out (and acc on flagged rows).

    q [B, H, D] (last dim contiguous); k_cache, v_cache [blocks, bs, KVH, D] contiguous; table
    [B, W] int32; lens [B] int32 (>= 1); flags [B] int32 (1: compute telemetry); key_weights
    [P >= max len, C] fp32 contiguous; out [B, H, D] (last dim contiguous, any dtype); acc
    [B, H, 2 + C] fp32 contiguous. scratch: None for a single split (every len <= split_keys),
    else DecodeScratch of [B, H, S, ...] with S = num_splits(max len). upcast: dots in fp32 whatever
    the inputs (None: only for bf16 under the interpreter, whose bf16 dot is wrong).
    """
    rows, heads, d = q.shape
    _, bs, kvh, _ = k_cache.shape
    c = key_weights.shape[1]
    group = heads // kvh
    splits = 1 if scratch is None else scratch.part_m.shape[2]
    if upcast is None:
        upcast = k_cache.dtype == torch.bfloat16 and interpreted()
    precision = "ieee" if upcast or k_cache.dtype == torch.float32 else "tf32"
    block_d, block_c = triton.next_power_of_2(d), triton.next_power_of_2(c)
    direct = scratch is None
    part = (out, out, acc) if direct else (scratch.part_o, scratch.part_m, scratch.part_a)
    decode_split_kernel[(rows, kvh, splits)](
        q, k_cache, v_cache, table, lens, flags, key_weights, out, acc, *part,
        scale, tiles.split_keys,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), table.stride(0),
        out.stride(0), out.stride(1),
        H=heads, G=group, D=d, BS=bs, C=c, S=splits,
        BLOCK_G=max(16, triton.next_power_of_2(group)), BLOCK_D=block_d, BLOCK_N=tiles.block_n, BLOCK_C=block_c,
        DIRECT=direct, PRECISION=precision, UPCAST=upcast, num_warps=tiles.num_warps, enable_fp_fusion=True)
    if direct:
        return
    decode_reduce_kernel[(rows, heads)](
        scratch.part_o, scratch.part_m, scratch.part_a, lens, flags, out, acc,
        tiles.split_keys, out.stride(0), out.stride(1),
        H=heads, D=d, C=c, S=splits, BLOCK_D=block_d, BLOCK_C=block_c, num_warps=1, enable_fp_fusion=True)
