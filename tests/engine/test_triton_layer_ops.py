"""The Triton layer ops (server/engine/triton_layer_ops.py) against float64 math of the same
formulas (within one step of the output dtype) and against the torch ops they replace, on tiny
shapes: widths that are powers of two and not (C = 64, 72, 576; I = 72, 576 and 4100, two column
tiles; D = 64 and 24), bfloat16 and float16 activations, float32 / bfloat16 / float16 inputs;
add_rms_norm's in-place float32 add bit for bit, rounding to nearest even, batch invariance
(a row alone gives the bits it gets among nine) and the ValueErrors of bad inputs.

Without CUDA they run in Triton's CPU interpreter (tests/conftest.py imports the kernels under
TRITON_INTERPRET=1 before any test module; the `tlo` fixture reloads the module if something
imported it earlier without the variable). With CUDA they run the compiled kernels on the GPU.
The last test runs the engine on these ops in place of the C++ ones."""

from __future__ import annotations

import importlib
import math

import pytest
import torch
import torch.nn.functional as F

from server.engine.model import apply_rope

pytest.importorskip("triton", reason="triton is not installed (scripts/setup.sh installs it with the dev extra)")

HALF = [torch.bfloat16, torch.float16]
INPUTS = [torch.float32, torch.bfloat16, torch.float16]
EPS = 1e-5


@pytest.fixture(scope="module")
def tlo(triton_dev):
    """server.engine.triton_layer_ops, built by the interpreter where the attention kernels are
    (no CUDA): reloaded if something imported it earlier without TRITON_INTERPRET."""
    from server.engine.attention import triton_kernels

    mod = importlib.import_module("server.engine.triton_layer_ops")
    if triton_kernels.interpreted() and not mod.interpreted():
        mod = importlib.reload(mod)  # rebuild the kernels in the interpreter
    return mod


