"""Rounding helpers shared by headwise's Triton kernels (triton_layer_ops.py, attention/triton_kernels.py).

Triton 3.9's interpreter (TRITON_INTERPRET=1, the CPU tests) truncates a float32 -> bfloat16 cast
instead of rounding it to nearest even as a GPU (cvt.rn.bf16.f32) and torch do; its float16
casts round correctly. Kernels narrow their float32 results through narrow(), whose SOFT_ROUND
(set only for bfloat16 outputs under the interpreter) rounds with integer ops instead, so the
interpreter's results are the GPU's.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def rne_bfloat16(x):
    """float32 x -> bfloat16 rounded to nearest even with integer ops (NaN stays NaN)."""
    bits = x.to(tl.uint32, bitcast=True)                                         # [...]
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16                         # [...] carries into the exponent
    rounded = tl.where(x != x, 0x7FC0, rounded)                                  # [...] a quiet NaN
    return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)                   # [...]


@triton.jit
def narrow(x, ty: tl.constexpr, SOFT_ROUND: tl.constexpr):
    """float32 x -> ty rounded to nearest even (SOFT_ROUND: ty is bfloat16 under the interpreter)."""
    if SOFT_ROUND:
        y = rne_bfloat16(x)
    else:
        y = x.to(ty)
    return y
