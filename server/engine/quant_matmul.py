"""Our CPU matmul over GGUF blocks (csrc/quant_matmul.cpp): Q4_0, Q4_1 and Q8_0 weights kept in
their own values, bfloat16 activations, float32 out, for the decode rows of a step.

torch's weight-only kernels (_weight_int4pack_mm_for_cpu, _weight_int8pack_mm) compute one
activation row at a time: a 16-row decode step pays for decoding every weight 16 times, and costs
16x a single row (BENCHMARKS.md). This kernel decodes each 16-output tile of weights once and
multiplies it into up to 8 rows at a time with AVX-512 BF16 dot products; a row's arithmetic is the
same whatever the batch, so decode rows keep their batch invariance. The values are the file's:
Q4 nibbles and Q8_0 bytes are exact in bfloat16, and d and m stay float16 (torch's int4 layout
rounds them to bfloat16, its int8 kernel takes one scale per row).

Built like the other C++ ops (attention/cpu_extension.py) at set-up; load_quant_matmul() gives
the op or None with the reason logged once (a CPU without AVX-512 BF16, no compiler), and the
int4 / int8 formats then run on torch's kernels (weights.py).
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from server.engine.attention.cpu_extension import CFLAGS, build_library

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).parent / "csrc" / "quant_matmul.cpp"
TILE = 16                                  # output rows per tile (csrc: one float32 lane each)
KIND_CODES = {"Q4_0": 0, "Q4_1": 1, "Q8_0": 2}


@dataclass(frozen=True)
class PackedBlocks:
    """A block-quantized [out, in] matrix in the kernel's tile layout (see the C++ header)."""

    kind: str                       # "Q4_0" | "Q4_1" | "Q8_0"
    out_features: int               # N (the packed tensors are padded to a multiple of 16)
    qw: torch.Tensor                # Q4: uint8 [N/16, in/4, 32]; Q8_0: int8 [N/16, in/2, 32]
    scales: torch.Tensor            # float16 [N/16, in/32, 16]: d
    mins: torch.Tensor | None       # float16 [N/16, in/32, 16]: m (Q4_1), else None


def pack_blocks(kind: str, q: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor | None,
                place: Callable[[torch.Tensor], torch.Tensor] | None = None) -> PackedBlocks:
    """q [out, in] (uint8 0..15 for Q4, int8 for Q8_0), scales / mins float16 [out, in/32] ->
    the tile layout; padding rows have scale 0 (and mins 0), so their outputs are 0. place
    makes the contiguous tensors the op reads (an Arena's copy: host_memory.py; by default
    .contiguous())."""
    place = place or torch.Tensor.contiguous
    out, k = q.shape
    pad = -out % TILE
    tiles = (out + pad) // TILE
    if pad:
        q = torch.cat([q, q.new_zeros(pad, k)])                                         # [N', in]
        scales = torch.cat([scales, scales.new_zeros(pad, scales.shape[1])])            # [N', G]
        mins = None if mins is None else torch.cat([mins, mins.new_zeros(pad, mins.shape[1])])  # [N', G]
    pairs = q.view(tiles, TILE, k // 2, 2).permute(0, 2, 1, 3).reshape(tiles, k // 2, 2 * TILE)  # [N'/16, in/2, 32]
    if kind == "Q8_0":
        qw = pairs                                                                      # [N'/16, in/2, 32] int8
    else:
        two = pairs.reshape(tiles, k // 4, 2, 2 * TILE)                                 # [N'/16, in/4, 2, 32]
        qw = two[:, :, 0] | (two[:, :, 1] << 4)                                         # [N'/16, in/4, 32] uint8

    def tiled(t: torch.Tensor) -> torch.Tensor:
        return place(t.to(torch.float16).view(tiles, TILE, -1).transpose(1, 2))        # [N'/16, G, 16]

    return PackedBlocks(kind, out, place(qw), tiled(scales), None if mins is None else tiled(mins))


def quantize_q8_0(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float weights [out, in] -> Q8_0 blocks exactly as gguf-py's quantizer makes them (for int8
    from a non-Q8_0 source): per group of 32, d = max |w| / 127, q = w / d rounded half away from
    zero, d stored as float16. Returns q int8 [out, in] and d float16 [out, in/32]."""
    out, k = w.shape
    groups = w.float().view(out, k // 32, 32)                                           # [out, G, 32]
    d = groups.abs().amax(dim=-1, keepdim=True) / 127.0                                 # [out, G, 1]
    inv = torch.where(d == 0, torch.zeros_like(d), 1.0 / d)                             # [out, G, 1]
    scaled = groups * inv                                                               # [out, G, 32]
    q = (scaled.sign() * (scaled.abs() + 0.5).floor()).to(torch.int8).view(out, k)      # [out, in]
    return q, d[..., 0].to(torch.float16)


@dataclass(frozen=True)
class QuantMatmul:
    """The loaded ops: mm(x [T, in], packed, bias) -> float32 [T, out], or into out (float32
    [T, out] with unit column stride, e.g. rows of a bigger tensor) when given."""

    op: Callable
    op_out: Callable

    def mm(self, x: torch.Tensor, packed: PackedBlocks, bias: torch.Tensor | None,
           out: torch.Tensor | None = None) -> torch.Tensor:
        args = (x, packed.qw, packed.scales, packed.mins, KIND_CODES[packed.kind], packed.out_features, bias)
        if out is None:
            return self.op(*args)                                                       # [T, out]
        self.op_out(*args, out)
        return out                                                                      # [T, out]


@functools.cache
def load_quant_matmul() -> QuantMatmul | None:
    """Build (first time) and load the op; never raises. None, with one warning, when unavailable."""
    reason = build_library("headwise_quant_matmul", [SOURCE], CFLAGS, ["-fopenmp"])
    if reason is None:
        return QuantMatmul(torch.ops.headwise_quant.quant_mm, torch.ops.headwise_quant.quant_mm_out)
    logger.warning("headwise: the quantized CPU matmul is unavailable (%s); int4 / int8 run on torch's kernels", reason)
    return None