@pytest.fixture(scope="module")
def dev(triton_dev: torch.device) -> torch.device:
    return triton_dev


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def ulp(ref: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The spacing of dtype's values at |ref| (float64): 2^(floor(log2 |ref|) - mantissa bits),
    subnormal spacing below the smallest normal."""
    mant, emin = {torch.bfloat16: (7, -126), torch.float16: (10, -14)}[dtype]
    e = torch.floor(torch.log2(ref.abs().clamp_min(2.0 ** emin)))              # [...]
    return torch.exp2(e - mant)                                                 # [...]


def assert_within_ulp(got: torch.Tensor, ref64: torch.Tensor, slack: torch.Tensor | float = 0.0) -> None:
    """got (dtype) within one step of dtype of ref64 rounded to dtype (plus slack, float64)."""
    ref = ref64.to(got.dtype).double()                                          # [...]
    err = (got.cpu().double() - ref).abs()                                      # [...]
    bound = ulp(ref, got.dtype) + slack                                         # [...]
    assert not got.isnan().any() and (err <= bound).all(), f"max error {(err - bound).max()} over the bound"


def rms_ref(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """float64 RMSNorm of x [T, C] with weight w [C]."""
    x, w = x.double().cpu(), w.double().cpu()                                  # [T, C], [C]
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + EPS) * w            # [T, C]


def silu_ref(gate_up: torch.Tensor) -> torch.Tensor:
    """float64 silu(gate) * up of gate_up [T, 2I]."""
    g, u = gate_up.double().cpu().chunk(2, dim=-1)                             # [T, I] x2
    return g / (1 + torch.exp(-g)) * u                                          # [T, I]


def rope_inputs(rows: int, h: int, kvh: int, d: int, dtype: torch.dtype, seed: int):
    """qkv [T, (H + 2 KVH) D] of dtype; cos, sin float32 [T, D] in model.py's rotate-half layout
    at random positions."""
    g = gen(seed)
    qkv = (torch.randn(rows, (h + 2 * kvh) * d, generator=g) * 2).to(dtype)   # [T, W]
    pos = torch.randint(0, 4096, (rows,), generator=g).float()                 # [T]
    inv_freq = 10000.0 ** (-torch.arange(0, d, 2).float() / d)                  # [D/2]
    angles = torch.outer(pos, inv_freq)                                         # [T, D/2]
    emb = torch.cat([angles, angles], dim=-1)                                   # [T, D]
    return qkv, emb.cos(), emb.sin()


def rope_ref(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, h: int, kvh: int):
    """float64 rotated q and k heads [T, H + KVH, D] and the float64 size of their two terms
    (|x| |cos| + |rotate_half(x)| |sin|), the scale of float32's rounding error."""
    rows, d = cos.shape
    x = qkv.double()[:, :(h + kvh) * d].reshape(rows, h + kvh, d)              # [T, H + KVH, D]
    rot = torch.cat([-x[..., d // 2:], x[..., :d // 2]], dim=-1)                # [T, H + KVH, D]
    c, s = cos.double()[:, None, :], sin.double()[:, None, :]                   # [T, 1, D]
    return x * c + rot * s, x.abs() * c.abs() + rot.abs() * s.abs()            # [T, H + KVH, D] x2


@pytest.mark.parametrize("c", [64, 72, 576])
@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_rms_norm_within_one_step_of_float64_and_torch(tlo, dev, dtype, c):
    g = gen(c)
    x = torch.randn(5, c, generator=g) * 3                                      # [T, C]
    x[1] *= 1e-3
    x[2] *= 1e3
    w = torch.randn(c, generator=g)                                             # [C]
    x0 = x.clone()                                                              # [T, C]
    got = tlo.triton_layer_ops(dtype).rms_norm(x.to(dev), w.to(dev), EPS)      # [T, C]
    assert got.dtype == dtype and got.shape == (5, c) and got.device.type == dev.type and got.is_contiguous()
    assert torch.equal(x, x0)
    assert_within_ulp(got, rms_ref(x, w))
    assert_within_ulp(got, F.rms_norm(x, (c,), w, EPS).to(dtype).double())


@pytest.mark.parametrize("c", [72, 576])
@pytest.mark.parametrize("y_dtype", INPUTS, ids=str)
@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_add_rms_norm_adds_in_place_then_norms(tlo, dev, dtype, y_dtype, c):
    """x += y in place is torch's float32 add bit for bit (y widened exactly); the result is
    rms_norm of the new x, bit for bit, within one step of float64."""
    g = gen(c + 1)
    x = (torch.randn(4, c, generator=g) * 3).to(dev)                            # [T, C]
    y = (torch.randn(4, c, generator=g) * 2).to(y_dtype).to(dev)                # [T, C]
    w = torch.randn(c, generator=g).to(dev)                                     # [C]
    want_x = x + y.float()                                                      # [T, C]
    ops = tlo.triton_layer_ops(dtype)
    got = ops.add_rms_norm(x, y, w, EPS)                                        # [T, C]
    assert got.dtype == dtype and got.shape == (4, c)
    assert torch.equal(x, want_x)
    assert torch.equal(got, ops.rms_norm(want_x, w, EPS))
    assert_within_ulp(got, rms_ref(want_x, w))
    assert_within_ulp(got, F.rms_norm(want_x.cpu(), (c,), w.cpu(), EPS).to(dtype).double())


@pytest.mark.parametrize("inter", [72, 576, 4100])  # 4100: two column tiles, the second masked
@pytest.mark.parametrize("in_dtype", INPUTS, ids=str)
@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_silu_mul_within_one_step_of_float64_and_torch(tlo, dev, dtype, in_dtype, inter):
    g = gen(inter)
    gate_up = torch.randn(3, 2 * inter, generator=g) * 4                       # [T, 2I]
    gate_up[0, :6] = torch.tensor([-200.0, 200.0, 0.0, -80.0, 80.0, -20.0])     # exp's range ends, exactly 0
    gate_up = gate_up.to(in_dtype)                                              # [T, 2I]
    got = tlo.triton_layer_ops(dtype).silu_mul(gate_up.to(dev))                 # [T, I]
    assert got.dtype == dtype and got.shape == (3, inter) and got.is_contiguous()
    assert got.isfinite().all()
    assert_within_ulp(got, silu_ref(gate_up))
    gate, up = gate_up.float().chunk(2, dim=-1)                                 # [T, I] x2
    assert_within_ulp(got, (F.silu(gate) * up).to(dtype).double())


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_silu_mul_of_a_tiny_sigmoid_stays_finite(tlo, dev, dtype):
    """g = -90, -1000: exp(-|g|) is subnormal or 0 in float32; the result is tiny, never NaN."""
    gate_up = torch.tensor([[-90.0, -1000.0, 1000.0, 3.0, 3.0, 2.0]])          # [1, 2I]
    got = tlo.triton_layer_ops(dtype).silu_mul(gate_up.to(dev)).cpu().double()  # [1, I]
    assert got[0, 0].abs() < 1e-30 and got[0, 1] == 0 and got[0, 2] == 2000.0


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_outputs_round_to_nearest_even(tlo, dev, dtype):
    """silu(128) = 128 exactly in float32, so silu_mul's output is 128 u rounded: ties (half a
    step) go to the even neighbour, as torch's cast does; inf and NaN pass through."""
    mant = 7 if dtype == torch.bfloat16 else 10
    step = 2.0 ** -mant
    u = torch.tensor([1 + step / 2, 1 + 3 * step / 2, 1 + step / 2 + 2 ** -20, -(1 + step / 2),
                      1 + step / 4, 1.0, 2.0 - step / 4, float("inf"), float("nan")])  # [I]
    gate_up = torch.cat([torch.full_like(u, 128.0), u])[None, :]                # [1, 2I]
    got = tlo.triton_layer_ops(dtype).silu_mul(gate_up.to(dev)).cpu()           # [1, I]
    want = (128 * u).to(dtype)[None, :]                                         # [1, I]
    assert torch.equal(got[:, :-1], want[:, :-1]) and got[0, -1].isnan()


@pytest.mark.parametrize("hkd", [(9, 3, 64), (4, 2, 24)], ids=["9-3-64", "4-2-24"])
@pytest.mark.parametrize("dtype", INPUTS, ids=str)
def test_qkv_rope_against_float64_and_apply_rope(tlo, dev, dtype, hkd):
    h, kvh, d = hkd
    rows = 4
    qkv, cos, sin = rope_inputs(rows, h, kvh, d, dtype, seed=d)                 # [T, W], [T, D] x2
    q, k, v = tlo.qkv_rope(qkv.to(dev), cos.to(dev), sin.to(dev), h, kvh)      # [T, H, D], [T, KVH, D] x2
    for t, heads in ((q, h), (k, kvh), (v, kvh)):
        assert t.dtype == dtype and t.shape == (rows, heads, d) and t.is_contiguous()
    assert torch.equal(v.cpu(), qkv[:, (h + kvh) * d:].reshape(rows, kvh, d))
    got = torch.cat([q, k], dim=1).cpu()                                        # [T, H + KVH, D]
    ref, terms = rope_ref(qkv, cos, sin, h, kvh)                                # [T, H + KVH, D] x2
    torch_op = apply_rope(qkv.float()[:, :(h + kvh) * d].reshape(rows, h + kvh, d), cos, sin)  # [T, H + KVH, D]
    if dtype == torch.float32:
        assert ((got.double() - ref).abs() <= 1e-6 * terms).all()
        assert ((got - torch_op).abs().double() <= 1e-6 * terms).all()
    else:
        # float32's own rounding (a few 2^-24 of the terms) may show where the terms cancel
        assert_within_ulp(got, ref, slack=2.0 ** -22 * terms)
        assert_within_ulp(got, torch_op.to(dtype).double(), slack=2.0 ** -22 * terms)


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_rows_are_batch_invariant(tlo, dev, dtype):
    """Each op on a batch of nine rows, and on each row alone: the same bits."""
    g = gen(9)
    ops = tlo.triton_layer_ops(dtype)
    x = (torch.randn(9, 72, generator=g) * 3).to(dev)                           # [T, C]
    y = torch.randn(9, 72, generator=g).to(dtype).to(dev)                       # [T, C]
    w = torch.randn(72, generator=g).to(dev)                                    # [C]
    gate_up = (torch.randn(9, 144, generator=g) * 4).to(dtype).to(dev)          # [T, 2I]
    qkv, cos, sin = (t.to(dev) for t in rope_inputs(9, 4, 2, 24, dtype, seed=9))  # [T, W], [T, D] x2

    norm = ops.rms_norm(x, w, EPS)                                              # [T, C]
    x_batch = x.clone()                                                         # [T, C]
    added = ops.add_rms_norm(x_batch, y, w, EPS)                                # [T, C]
    act = ops.silu_mul(gate_up)                                                 # [T, I]
    qkv_out = ops.qkv_rope(qkv, cos, sin, 4, 2)
    for i in range(9):
        r = slice(i, i + 1)
        assert torch.equal(ops.rms_norm(x[r].clone(), w, EPS), norm[r])
        x_row = x[r].clone()                                                    # [1, C]
        assert torch.equal(ops.add_rms_norm(x_row, y[r].clone(), w, EPS), added[r])
        assert torch.equal(x_row, x_batch[r])
        assert torch.equal(ops.silu_mul(gate_up[r].clone()), act[r])
        for alone, batch in zip(ops.qkv_rope(qkv[r].clone(), cos[r].clone(), sin[r].clone(), 4, 2), qkv_out):
            assert torch.equal(alone, batch[r])


def test_empty_batch(tlo, dev):
    ops = tlo.triton_layer_ops(torch.bfloat16)
    x, w = torch.empty(0, 64, device=dev), torch.ones(64, device=dev)          # [0, C], [C]
    assert ops.rms_norm(x, w, EPS).shape == (0, 64)
    assert ops.add_rms_norm(x, x.clone(), w, EPS).shape == (0, 64)
    assert ops.silu_mul(torch.empty(0, 16, device=dev)).shape == (0, 8)
    q, k, v = ops.qkv_rope(torch.empty(0, 5 * 8, device=dev), torch.empty(0, 8, device=dev),
                           torch.empty(0, 8, device=dev), 3, 1)
    assert q.shape == (0, 3, 8) and k.shape == v.shape == (0, 1, 8)


def test_bad_inputs_raise_value_errors(tlo, dev):
    ops = tlo.triton_layer_ops(torch.float16)
    x = torch.randn(3, 64, device=dev)                                          # [T, C]
    w = torch.ones(64, device=dev)                                              # [C]
    qkv = torch.randn(3, 5 * 8, device=dev)                                     # [T, (H + 2 KVH) D], H 3, KVH 1, D 8
    cs = torch.ones(3, 8, device=dev)                                           # [T, D]
    cases = [
        (lambda: tlo.triton_layer_ops(torch.float32), "bfloat16 or float16"),
        (lambda: ops.rms_norm(x.half(), w, EPS), "x: expected dtype"),
        (lambda: ops.rms_norm(x[:, ::2], w[:32], EPS), "x: must be contiguous"),
        (lambda: ops.rms_norm(x[0], w, EPS), r"x: expected \[T, width\]"),
        (lambda: ops.rms_norm(x, w[:32], EPS), r"w: expected float32 \[64\]"),
        (lambda: ops.rms_norm(x, w.half(), EPS), r"w: expected float32 \[64\]"),
        (lambda: ops.add_rms_norm(x, x[:, :32].contiguous(), w, EPS), "y: expected the shape of x"),
        (lambda: ops.add_rms_norm(x, x.double(), w, EPS), "y: expected dtype"),
        (lambda: ops.add_rms_norm(x, x.t().contiguous().t(), w, EPS), "y: must be contiguous"),
        (lambda: ops.silu_mul(x[:, :63].contiguous()), "even width"),
        (lambda: ops.silu_mul(x.double()), "gate_up: expected dtype"),
        (lambda: ops.silu_mul(x[:, ::2]), "gate_up: must be contiguous"),
        (lambda: ops.qkv_rope(qkv, cs, cs, 4, 1), "not a multiple of H \\+ 2 KVH = 6"),
        (lambda: ops.qkv_rope(torch.randn(3, 5 * 7, device=dev), cs[:, :7].contiguous(), cs[:, :7].contiguous(), 3, 1),
         "head_dim 7 must be even"),
        (lambda: ops.qkv_rope(qkv, cs.half(), cs, 3, 1), r"cos: expected float32 \[3, 8\]"),
        (lambda: ops.qkv_rope(qkv, cs, cs[:2], 3, 1), r"sin: expected float32 \[3, 8\]"),
        (lambda: ops.qkv_rope(qkv, cs, torch.ones(8, 3, device=dev).t(), 3, 1), "sin: expected float32"),
        (lambda: ops.qkv_rope(qkv, cs, cs, 0, 1), "positive ints"),
        (lambda: ops.qkv_rope(qkv.int(), cs, cs, 3, 1), "qkv: expected dtype"),
    ]
    if dev.type == "cuda":
        cases.append((lambda: ops.rms_norm(x, w.cpu(), EPS), "different devices"))
        cases.append((lambda: ops.silu_mul(x.cpu()), "run on CUDA tensors"))
    for call, match in cases:
        with pytest.raises(ValueError, match=match):
            call()
    assert math.isfinite(float(ops.rms_norm(x, w, EPS).float().sum()))  # the good inputs still work


@pytest.mark.slow
def test_the_engine_on_the_triton_layer_ops(tlo, dev, tiny_llama_dir, monkeypatch):
    """What CUDA runs with --dtype bfloat16 (the Triton ops and the Triton attention backend), on
    this device: the same greedy tokens and first-token logprobs within bfloat16 rounding of the
    C++ ops' (which keep q, k, v in float32 where the Triton ops round them to bfloat16)."""
    from server.config import CacheConfig, EngineConfig, SchedulerConfig
    from server.engine import model as model_module
    from server.engine.engine import Engine
    from server.engine.request import SamplingParams

    def engine() -> Engine:
        return Engine(EngineConfig(model=tiny_llama_dir, device=str(dev), dtype="bfloat16", attention_backend="triton",
                                   cache=CacheConfig(num_blocks=64),
                                   scheduler=SchedulerConfig(max_model_len=128, max_num_batched_tokens=16)))

    reference = engine()
    if dev.type == "cpu":
        monkeypatch.setattr(model_module, "load_layer_ops", lambda: tlo.triton_layer_ops(torch.bfloat16))
    fused = engine()
    assert fused.runner.model.layer_ops is not None
    assert fused.runner.model.layer_ops.rms_norm is not reference.runner.model.layer_ops.rms_norm or dev.type != "cpu"
    prompts = ["The capital of France is", "Hello world! 1 2 3 4 5 6 7 8 9 10. A quick brown fox jumps over"]
    greedy = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, logprobs=5)
    for got, want in zip(fused.generate(prompts, greedy), reference.generate(prompts, greedy)):
        assert got.token_ids == want.token_ids
        a, b = dict(got.logprobs[0].top), dict(want.logprobs[0].top)
        assert max(abs(a[t] - b[t]) for t in a.keys() & b.keys()) < 0.05
