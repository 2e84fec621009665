"""headwise's per-head attention telemetry inside a stock vLLM server (a vLLM plugin).

Three entry points, all named `headwise` (pyproject.toml):

- `vllm.general_plugins` -> register(): in every vLLM process, points the platform's attention
  backends at telemetry subclasses (CPU_ATTN: cpu_attn.py; FLASH_ATTN and TRITON_ATTN:
  gpu_attn.py), which run the stock kernel and, on a `HEADWISE_TELEMETRY_SAMPLE_RATE` fraction of
  steps, compute the accumulators of server.engine.telemetry from q and the paged K cache
  (impl.py, layer.py, paged.py).
- the worker extension (worker.py, `--worker-extension-cls`): each rank reports its cumulative
  sums over collective_rpc (snapshot.py is the contract).
- `vllm.endpoint_plugins` (opt-in: `VLLM_PLUGINS=headwise`) -> endpoint.HeadwiseEndpoint: in the
  API process, merges the ranks' reports on each scrape and exports them through vLLM's own
  /metrics with headwise serve's family names and labels (export.py), plus
  headwise_telemetry_up and headwise_telemetry_layer_disabled; GET /v1/telemetry (windowed, in
  headwise's JSON: feed.py) and GET /dashboard, headwise's operations page.

`python -m server.vllm_plugin.model_dir` prints the Hugging Face folder vLLM loads for a headwise
model (the default model's GGUF converted once); scripts/serve-vllm.sh wires it all up.

This package never imports headwise's engine loop; vLLM is imported only by cpu_attn.py,
gpu_attn.py, worker.py and endpoint.py (and inside register()), so the math is tested without vLLM.
"""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)

BACKEND_PATH = "server.vllm_plugin.cpu_attn.HeadwiseCPUAttentionBackend"
FLASH_BACKEND_PATH = "server.vllm_plugin.gpu_attn.HeadwiseFlashAttentionBackend"
TRITON_BACKEND_PATH = "server.vllm_plugin.gpu_attn.HeadwiseTritonAttentionBackend"


def backend_overrides(platform) -> dict[str, str]:
    """vLLM attention backend name -> the telemetry subclass that replaces it on `platform`
    (vLLM's current_platform: is_cpu(), is_cuda(), is_rocm()). Empty: none handled there."""
    if platform.is_cpu():
        return {"CPU_ATTN": BACKEND_PATH}
    if platform.is_cuda():
        return {"FLASH_ATTN": FLASH_BACKEND_PATH, "TRITON_ATTN": TRITON_BACKEND_PATH}
    if platform.is_rocm():
        return {"TRITON_ATTN": TRITON_BACKEND_PATH}
    return {}


def register() -> None:
    """vLLM's general-plugin hook (runs in the API, EngineCore and worker processes, maybe more
    than once). A bad HEADWISE_TELEMETRY_SAMPLE_RATE stops vLLM with a clear error. A layer whose
    backend is not overridden (another backend chosen, another platform) reports no telemetry:
    the worker lists it as stock and headwise_telemetry_up reads 0."""
    from server.vllm_plugin.settings import PluginSettings

    PluginSettings.from_env()
    from vllm.platforms import current_platform
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    overrides = backend_overrides(current_platform)
    if not overrides:
        logger.error("headwise: no telemetry attention backend for the %s platform (CPU_ATTN on CPU, FLASH_ATTN "
                     "and TRITON_ATTN on CUDA, TRITON_ATTN on ROCm); per-head telemetry stays off and "
                     "headwise_telemetry_up reads 0", current_platform.device_name)
        return
    for name, path in overrides.items():
        register_backend(AttentionBackendEnum[name], path)
