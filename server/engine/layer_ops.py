"""Fused elementwise ops of a decoder layer on CPUs (csrc/layer_ops.cpp), for the quantized path.

At decode the glue between a layer's matmuls costs more than its arithmetic: F.rms_norm alone
dispatches five ops on a CPU (about 23 us a call with 61 calls a step), and every cast, split and
RoPE term is one more. Four C++ ops replace those chains where the next matmul wants bfloat16
activations (the int4 / int8 / bf16 formats). LayerOps is the contract (A: the activation dtype the
projections take, bfloat16 here; the residual stream x stays float32):

    rms_norm(x, w, eps)                  F.rms_norm(x, w, eps).to(A)
    add_rms_norm(x, y, w, eps)           x += y in place (float32), then rms_norm(x, w, eps)
    silu_mul(gate_up)                    (F.silu(gate) * up).to(A)
    qkv_rope(qkv, cos, sin, H, KVH)      q, k rotated (rotate-half RoPE) and v (float32 here)

On CUDA the same contract is met by Triton kernels (triton_layer_ops.py), in bfloat16 or float16.

They are built like the paged-decode op (attention/cpu_extension.py: the system C++ compiler and
ninja, once per source and CPU, at set-up). LayerOps.load() gives them, or None with the reason
logged once; the model then runs the same math as torch ops. The fp32 format never uses them:
it stays the exactness reference.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from server.engine.attention.cpu_extension import CFLAGS, build_library

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).parent / "csrc" / "layer_ops.cpp"


@dataclass(frozen=True)
class LayerOps:
    """The fused glue of a decoder layer (the module docstring's contract)."""

    rms_norm: Callable
    add_rms_norm: Callable
    silu_mul: Callable
    qkv_rope: Callable


@functools.cache
def load_layer_ops() -> LayerOps | None:
    """Build (first time) and load the ops; never raises. None, with one warning, when unavailable."""
    reason = build_library("headwise_layer_ops", [SOURCE], CFLAGS, ["-fopenmp"])
    if reason is None:
        import torch

        ops = torch.ops.headwise_layer
        return LayerOps(ops.rms_norm_bf16, ops.add_rms_norm_bf16, ops.silu_mul_bf16, ops.qkv_rope)
    logger.warning("headwise: the fused CPU layer ops are unavailable (%s); the quantized path runs them as torch ops",
                   reason)
    return None

