"""Triton kernels for the fused glue of a decoder layer on CUDA: the LayerOps contract of
server/engine/layer_ops.py with bfloat16 or float16 activations (A below; the residual stream x
stays float32):

    rms_norm(x, w, eps)                  F.rms_norm(x, (C,), w, eps).to(A)
    add_rms_norm(x, y, w, eps)           x += y in place (float32 add), then rms_norm(x, w, eps)
    silu_mul(gate_up)                    (F.silu(gate) * up).to(A), gate, up = the halves of a row
    qkv_rope(qkv, cos, sin, H, KVH)      q, k rotated (rotate-half RoPE) and v, in qkv's own dtype

Each op is one kernel launch with one program per row (silu_mul: per row and column tile), the
row's width a constexpr and its block the next power of two with masks, so any C, I or D works.
Every value is widened to float32 right after its load and all arithmetic runs in float32 (the
sum of squares too); only the store narrows. A row's arithmetic never depends on the other rows
or on T (the launch shape depends only on the widths), so a row gives the same bits alone and
inside any batch.

SiLU takes its sigmoid from e = exp(-|g|) <= 1 (as csrc/layer_ops.cpp does), so no exp
overflows: sigmoid(g) = 1 / (1 + e) for g >= 0, e / (1 + e) otherwise. The norm's square root and
divisions are the IEEE ones (sqrt_rn, div_rn), not the approximate defaults.

Results are narrowed through triton_numerics.narrow (SOFT_ROUND: bfloat16 rounded to nearest even
with integer ops under Triton's interpreter, which truncates; a GPU's cast rounds).

References: Zhang & Sennrich 2019 (RMSNorm), Shazeer 2020 (GLU variants: SwiGLU), Su et al. 2021
(RoFormer: rotary embeddings; the rotate-half layout of model.py's rope_tables / apply_rope),
Triton's layer-norm tutorial (a row per program), vLLM's fused_add_rms_norm and silu_and_mul,
csrc/layer_ops.cpp (the CPU ops of the same contract).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from server.engine.layer_ops import LayerOps
from server.engine.triton_numerics import narrow

ACTIVATION_DTYPES = (torch.bfloat16, torch.float16)
INPUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
SILU_BLOCK_MAX = 4096  # columns per silu_mul program: wider rows take several tiles


@triton.jit
def rms_norm_kernel(X, Y, W, OUT, eps, C: tl.constexpr, BLOCK_C: tl.constexpr, ADD: tl.constexpr,
                    SOFT_ROUND: tl.constexpr):
    """Grid (T,). X [T, C] fp32; Y [T, C] (fp32/bf16/fp16, read when ADD); W [C] fp32; OUT [T, C].
    ADD: X row += Y row (stored back) first. OUT row = X row / sqrt(mean(X row^2) + eps) * W."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_C)                                                 # [BC]
    mask = offs < C                                                              # [BC]
    x = tl.load(X + row * C + offs, mask=mask, other=0.0).to(tl.float32)         # [BC]
    if ADD:
        y = tl.load(Y + row * C + offs, mask=mask, other=0.0).to(tl.float32)     # [BC] widened exactly
        x = x + y                                                                # [BC]
        tl.store(X + row * C + offs, x, mask=mask)
    mean_sq = tl.sum(x * x, axis=0) / C                                          # [] masked lanes add 0
    r = tl.div_rn(1.0, tl.sqrt_rn(mean_sq + eps))                               # []
    w = tl.load(W + offs, mask=mask, other=0.0).to(tl.float32)                   # [BC]
    out = x * r * w                                                              # [BC]
    tl.store(OUT + row * C + offs, narrow(out, OUT.dtype.element_ty, SOFT_ROUND), mask=mask)


