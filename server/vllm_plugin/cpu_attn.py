"""CPU_ATTN with per-head telemetry: vLLM's CPU attention backend, the stock kernel untouched.

register() (server/vllm_plugin/__init__.py) points AttentionBackendEnum.CPU_ATTN at
HeadwiseCPUAttentionBackend, so vLLM's CPU platform, which always picks CPU_ATTN, builds this
impl for every attention layer. forward() runs CPUAttentionBackendImpl.forward (the C++ kernel
writes the output) and then, on sampled steps, LayerTelemetry.record reads q and the layer's
paged K cache (written before forward: seq_lens include this step's token) and adds the step's
rows to the layer's sums. The output tensor is never touched by the plugin, so tokens are the
same with it on or off.
"""

from __future__ import annotations

import torch
from vllm.v1.attention.backend import AttentionType
from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend, CPUAttentionBackendImpl, CPUAttentionMetadata

from server.vllm_plugin.layer import AttentionFeatures, LayerSpec, LayerTelemetry
from server.vllm_plugin.settings import PluginSettings


class HeadwiseCPUAttentionImpl(CPUAttentionBackendImpl):
    """The stock impl plus `headwise`, this layer's LayerTelemetry (the worker extension finds
    it through vLLM's static forward context)."""

    def __init__(self, num_heads: int, head_size: int, scale: float, num_kv_heads: int,
                 alibi_slopes: list[float] | None, sliding_window: int | None, kv_cache_dtype: str,
                 logits_soft_cap: float | None = None, attn_type: str = AttentionType.DECODER,
                 kv_sharing_target_layer_name: str | None = None, sinks: torch.Tensor | None = None) -> None:
        super().__init__(num_heads, head_size, scale, num_kv_heads, alibi_slopes, sliding_window, kv_cache_dtype,
                         logits_soft_cap, attn_type, kv_sharing_target_layer_name, sinks)
        features = AttentionFeatures(alibi=alibi_slopes is not None, sliding_window=sliding_window,
                                     sinks=sinks is not None, softcap=logits_soft_cap,
                                     kv_cache_dtype=kv_cache_dtype, decoder=attn_type == AttentionType.DECODER)
        self.headwise = LayerTelemetry(LayerSpec(num_heads, num_kv_heads, head_size, float(scale)), features,
                                       PluginSettings.from_env())

    def forward(self, layer, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                attn_metadata: CPUAttentionMetadata | None, output: torch.Tensor,
                output_scale: torch.Tensor | None = None,
                output_block_scale: torch.Tensor | None = None) -> torch.Tensor:
        out = super().forward(layer, query, key, value, kv_cache, attn_metadata, output, output_scale,
                              output_block_scale)                      # [T, H * D] the stock kernel's
        if attn_metadata is not None and (self.headwise.active or self.headwise.disabled is not None):
            self.headwise.record(layer.layer_name, getattr(layer, "isa", None), query, kv_cache, attn_metadata)
        return out


class HeadwiseCPUAttentionBackend(CPUAttentionBackend):
    """CPU_ATTN (same name, metadata builder and cache layout) with the telemetry impl."""

    @staticmethod
    def get_impl_cls() -> type[HeadwiseCPUAttentionImpl]:
        return HeadwiseCPUAttentionImpl
