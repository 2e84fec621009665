"""Our quantized CPU matmul (server/engine/quant_matmul.py, csrc/quant_matmul.cpp) against float64
over the file's exact values, batch invariance across its 8-row passes, padding, and its checks.

The bound: the kernel multiplies the file's integers exactly (bfloat16 holds 0..15 and -128..127)
by the bfloat16-rounded activations (exact products in float32), so its only error is float32
summation: within K * 2^-24 relative of sum |x| |w| per output, and that is what is asserted
(with x rounded to bfloat16 first in the reference)."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from server.engine.quant_matmul import load_quant_matmul, pack_blocks, quantize_q8_0
from server.engine.weights import QuantizedTensor

kernel = load_quant_matmul()
pytestmark = pytest.mark.skipif(kernel is None, reason="the quantized matmul did not build on this machine")


def random_blocks(kind: str, out: int, k: int, seed: int) -> QuantizedTensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "Q8_0":
        q = torch.randint(-128, 128, (out, k), generator=g, dtype=torch.int8)                 # [out, in]
    else:
        q = torch.randint(0, 16, (out, k), generator=g, dtype=torch.uint8)                    # [out, in]
    d = (torch.rand(out, k // 32, generator=g) * 0.02).half()                                # [out, G]
    m = (torch.randn(out, k // 32, generator=g) * 0.05).half() if kind == "Q4_1" else None  # [out, G]
    return QuantizedTensor(kind, q, d, m)


def check(kind: str, out: int, k: int, rows: int, seed: int = 0, bias: bool = False) -> torch.Tensor:
    qt = random_blocks(kind, out, k, seed)
    w = qt.dequantize().double()                                                              # [out, in]
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(seed + 1))              # [M, in]
    b = torch.randn(out) if bias else None                                                    # [out]
    y = kernel.mm(x, pack_blocks(kind, qt.q, qt.scales, qt.mins), b)                          # [M, out]
    assert y.dtype == torch.float32 and y.shape == (rows, out)
    xb = x.bfloat16().double()                                                                # [M, in]
    exact = xb @ w.T + (b.double() if bias else 0)                                            # [M, out]
    bound = (k + 8) * 2.0 ** -24 * (xb.abs() @ w.abs().T + (b.double().abs() if bias else 0)) + 1e-30
    err = (y.double() - exact).abs()
    assert (err <= bound).all(), (err / bound).max().item()
    return y


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1", "Q8_0"])
@pytest.mark.parametrize("out, k", [(16, 32), (40, 96), (600, 576), (48, 1536)])
def test_within_float32_summation_of_float64_over_the_files_values(kind, out, k):
    check(kind, out, k, rows=11, seed=out + k, bias=out == 40)


@pytest.mark.parametrize("kind", ["Q4_1", "Q8_0"])
def test_each_row_is_bit_identical_whatever_its_batch(kind):
    qt = random_blocks(kind, 72, 128, 3)
    packed = pack_blocks(kind, qt.q, qt.scales, qt.mins)
    x = torch.randn(19, 128)                                                                  # [M, in]
    full = kernel.mm(x, packed, None)                                                         # [M, out]
    for start, stop in [(0, 1), (7, 8), (8, 9), (18, 19), (3, 12), (1, 19)]:
        assert torch.equal(kernel.mm(x[start:stop], packed, None), full[start:stop]), (start, stop)


def test_bfloat16_inputs_and_an_empty_batch():
    qt = random_blocks("Q4_1", 32, 64, 5)
    packed = pack_blocks("Q4_1", qt.q, qt.scales, qt.mins)
    x = torch.randn(3, 64)                                                                    # [M, in]
    assert torch.equal(kernel.mm(x.bfloat16(), packed, None), kernel.mm(x, packed, None))
    assert kernel.mm(x[:0], packed, None).shape == (0, 32)


@pytest.mark.parametrize("kind", ["Q4_0", "Q8_0"])
def test_out_writes_rows_of_a_bigger_tensor(kind):
    """quant_mm_out: the same values into rows 2 .. 6 of a wider buffer; every other element is
    left alone."""
    qt = random_blocks(kind, 40, 64, 8)
    packed = pack_blocks(kind, qt.q, qt.scales, qt.mins)
    x = torch.randn(5, 64)                                                                    # [M, in]
    bias = torch.randn(40)                                                                    # [out]
    buf = torch.full((9, 40), 7.0)                                                            # [9, out]
    got = kernel.mm(x, packed, bias, out=buf[2:7])
    assert got.data_ptr() == buf[2:7].data_ptr()
    assert torch.equal(buf[2:7], kernel.mm(x, packed, bias))
    assert (buf[:2] == 7).all() and (buf[7:] == 7).all()
    with pytest.raises(RuntimeError, match="out: float32"):
        kernel.mm(x, packed, bias, out=torch.empty(5, 40, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="out: float32"):
        kernel.mm(x, packed, bias, out=torch.empty(40, 5).t())                                # column stride 5
    with pytest.raises(RuntimeError, match="out: float32"):
        kernel.mm(x, packed, bias, out=torch.empty(4, 40))


def test_quantize_q8_0_makes_the_blocks_gguf_makes():
    w = (np.random.default_rng(0).standard_normal((24, 96)) * 0.05).astype(np.float32)
    w[3, :32] = 0.0                                                                           # an all-zero group
    raw = gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q8_0)
    ref = QuantizedTensor.from_gguf_blocks("Q8_0", raw, w.shape)
    q, d = quantize_q8_0(torch.from_numpy(w))
    assert torch.equal(q, ref.q) and torch.equal(d, ref.scales)


def test_malformed_arguments_are_clear_errors():
    qt = random_blocks("Q4_1", 32, 64, 6)
    packed = pack_blocks("Q4_1", qt.q, qt.scales, qt.mins)
    with pytest.raises(RuntimeError, match="mins: given exactly for Q4_1"):
        kernel.op(torch.randn(1, 64), packed.qw, packed.scales, None, 1, 32, None)
    with pytest.raises(RuntimeError, match="qw: packed"):
        kernel.op(torch.randn(1, 96), packed.qw, packed.scales, packed.mins, 1, 32, None)
    with pytest.raises(RuntimeError, match="x: float32 or bfloat16"):
        kernel.op(torch.randn(1, 64).double(), packed.qw, packed.scales, packed.mins, 1, 32, None)