@triton.jit
def silu_mul_kernel(GU, OUT, I: tl.constexpr, BLOCK_I: tl.constexpr, SOFT_ROUND: tl.constexpr):
    """Grid (T, cdiv(I, BLOCK_I)). GU [T, 2I] (gate | up, fp32/bf16/fp16); OUT [T, I] = silu(gate) * up."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)                    # [BI]
    mask = offs < I                                                              # [BI]
    g = tl.load(GU + row * (2 * I) + offs, mask=mask, other=0.0).to(tl.float32)      # [BI]
    u = tl.load(GU + row * (2 * I) + I + offs, mask=mask, other=0.0).to(tl.float32)  # [BI]
    e = tl.exp(-tl.abs(g))                                                       # [BI] in (0, 1]
    sig = tl.div_rn(tl.where(g >= 0, 1.0, e), 1.0 + e)                           # [BI] sigmoid(g)
    out = g * sig * u                                                            # [BI]
    tl.store(OUT + row * I + offs, narrow(out, OUT.dtype.element_ty, SOFT_ROUND), mask=mask)


@triton.jit
def qkv_rope_kernel(QKV, COS, SIN, Q, K, V, H: tl.constexpr, KVH: tl.constexpr, D: tl.constexpr,
                    BLOCK_HEADS: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_V: tl.constexpr,
                    SOFT_ROUND: tl.constexpr):
    """Grid (T,). QKV [T, (H + 2 KVH) D]; COS, SIN [T, D] fp32; Q [T, H, D], K, V [T, KVH, D] of
    QKV's dtype. The H + KVH heads of q and k: out = x cos + rotate_half(x) sin, i.e.
    first half a c1 - b s1, second half b c2 + a s2 (a, b the halves of x); v copied."""
    HALF: tl.constexpr = D // 2
    WIDTH: tl.constexpr = (H + 2 * KVH) * D
    row = tl.program_id(0).to(tl.int64)
    heads = tl.arange(0, BLOCK_HEADS)                                            # [BH] q heads, then k heads
    offs = tl.arange(0, BLOCK_HALF)                                              # [BF]
    f_mask = offs < HALF                                                         # [BF]
    mask = (heads < H + KVH)[:, None] & f_mask[None, :]                          # [BH, BF]
    src = QKV + row * WIDTH + heads[:, None] * D + offs[None, :]                 # [BH, BF] first halves
    a = tl.load(src, mask=mask, other=0.0).to(tl.float32)                        # [BH, BF]
    b = tl.load(src + HALF, mask=mask, other=0.0).to(tl.float32)                 # [BH, BF]
    c1 = tl.load(COS + row * D + offs, mask=f_mask, other=0.0)[None, :]          # [1, BF]
    c2 = tl.load(COS + row * D + HALF + offs, mask=f_mask, other=0.0)[None, :]   # [1, BF]
    s1 = tl.load(SIN + row * D + offs, mask=f_mask, other=0.0)[None, :]          # [1, BF]
    s2 = tl.load(SIN + row * D + HALF + offs, mask=f_mask, other=0.0)[None, :]   # [1, BF]
    lo = narrow(a * c1 - b * s1, Q.dtype.element_ty, SOFT_ROUND)                 # [BH, BF]
    hi = narrow(b * c2 + a * s2, Q.dtype.element_ty, SOFT_ROUND)                 # [BH, BF]

    is_q = (heads < H)[:, None] & f_mask[None, :]                                # [BH, BF]
    is_k = ((heads >= H) & (heads < H + KVH))[:, None] & f_mask[None, :]         # [BH, BF]
    q_dst = Q + (row * H + heads[:, None]) * D + offs[None, :]                   # [BH, BF]
    k_head = tl.where(heads >= H, heads - H, 0)                                  # [BH]
    k_dst = K + (row * KVH + k_head[:, None]) * D + offs[None, :]                # [BH, BF]
    tl.store(q_dst, lo, mask=is_q)
    tl.store(q_dst + HALF, hi, mask=is_q)
    tl.store(k_dst, lo, mask=is_k)
    tl.store(k_dst + HALF, hi, mask=is_k)

    offs_v = tl.arange(0, BLOCK_V)                                               # [BV]
    v_mask = offs_v < KVH * D                                                    # [BV]
    v = tl.load(QKV + row * WIDTH + (H + KVH) * D + offs_v, mask=v_mask, other=0.0)  # [BV] QKV's dtype
    tl.store(V + row * (KVH * D) + offs_v, v, mask=v_mask)


def interpreted() -> bool:
    """Whether these kernels were built by Triton's CPU interpreter (TRITON_INTERPRET=1 at import)."""
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(rms_norm_kernel, InterpretedFunction)


