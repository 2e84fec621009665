"""FLASH_ATTN and TRITON_ATTN with per-head telemetry: vLLM's GPU attention backends, the stock
kernels untouched.

register() (server/vllm_plugin/__init__.py) points AttentionBackendEnum.FLASH_ATTN and
TRITON_ATTN at the backends below on CUDA (TRITON_ATTN only on ROCm). Both keep vLLM's
[num_blocks, num_kv_heads, block_size, 2 * head_size] cache with a block's keys in the first
head_size elements of the last dimension, the "split" layout of server/vllm_plugin/paged.py.

CUDA graphs: vLLM's default mode replays decode steps as one full graph, attention included, so
no Python runs inside a replay and the statistics of those steps would be silently missing. While
telemetry samples (a rate above 0) the metadata builders below therefore report no full-graph
support; vLLM then runs attention eagerly between piecewise graphs (its own fallback, logged at
start-up; an explicit cudagraph_mode=FULL is refused by vLLM with a message). With
HEADWISE_TELEMETRY_SAMPLE_RATE=0 the stock graph support is kept.
"""

from __future__ import annotations

import torch
from vllm.v1.attention.backend import AttentionCGSupport
from vllm.v1.attention.backends.flash_attn import (FlashAttentionBackend, FlashAttentionImpl,
                                                   FlashAttentionMetadataBuilder)
from vllm.v1.attention.backends.triton_attn import (TritonAttentionBackend, TritonAttentionImpl,
                                                    TritonAttentionMetadataBuilder)

from server.vllm_plugin.impl import TelemetryImpl
from server.vllm_plugin.settings import PluginSettings

SPLIT_LAYOUT = "split"


class EagerWhileSampling:
    """Mixin placed before a stock metadata builder: it reports no full CUDA-graph support while
    telemetry samples (HEADWISE_TELEMETRY_SAMPLE_RATE > 0), else the stock builder's."""

    @classmethod
    def get_cudagraph_support(cls, vllm_config, kv_cache_spec) -> AttentionCGSupport:
        stock = super().get_cudagraph_support(vllm_config, kv_cache_spec)
        return AttentionCGSupport.NEVER if PluginSettings.from_env().sample_rate > 0 else stock


class HeadwiseFlashAttentionImpl(TelemetryImpl, FlashAttentionImpl):
    def headwise_layout(self, layer: torch.nn.Module) -> str:
        return SPLIT_LAYOUT


class HeadwiseFlashAttentionMetadataBuilder(EagerWhileSampling, FlashAttentionMetadataBuilder):
    pass


class HeadwiseFlashAttentionBackend(FlashAttentionBackend):
    """FLASH_ATTN (same name, cache layout and kernels) with the telemetry impl."""

    @staticmethod
    def get_impl_cls() -> type[HeadwiseFlashAttentionImpl]:
        return HeadwiseFlashAttentionImpl

    @staticmethod
    def get_builder_cls() -> type[HeadwiseFlashAttentionMetadataBuilder]:
        return HeadwiseFlashAttentionMetadataBuilder


class HeadwiseTritonAttentionImpl(TelemetryImpl, TritonAttentionImpl):
    def headwise_layout(self, layer: torch.nn.Module) -> str | None:
        # per-token-head quantized caches pack scales into the head dimension (also refused by
        # kv_cache_dtype); anything else is the plain split layout
        return None if self._is_per_token_head_quant else SPLIT_LAYOUT


class HeadwiseTritonAttentionMetadataBuilder(EagerWhileSampling, TritonAttentionMetadataBuilder):
    pass


class HeadwiseTritonAttentionBackend(TritonAttentionBackend):
    """TRITON_ATTN (same name, cache layout and kernels) with the telemetry impl."""

    @staticmethod
    def get_impl_cls() -> type[HeadwiseTritonAttentionImpl]:
        return HeadwiseTritonAttentionImpl

    @staticmethod
    def get_builder_cls() -> type[HeadwiseTritonAttentionMetadataBuilder]:
        return HeadwiseTritonAttentionMetadataBuilder
