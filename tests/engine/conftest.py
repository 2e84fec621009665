"""Fixtures of the engine tests."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module", params=["fp32", "q4"])
def tiny_dir(request, tiny_llama_dir, tiny_llama_q4_dir):
    """An engine test on the reference path (a float32 folder: fp32 weights, float32 KV cache)
    and on the quantized path (the same model as Q4_1 / Q8_0 blocks: int4 and int8 kernels,
    bfloat16 prefill copies, the fused layer ops, a bfloat16 KV cache)."""
    return tiny_llama_dir if request.param == "fp32" else tiny_llama_q4_dir
