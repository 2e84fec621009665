"""The Triton kernels (decode and prefill attention, the K/V store, the layer ops) compile for a CUDA GPU without one: Triton's compiler lowers them to PTX and
its bundled ptxas to a cubin for sm_90 (H100 / H200), for fp32, bf16 and fp16 caches, with and
without split-K. The interpreter (test_triton_paged.py) accepts code a GPU compile rejects (a
non-constexpr global, a dot shape under 16), so this catches what it cannot. Runs in a subprocess
without TRITON_INTERPRET: the interpreter, once chosen, holds for the whole process."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytest.importorskip("triton", reason="triton is not installed (scripts/setup.sh installs it with the dev extra)")

SCRIPT = r"""
import sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from server.engine import triton_layer_ops as tlo
from server.engine.attention import triton_kernels as tk
from server.engine.attention import triton_prefill as tp

def compile_kernel(fn, pointers, scalars, consts, num_warps):
    names = fn.arg_names
    sig = {n: "*" + pointers[n] if n in pointers else "constexpr" if n in consts else scalars.get(n, "i32")
           for n in names}
    src = ASTSource(fn=fn, signature=sig, constexprs={(names.index(k),): v for k, v in consts.items()})
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps, "enable_fp_fusion": True})

for dt in ("fp32", "bf16", "fp16"):
    io = dict(Q=dt, K=dt, V=dt, OUT=dt, TABLE="i32", LENS="i32", FLAGS="i32", KW="fp32", ACC="fp32",
              PART_O="fp32", PART_M="fp32", PART_A="fp32")
    for direct in (True, False):
        consts = dict(H=9, G=3, D=64, BS=16, C=2, S=4, BLOCK_G=16, BLOCK_D=64, BLOCK_N=64, BLOCK_C=2,
                      DIRECT=direct, PRECISION="ieee" if dt == "fp32" else "tf32", UPCAST=False)
        k = compile_kernel(tk.decode_split_kernel, io, {"scale": "fp32"}, consts, 4)
        assert k.asm["cubin"], (dt, direct)
    k = compile_kernel(tk.decode_reduce_kernel, io, {}, dict(H=9, D=64, C=2, S=4, BLOCK_D=64, BLOCK_C=2), 1)
    assert k.asm["cubin"], dt
    for src in ("fp32", "bf16"):
        k = compile_kernel(tk.store_kv_kernel, dict(K=src, V=src, SLOTS="i64", K_CACHE=dt, V_CACHE=dt), {},
                           dict(KVH=3, D=64, BLOCK_H=4, BLOCK_D=64, SOFT_ROUND=False), 1)
        assert k.asm["cubin"], (src, dt)

# the prefill kernel (attention/triton_prefill.py), its production tiles
for dt in ("fp32", "bf16", "fp16"):
    io = dict(Q=dt, K=dt, V=dt, OUT=dt, TABLE="i32", QSTART="i32", LENS="i32")
    consts = dict(G=3, D=64, BS=16, BLOCK_M=64, BLOCK_N=64, BLOCK_D=64,
                  PRECISION="ieee" if dt == "fp32" else "tf32", UPCAST=False)
    k = compile_kernel(tp.prefill_kernel, io, {"qk_scale": "fp32"}, consts, 4)
    assert k.asm["cubin"], dt

# the layer ops (server/engine/triton_layer_ops.py) at SmolLM2-135M's widths and Llama-3.2-1B's
for dt in ("bf16", "fp16"):
    for y in ("fp32", dt):
        for add in (True, False):
            for c, block in ((576, 1024), (2048, 2048)):
                k = compile_kernel(tlo.rms_norm_kernel, dict(X="fp32", Y=y, W="fp32", OUT=dt), {"eps": "fp32"},
                                   dict(C=c, BLOCK_C=block, ADD=add, SOFT_ROUND=False), tlo.num_warps(block))
                assert k.asm["cubin"], (dt, y, add, c)
    for i, block in ((1536, 2048), (8192, 4096)):
        k = compile_kernel(tlo.silu_mul_kernel, dict(GU=dt, OUT=dt), {}, dict(I=i, BLOCK_I=block, SOFT_ROUND=False),
                           tlo.num_warps(block))
        assert k.asm["cubin"], (dt, i)
    for h, kvh, d in ((9, 3, 64), (32, 8, 64)):
        bh, bf = triton.next_power_of_2(h + kvh), triton.next_power_of_2(d // 2)
        k = compile_kernel(tlo.qkv_rope_kernel, dict(QKV=dt, COS="fp32", SIN="fp32", Q=dt, K=dt, V=dt), {},
                           dict(H=h, KVH=kvh, D=d, BLOCK_HEADS=bh, BLOCK_HALF=bf,
                                BLOCK_V=triton.next_power_of_2(kvh * d), SOFT_ROUND=False), tlo.num_warps(bh * bf))
        assert k.asm["cubin"], (dt, h)
print("compiled")
"""


@pytest.mark.slow
def test_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300,
                          cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))))
    assert done.returncode == 0 and "compiled" in done.stdout, done.stderr[-3000:]
