"""headwise's per-head attention telemetry inside a stock vLLM server (a vLLM plugin).

Three entry points, all named `headwise` (pyproject.toml):

- `vllm.general_plugins` -> register(): in every vLLM process, points CPU_ATTN at the telemetry
  subclass (cpu_attn.py), which runs the stock kernel and, on a `HEADWISE_TELEMETRY_SAMPLE_RATE`
  fraction of steps, computes the accumulators of server.engine.telemetry from q and the paged K
  cache (layer.py, paged.py).
- the worker extension (worker.py, `--worker-extension-cls`): each rank reports its cumulative
  sums over collective_rpc (snapshot.py is the contract).
- `vllm.endpoint_plugins` (opt-in: `VLLM_PLUGINS=headwise`) -> endpoint.HeadwiseEndpoint: in the
  API process, merges the ranks' reports on each scrape and exports them through vLLM's own
  /metrics with headwise serve's family names and labels (export.py), plus
  headwise_telemetry_up and headwise_telemetry_layer_disabled; and GET /v1/telemetry.

`python -m server.vllm_plugin.model_dir` prints the Hugging Face folder vLLM loads for a headwise
model (the default model's GGUF converted once); scripts/serve-vllm.sh wires it all up.

This package never imports headwise's engine loop; vLLM is imported only by cpu_attn.py,
worker.py and endpoint.py (and inside register()), so the math is tested without vLLM.
"""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)

BACKEND_PATH = "server.vllm_plugin.cpu_attn.HeadwiseCPUAttentionBackend"


def register() -> None:
    """vLLM's general-plugin hook (runs in the API, EngineCore and worker processes, maybe more
    than once). A bad HEADWISE_TELEMETRY_SAMPLE_RATE stops vLLM with a clear error."""
    from server.vllm_plugin.settings import PluginSettings

    PluginSettings.from_env()
    from vllm.platforms import current_platform
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    if not current_platform.is_cpu():
        logger.error("headwise: no telemetry attention backend for the %s platform yet (CPU_ATTN only); "
                     "per-head telemetry stays off and headwise_telemetry_up reads 0",
                     current_platform.device_name)
        return
    register_backend(AttentionBackendEnum.CPU_ATTN, BACKEND_PATH)
