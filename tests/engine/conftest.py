"""Fixtures of the engine tests."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module", params=["fp32", "q4"])
def tiny_dir(request, tiny_llama_dir, tiny_llama_q4_dir):
    """An engine test on the reference path (a float32 folder: fp32 weights, float32 KV cache)
    and on the quantized path (the same model as Q4_1 / Q8_0 blocks: int4 and int8 kernels,
    bfloat16 prefill copies, the fused layer ops, a bfloat16 KV cache)."""
    return tiny_llama_dir if request.param == "fp32" else tiny_llama_q4_dir


@pytest.fixture(scope="module")
def triton_dev():
    """Where the Triton kernels run: a CUDA GPU, else this CPU under Triton's interpreter
    (tests/conftest.py imports the kernels with TRITON_INTERPRET=1 where there is no CUDA), with
    TRITON_INTERPRET=1 set while the module's tests run (the backend checks it on a CPU)."""
    pytest.importorskip("triton", reason="triton is not installed (scripts/setup.sh installs it with the dev extra)")
    from server.engine.attention import triton_kernels

    if triton_kernels.interpreted():
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("TRITON_INTERPRET", "1")
            yield torch.device("cpu")
    elif torch.cuda.is_available():
        yield torch.device("cuda")
    else:
        pytest.skip("the Triton kernels need CUDA, or Triton's interpreter chosen before triton is first "
                    "imported (tests/conftest.py does that where there is no CUDA)")