def num_warps(block: int) -> int:
    """Warps for a program over `block` elements: one per 256, 1..8 (the widths alone decide)."""
    return min(8, max(1, block // 256))


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def _check_device(*tensors: torch.Tensor) -> None:
    """All on one device: CUDA, or the CPU under the interpreter."""
    dev = tensors[0].device
    _check(all(t.device == dev for t in tensors), f"tensors on different devices: {[str(t.device) for t in tensors]}")
    _check(dev.type == "cuda" or (dev.type == "cpu" and interpreted()),
           f"the Triton layer ops run on CUDA tensors, got {dev}")


def _check_rows(name: str, t: torch.Tensor, dtypes: tuple[torch.dtype, ...]) -> None:
    _check(t.dim() == 2, f"{name}: expected [T, width], got shape {tuple(t.shape)}")
    _check(t.dtype in dtypes, f"{name}: expected dtype in {[str(d) for d in dtypes]}, got {t.dtype}")
    _check(t.is_contiguous(), f"{name}: must be contiguous (strides {t.stride()})")


def _check_norm(x: torch.Tensor, w: torch.Tensor) -> None:
    _check_rows("x", x, (torch.float32,))
    _check(w.dim() == 1 and w.dtype == torch.float32 and w.is_contiguous() and w.shape[0] == x.shape[1],
           f"w: expected float32 [{x.shape[1]}] contiguous, got {w.dtype} {tuple(w.shape)}")


def _soft_round(out: torch.Tensor) -> bool:
    """bfloat16 rounded with integer ops: only for CPU tensors, which _check_device lets through
    only under the interpreter (so the CUDA path never asks)."""
    return out.dtype == torch.bfloat16 and out.device.type == "cpu"


def _norm(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, eps: float, add: bool, dtype: torch.dtype) -> torch.Tensor:
    rows, c = x.shape
    out = torch.empty(rows, c, device=x.device, dtype=dtype)                    # [T, C]
    if rows:
        block = triton.next_power_of_2(c)
        rms_norm_kernel[(rows,)](x, y, w, out, float(eps), C=c, BLOCK_C=block, ADD=add,
                                 SOFT_ROUND=_soft_round(out), num_warps=num_warps(block))
    return out


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float, *, dtype: torch.dtype) -> torch.Tensor:
    """x float32 [T, C] contiguous, w float32 [C] -> F.rms_norm(x, (C,), w, eps).to(dtype) [T, C]."""
    _check_norm(x, w)
    _check_device(x, w)
    return _norm(x, x, w, eps, False, dtype)


def add_rms_norm(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, eps: float, *, dtype: torch.dtype) -> torch.Tensor:
    """x float32 [T, C] contiguous += y (float32/bf16/fp16 [T, C], widened exactly) in place, then
    rms_norm of the new x in dtype [T, C]; one launch."""
    _check_norm(x, w)
    _check_rows("y", y, INPUT_DTYPES)
    _check(y.shape == x.shape, f"y: expected the shape of x {tuple(x.shape)}, got {tuple(y.shape)}")
    _check_device(x, y, w)
    return _norm(x, y, w, eps, True, dtype)


def silu_mul(gate_up: torch.Tensor, *, dtype: torch.dtype) -> torch.Tensor:
    """gate_up [T, 2I] contiguous (float32/bf16/fp16) -> (F.silu(gate) * up).to(dtype) [T, I]."""
    _check_rows("gate_up", gate_up, INPUT_DTYPES)
    _check(gate_up.shape[1] % 2 == 0, f"gate_up: expected an even width [T, 2I], got {tuple(gate_up.shape)}")
    _check_device(gate_up)
    rows, inter = gate_up.shape[0], gate_up.shape[1] // 2
    out = torch.empty(rows, inter, device=gate_up.device, dtype=dtype)          # [T, I]
    if rows and inter:
        block = min(triton.next_power_of_2(inter), SILU_BLOCK_MAX)
        silu_mul_kernel[(rows, triton.cdiv(inter, block))](gate_up, out, I=inter, BLOCK_I=block,
                                                            SOFT_ROUND=_soft_round(out), num_warps=num_warps(block))
    return out


def qkv_rope(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, H: int, KVH: int
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """qkv [T, (H + 2 KVH) D] contiguous (float32/bf16/fp16), cos, sin float32 [T, D] contiguous
    (rotate-half layout) -> q [T, H, D], k [T, KVH, D] rotated and v [T, KVH, D], fresh
    contiguous tensors of qkv's dtype; one launch."""
    _check_rows("qkv", qkv, INPUT_DTYPES)
    _check(isinstance(H, int) and isinstance(KVH, int) and H >= 1 and KVH >= 1,
           f"H, KVH: expected positive ints, got {H!r}, {KVH!r}")
    rows, width = qkv.shape
    _check(width % (H + 2 * KVH) == 0, f"qkv: width {width} is not a multiple of H + 2 KVH = {H + 2 * KVH}")
    d = width // (H + 2 * KVH)
    _check(d % 2 == 0 and d > 0, f"qkv: head_dim {d} must be even")
    for name, t in (("cos", cos), ("sin", sin)):
        _check(t.dtype == torch.float32 and t.is_contiguous() and tuple(t.shape) == (rows, d),
               f"{name}: expected float32 [{rows}, {d}] contiguous, got {t.dtype} {tuple(t.shape)}")
    _check_device(qkv, cos, sin)
    like = dict(device=qkv.device, dtype=qkv.dtype)
    q = torch.empty(rows, H, d, **like)                                          # [T, H, D]
    k = torch.empty(rows, KVH, d, **like)                                        # [T, KVH, D]
    v = torch.empty(rows, KVH, d, **like)                                        # [T, KVH, D]
    if rows:
        block_heads, block_half = triton.next_power_of_2(H + KVH), triton.next_power_of_2(d // 2)
        qkv_rope_kernel[(rows,)](qkv, cos, sin, q, k, v, H=H, KVH=KVH, D=d, BLOCK_HEADS=block_heads,
                                 BLOCK_HALF=block_half, BLOCK_V=triton.next_power_of_2(KVH * d),
                                 SOFT_ROUND=_soft_round(q), num_warps=num_warps(block_heads * block_half))
    return q, k, v


def triton_layer_ops(dtype: torch.dtype) -> LayerOps:
    """The LayerOps contract on CUDA with activations of dtype (torch.bfloat16 or torch.float16)."""
    if dtype not in ACTIVATION_DTYPES:
        raise ValueError(f"the Triton layer ops take bfloat16 or float16 activations, got {dtype}")
    return LayerOps(rms_norm=functools.partial(rms_norm, dtype=dtype),
                    add_rms_norm=functools.partial(add_rms_norm, dtype=dtype),
                    silu_mul=functools.partial(silu_mul, dtype=dtype),
                    qkv_rope=qkv_rope)
