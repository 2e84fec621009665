"""Run by tests/vllm_plugin/test_gpu_attn.py with .venv-vllm's Python (never imported by pytest):
the FLASH_ATTN and TRITON_ATTN telemetry subclasses built and called on CPU tensors, with the
stock GPU kernel (flash_attn_varlen_func / unified_attention) replaced by a stand-in that writes
a known output, since neither kernel runs without a GPU. Prints one JSON line per backend.

    .venv-vllm/bin/python tests/vllm_plugin/gpu_attn_driver.py

Checks per backend: the impl builds from vLLM's arguments, the stock forward is called and its
output returned untouched, and the statistics of a mixed step (decodes and a prefill chunk) over
a cache in the backends' [NB, KVH, BS, 2 D] layout equal float64 (tests/vllm_plugin/test_paged.py's
reference); the builder reports no full CUDA-graph support while sampling; the registry resolves
the enum to the subclass.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
os.environ["HEADWISE_TELEMETRY_SAMPLE_RATE"] = "1.0"

import torch  # noqa: E402

from tests.vllm_plugin.paged_fixtures import D, H, KVH, reference, split_cache  # noqa: E402


class Meta(SimpleNamespace):
    """Attention metadata with the fields the test sets; every other field reads None."""

    def __getattr__(self, name: str):
        return None


def check(backend_name: str) -> dict:
    import vllm.v1.attention.backends.flash_attn as fa
    import vllm.v1.attention.backends.triton_attn as ta
    from vllm.v1.attention.backend import AttentionCGSupport
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    from server.vllm_plugin import FLASH_BACKEND_PATH, TRITON_BACKEND_PATH

    path = {"FLASH_ATTN": FLASH_BACKEND_PATH, "TRITON_ATTN": TRITON_BACKEND_PATH}[backend_name]
    register_backend(AttentionBackendEnum[backend_name], path)
    backend = AttentionBackendEnum[backend_name].get_class()
    impl = backend.get_impl_cls()(H, D, 1 / math.sqrt(D), KVH, None, None, "auto")
    marker = torch.full((1,), 0.5)
    calls = []

    def stock_kernel(*args, **kwargs):
        out = kwargs["out"]
        calls.append(out.shape)
        out.copy_(marker.expand_as(out))
        return out

    if backend_name == "FLASH_ATTN":
        fa.flash_attn_varlen_func = stock_kernel
        impl.vllm_flash_attn_version = 2                   # no GPU: nothing detected
    else:
        ta.unified_attention = stock_kernel

    g = torch.Generator().manual_seed(1)
    lens = [1, 16, 17, 40]                                 # 3 decodes, then a 6-token prefill chunk of 40
    keys = [torch.randn(n, KVH, D, generator=g) * 2 for n in lens]
    cache, table = split_cache(keys, num_blocks=16)
    qsl = torch.tensor([0, 1, 2, 3, 9], dtype=torch.int32)
    q = torch.randn(9, H, D, generator=g) * 2              # [T, H, D]
    meta = Meta(query_start_loc=qsl, seq_lens=torch.tensor(lens, dtype=torch.int32), block_table=table,
                num_actual_tokens=9, max_query_len=6, max_seq_len=40, causal=True)
    layer = SimpleNamespace(layer_name="model.layers.0.self_attn.attn", _k_scale=torch.ones(1),
                            _v_scale=torch.ones(1), _q_scale=torch.ones(1), _k_scale_float=1.0, _v_scale_float=1.0)
    output = torch.zeros(9, H, D)
    out = impl.forward(layer, q, q[:, :KVH], q[:, :KVH], cache, meta, output)
    stats = impl.headwise.snapshot()
    rows = [q[0], q[1], q[2], q[8]]
    want = sum(reference(rows[b], keys[b]) for b in range(4))              # [H, 5]
    builder = backend.get_builder_cls()
    sampling = builder.get_cudagraph_support(None, None).name
    os.environ["HEADWISE_TELEMETRY_SAMPLE_RATE"] = "0"
    off = builder.get_cudagraph_support(None, None).name
    vllm_builder = next(c for c in builder.__mro__ if c.__module__.startswith("vllm."))   # the stock class
    stock = vllm_builder.get_cudagraph_support(None, None).name
    os.environ["HEADWISE_TELEMETRY_SAMPLE_RATE"] = "1.0"
    return {"backend": backend_name, "class": backend.__name__, "name": backend.get_name(),
            "stock_calls": len(calls), "output_untouched": bool(torch.equal(out, marker.expand_as(out))),
            "disabled": impl.headwise.disabled, "rows": stats.rows, "counts": stats.counts.tolist(),
            "max_abs_diff": float((stats.sums[0] - want).abs().max()),
            "graph_support_sampling": sampling, "graph_support_off": off, "graph_support_stock": stock,
            "never": AttentionCGSupport.NEVER.name}


def main() -> None:
    for name in ("FLASH_ATTN", "TRITON_ATTN"):
        print(json.dumps(check(name)), flush=True)


if __name__ == "__main__":
    main()
