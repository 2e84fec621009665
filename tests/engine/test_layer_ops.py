"""The fused CPU layer ops (server/engine/layer_ops.py) against the torch ops they replace, and a
quantized model with and without them."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import server.engine.model as model_module
from server.config import CacheConfig, EngineConfig
from server.engine.engine import Engine
from server.engine.layer_ops import load_layer_ops
from server.engine.model import apply_rope
from server.engine.request import SamplingParams

ops = load_layer_ops()
pytestmark = pytest.mark.skipif(ops is None, reason="the C++ layer ops could not be built here (see the log)")


@pytest.mark.parametrize("rows", [1, 3, 64, 300])  # 300: split over the threads
def test_rms_norm_bf16_equals_torch_then_cast(rows):
    x = torch.randn(rows, 576) * 3                                         # [T, C]
    w = torch.randn(576)                                                   # [C]
    got = ops.rms_norm(x, w, 1e-5)                                    # [T, C] bf16
    want = F.rms_norm(x, w.shape, w, 1e-5).to(torch.bfloat16)              # [T, C]
    assert got.dtype == torch.bfloat16
    # the sum of squares may be accumulated in another order: at most one bfloat16 step apart
    assert ((got.float() - want.float()).abs() <= want.float().abs() * 2 ** -7 + 1e-30).all()
    assert (got == want).float().mean() > 0.99


@pytest.mark.parametrize("y_dtype", [torch.float32, torch.bfloat16])  # bf16: a GEMM's own output
@pytest.mark.parametrize("rows", [1, 16, 300])  # 300: split over the threads
def test_add_rms_norm_bf16_is_the_add_then_the_norm(rows, y_dtype):
    """x += y in place with torch's float32 sums (a bfloat16 y widened exactly), and the norm of
    the sum, bit for bit."""
    x, y = torch.randn(rows, 576) * 3, torch.randn(rows, 576).to(y_dtype)  # [T, C]
    w = torch.randn(576)                                                   # [C]
    want_x = x + y.float()                                                 # [T, C]
    want = ops.rms_norm(want_x, w, 1e-5)                              # [T, C] bf16
    got = ops.add_rms_norm(x, y, w, 1e-5)
    assert torch.equal(x, want_x) and torch.equal(got, want)
    with pytest.raises(RuntimeError, match="y: float32"):
        ops.add_rms_norm(x, y[:, :8].contiguous(), w, 1e-5)
    with pytest.raises(RuntimeError, match="y: float32 or bfloat16"):
        ops.add_rms_norm(x, y.half(), w, 1e-5)
    with pytest.raises(RuntimeError, match="x: float32"):
        ops.add_rms_norm(x.double(), y, w, 1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("rows", [5, 300])  # 300: split over the threads
def test_silu_mul_bf16_equals_torch(dtype, rows):
    gate_up = (torch.randn(rows, 2 * 1536) * 4).to(dtype)                 # [T, 2 I]
    gate_up[0, :4] = torch.tensor([-200.0, 200.0, 0.0, -90.0])             # exp's range ends, exactly 0
    gate, up = gate_up.float().chunk(2, dim=-1)                            # [T, I] x2
    want = (F.silu(gate) * up).to(torch.bfloat16)                          # [T, I]
    got = ops.silu_mul(gate_up)                                       # [T, I]
    assert got.shape == want.shape
    assert ((got.float() - want.float()).abs() <= want.float().abs() * 2 ** -7 + 1e-30).all()


def test_a_row_gets_the_same_bits_alone_and_in_a_threaded_call():
    """Rows of a big call (a prefill chunk) are split over the threads; a decode row's result
    must not depend on that."""
    x, w = torch.randn(300, 576), torch.randn(576)                         # [T, C], [C]
    gate_up = torch.randn(300, 2 * 1536)                                   # [T, 2 I]
    qkv, cos, sin = torch.randn(300, 15 * 64), torch.randn(300, 64), torch.randn(300, 64)
    norm, act, rope = ops.rms_norm(x, w, 1e-5), ops.silu_mul(gate_up), ops.qkv_rope(qkv, cos, sin, 9, 3)
    for i in (0, 150, 299):
        assert torch.equal(ops.rms_norm(x[i:i + 1], w, 1e-5), norm[i:i + 1])
        assert torch.equal(ops.silu_mul(gate_up[i:i + 1]), act[i:i + 1])
        alone = ops.qkv_rope(qkv[i:i + 1], cos[i:i + 1], sin[i:i + 1], 9, 3)
        assert all(torch.equal(a, b[i:i + 1]) for a, b in zip(alone, rope))


@pytest.mark.parametrize("heads, kv_heads", [(9, 3), (4, 4), (8, 2)])
def test_qkv_rope_equals_apply_rope(heads, kv_heads):
    d, t = 64, 7
    qkv = torch.randn(t, (heads + 2 * kv_heads) * d)                       # [T, (H + 2 KVH) D]
    angles = torch.rand(t, d // 2) * 50                                    # [T, D/2]
    emb = torch.cat([angles, angles], dim=-1)                              # [T, D]
    cos, sin = emb.cos(), emb.sin()
    q, k, v = ops.qkv_rope(qkv, cos, sin, heads, kv_heads)
    qk, v_ref = qkv.split([(heads + kv_heads) * d, kv_heads * d], dim=-1)
    ref = apply_rope(qk.view(t, heads + kv_heads, d), cos, sin)            # [T, H + KVH, D]
    torch.testing.assert_close(q, ref[:, :heads], rtol=0, atol=1e-6)
    torch.testing.assert_close(k, ref[:, heads:], rtol=0, atol=1e-6)
    assert torch.equal(v, v_ref.reshape(t, kv_heads, d))
    q16, _, v16 = ops.qkv_rope(qkv.bfloat16(), cos, sin, heads, kv_heads)  # bfloat16 in, float32 out
    assert q16.dtype == torch.float32 and torch.equal(v16, v_ref.bfloat16().float().reshape(t, kv_heads, d))


def test_bad_shapes_are_errors_not_crashes():
    with pytest.raises(RuntimeError, match="x: float32"):
        ops.rms_norm(torch.randn(3, 8).double(), torch.randn(8), 1e-5)
    with pytest.raises(RuntimeError, match="multiple of H"):
        ops.qkv_rope(torch.randn(2, 100), torch.randn(2, 10), torch.randn(2, 10), 9, 3)
    with pytest.raises(RuntimeError, match="gate_up"):
        ops.silu_mul(torch.randn(2, 7))


def test_a_quantized_model_generates_the_same_with_and_without_them(tiny_llama_q4_dir, monkeypatch):
    def engine() -> Engine:
        return Engine(EngineConfig(model=tiny_llama_q4_dir, cache=CacheConfig(num_blocks=160)))

    fused = engine()
    monkeypatch.setattr(model_module, "load_layer_ops", lambda: None)
    plain = engine()
    assert fused.runner.model.layer_ops is not None and plain.runner.model.layer_ops is None
    assert Engine(EngineConfig(model=tiny_llama_q4_dir, weight_format="fp32",
                               cache=CacheConfig(num_blocks=160))).runner.model.layer_ops is None
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, head_telemetry=True)
    prompts = ["The capital of France is", "Hello world! 1 2 3", "Attention heads look back"]
    a, b = fused.generate(prompts, params), plain.generate(prompts, params)
    # the same roundings in another order: nearly always the same tokens on this model
    same = sum(x.token_ids == y.token_ids for x, y in zip(a, b))
    assert same >= 2, [(x.token_ids, y.token_ids) for x, y in zip(a, b)]
