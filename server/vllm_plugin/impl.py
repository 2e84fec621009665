"""TelemetryImpl: the mixin that adds per-head telemetry to a stock vLLM attention impl.

`class HeadwiseXImpl(TelemetryImpl, XImpl)`: __init__ runs the stock __init__ with the arguments
vLLM passes, reads the telemetry-relevant ones by name (every vLLM impl takes num_heads,
num_kv_heads, head_size, scale, alibi_slopes, sliding_window, kv_cache_dtype, logits_soft_cap,
attn_type and sinks; TRITON_ATTN adds chunk_lookback) and builds the layer's LayerTelemetry as
`self.headwise` (the worker extension finds it there). forward runs the stock forward, which
writes the output, then, on steps with attention metadata, LayerTelemetry.record reads q and the
layer's paged K cache (already holding this step's keys). The plugin never writes a tensor vLLM
uses, so tokens are the same with it on or off.

Imports torch and the plugin's own modules only, so subclasses decide which vLLM they import.
"""

from __future__ import annotations

import inspect

import torch

from server.vllm_plugin.layer import AttentionFeatures, LayerSpec, LayerTelemetry
from server.vllm_plugin.settings import PluginSettings

DECODER = "decoder"   # vLLM's AttentionType.DECODER


class TelemetryImpl:
    """Mixin placed before the stock impl class; see the module docstring."""

    headwise: LayerTelemetry

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        bound = inspect.signature(super().__init__).bind(*args, **kwargs)
        bound.apply_defaults()
        a = bound.arguments
        features = AttentionFeatures(alibi=a.get("alibi_slopes") is not None, sliding_window=a.get("sliding_window"),
                                     sinks=a.get("sinks") is not None, softcap=a.get("logits_soft_cap"),
                                     kv_cache_dtype=str(a.get("kv_cache_dtype", "auto")),
                                     decoder=a.get("attn_type", DECODER) == DECODER,
                                     chunk_lookback=int(a.get("chunk_lookback", -1)))
        spec = LayerSpec(int(a["num_heads"]), int(a["num_kv_heads"]), int(a["head_size"]), float(a["scale"]))
        self.headwise = LayerTelemetry(spec, features, PluginSettings.from_env())

    def headwise_layout(self, layer: torch.nn.Module) -> str | None:
        """The key packing of this layer's cache (a server.vllm_plugin.layer.KEY_VIEWS name)."""
        raise NotImplementedError

    def forward(self, layer: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                kv_cache: torch.Tensor, attn_metadata, output: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        out = super().forward(layer, query, key, value, kv_cache, attn_metadata, output, *args,
                              **kwargs)                                # [T, H * D] the stock kernel's
        if attn_metadata is not None and (self.headwise.active or self.headwise.disabled is not None):
            self.headwise.record(layer.layer_name, self.headwise_layout(layer), query, kv_cache, attn_metadata)
        return out
