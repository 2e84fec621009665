"""The GPU backends of the plugin (FLASH_ATTN, TRITON_ATTN) without a GPU: which backends
register() replaces on each platform, and, under real vLLM (.venv-vllm), the subclasses built from
vLLM's arguments and run on CPU tensors with the stock kernel stood in for
(tests/vllm_plugin/gpu_attn_driver.py). What only a GPU can show (the real kernels, CUDA-graph
fallback at start-up) is not covered here."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest

from server.vllm_plugin import BACKEND_PATH, FLASH_BACKEND_PATH, TRITON_BACKEND_PATH, backend_overrides

ROOT = Path(__file__).resolve().parents[2]
VLLM_PY = ROOT / ".venv-vllm" / "bin" / "python"


def platform(kind: str) -> SimpleNamespace:
    return SimpleNamespace(is_cpu=lambda: kind == "cpu", is_cuda=lambda: kind == "cuda", is_rocm=lambda: kind == "rocm")


def test_each_platform_gets_its_backends_replaced():
    assert backend_overrides(platform("cpu")) == {"CPU_ATTN": BACKEND_PATH}
    assert backend_overrides(platform("cuda")) == {"FLASH_ATTN": FLASH_BACKEND_PATH, "TRITON_ATTN": TRITON_BACKEND_PATH}
    assert backend_overrides(platform("rocm")) == {"TRITON_ATTN": TRITON_BACKEND_PATH}
    assert backend_overrides(platform("tpu")) == {}


@pytest.mark.slow
@pytest.mark.skipif(not VLLM_PY.exists(), reason=".venv-vllm is absent: run `bash scripts/setup-vllm.sh` (CI's .ci/run does)")
def test_gpu_subclasses_under_real_vllm_keep_the_output_and_match_float64():
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VLLM_", "HEADWISE_"))}
    r = subprocess.run([str(VLLM_PY), str(Path(__file__).with_name("gpu_attn_driver.py"))], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    results = {d["backend"]: d for d in map(json.loads, (ln for ln in r.stdout.splitlines() if ln.startswith("{")))}
    assert set(results) == {"FLASH_ATTN", "TRITON_ATTN"}
    for name, d in results.items():
        assert d["class"].startswith("Headwise") and d["name"] == name        # vLLM still sees its own backend name
        assert d["stock_calls"] == 1 and d["output_untouched"]                # the stock kernel wrote the output
        assert d["disabled"] is None and d["rows"] == 4 and d["counts"] == [[4] * 9]
        assert d["max_abs_diff"] < 5e-5                                       # 4 rows of [H, 5] sums vs float64
        assert d["graph_support_sampling"] == d["never"]                      # attention stays eager while sampling
        assert d["graph_support_off"] == d["graph_support_stock"]             # rate 0: vLLM's own graphs
