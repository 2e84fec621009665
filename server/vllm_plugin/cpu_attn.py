"""CPU_ATTN with per-head telemetry: vLLM's CPU attention backend, the stock kernel untouched.

register() (server/vllm_plugin/__init__.py) points AttentionBackendEnum.CPU_ATTN at
HeadwiseCPUAttentionBackend, so vLLM's CPU platform, which always picks CPU_ATTN, builds this
impl for every attention layer (TelemetryImpl, impl.py, adds the telemetry). The cache's key
packing is the ISA the metadata builder set on the layer: only "vec" is read.
"""

from __future__ import annotations

import torch
from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend, CPUAttentionBackendImpl

from server.vllm_plugin.impl import TelemetryImpl


class HeadwiseCPUAttentionImpl(TelemetryImpl, CPUAttentionBackendImpl):
    """The stock impl plus `headwise`, this layer's LayerTelemetry."""

    def headwise_layout(self, layer: torch.nn.Module) -> str | None:
        return getattr(layer, "isa", None)


class HeadwiseCPUAttentionBackend(CPUAttentionBackend):
    """CPU_ATTN (same name, metadata builder and cache layout) with the telemetry impl."""

    @staticmethod
    def get_impl_cls() -> type[HeadwiseCPUAttentionImpl]:
        return HeadwiseCPUAttentionImpl
