"""One attention layer's telemetry inside a vLLM worker: support check, sampling, accumulation.

An attention-backend subclass (server/vllm_plugin/cpu_attn.py, gpu_attn.py) owns one
LayerTelemetry per layer and calls record() after the stock kernel has written the layer's
output, on every step with attention metadata. record() only reads q and the paged K cache and adds to this layer's own
HeadStatsAccumulator; it never writes a tensor vLLM uses, and any failure turns telemetry off for
the layer (one log line, a reason exported as a label) instead of reaching vLLM.

Imports torch and headwise's telemetry only (no vLLM), so it is unit-tested without vLLM.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from server.engine.telemetry import HeadStats, HeadStatsAccumulator, finalize_stats
from server.vllm_plugin.paged import (StepSampler, row_accumulators, shared_step_rows, split_key_blocks,
                                      telemetry_queries, vec_key_blocks, weight_table)
from server.vllm_plugin.settings import PluginSettings

logger = logging.getLogger(__name__)

# The K-cache layouts the plugin reads -> the K^T view of their key blocks: "vec" is vLLM
# CPU_ATTN's ISA name for its AVX-512/AVX2 packing, "split" the FLASH_ATTN / TRITON_ATTN cache.
KEY_VIEWS = {"vec": vec_key_blocks, "split": split_key_blocks}
# KV-cache dtypes that store keys as they are (anything else is quantized: fp8, int8, int4, ...).
PLAIN_KV_DTYPES = ("auto", "bfloat16", "float16", "float32")
# Sampled steps whose accumulators wait before finalize_stats and the accumulator run on all at once.
FLUSH_EVERY = 32


@dataclass(frozen=True)
class LayerSpec:
    """What the plugin needs of one attention layer (this rank's slice of its heads)."""

    num_heads: int          # query heads on this rank
    num_kv_heads: int       # KV heads on this rank
    head_dim: int
    scale: float


@dataclass(frozen=True)
class AttentionFeatures:
    """The layer options that change the attention weights, as vLLM's impl receives them."""

    alibi: bool = False
    sliding_window: int | None = None     # None or -1: none
    sinks: bool = False                   # learned attention sinks (gpt-oss)
    softcap: float | None = None          # None or 0: none
    kv_cache_dtype: str = "auto"
    decoder: bool = True                  # causal decoder self-attention
    chunk_lookback: int = -1              # TRITON_ATTN's chunked local attention; -1: none

    def unsupported_reason(self) -> str | None:
        """Why the statistics would not be those of the weights the kernel applies, or None."""
        if not self.decoder:
            return "not_decoder_attention"
        if self.alibi:
            return "alibi"
        if self.sliding_window not in (None, -1):
            return "sliding_window"
        if self.sinks:
            return "attention_sinks"
        if self.softcap not in (None, 0, 0.0):
            return "softcap"
        if self.kv_cache_dtype not in PLAIN_KV_DTYPES:
            return f"kv_cache_dtype_{self.kv_cache_dtype}"
        if self.chunk_lookback not in (None, -1):
            return "chunked_local_attention"
        return None


class LayerTelemetry:
    """Per-layer state: the step sampler, the per-key weight table and this rank's running sums."""

    def __init__(self, spec: LayerSpec, features: AttentionFeatures, settings: PluginSettings) -> None:
        if spec.num_heads % spec.num_kv_heads:
            raise ValueError(f"{spec.num_heads} query heads do not group over {spec.num_kv_heads} KV heads")
        self.spec = spec
        self.settings = settings
        self.sampler = StepSampler(settings.sample_rate)
        self.accumulator = HeadStatsAccumulator(1, spec.num_heads, settings.buckets)
        self.disabled: str | None = features.unsupported_reason()
        self._announced = False
        self._weights = weight_table(0, settings.sink_tokens)         # [0, 3], grown on demand, on q's device
        self._pending: list[tuple[torch.Tensor, torch.Tensor]] = []    # (acc [R, H, 4], lens [R]) per sampled step

    @property
    def active(self) -> bool:
        return self.disabled is None and self.sampler.rate > 0

    def record(self, layer_name: str, layout: str | None, query: torch.Tensor, kv_cache: torch.Tensor,
               meta: object) -> None:
        """Compute this step's accumulators when the step is sampled.

        layout: the cache's key packing (a KEY_VIEWS name; anything else turns the layer off).
        query [T, H, D] (the layer's q, T >= the step's tokens); kv_cache [NB, KVH, BS, 2 D] the
        layer's paged cache, already holding this step's keys; meta: the step's attention
        metadata (query_start_loc [B + 1], seq_lens [B], block_table [B, max_blocks]).
        The accumulators wait in a short list; finalize_stats and the running sums take them
        FLUSH_EVERY sampled steps at a time (and before every snapshot). Nothing is computed
        while a CUDA graph is being captured (vLLM's warm-up; the sampler does not advance).
        """
        if self.disabled is not None:
            self._announce(layer_name)
            return
        if query.is_cuda and torch.cuda.is_current_stream_capturing():
            return
        if not self.sampler.take():
            return
        try:
            reason = self._layout_problem(layout, query, kv_cache)
            if reason is not None:
                self.disable(layer_name, reason)
                return
            step = shared_step_rows(meta, kv_cache.shape[2])
            if step is None:
                return
            if self._weights.shape[0] < step.num_keys or self._weights.device != query.device:
                self._weights = weight_table(max(step.num_keys, 2 * self._weights.shape[0], 256),
                                             self.settings.sink_tokens, query.device)  # [P, 3]
            acc = row_accumulators(telemetry_queries(query, step), KEY_VIEWS[layout](kv_cache), step,
                                   self.spec.scale, self._weights)      # [R, H, 4]
            self._pending.append((acc, step.lens))
            if len(self._pending) >= FLUSH_EVERY:
                self._flush()
        except Exception as exc:  # telemetry must never take vLLM down: turn it off, loudly
            logger.exception("headwise: telemetry failed in %s; it stays off for this layer", layer_name)
            self._pending.clear()
            self.disable(layer_name, f"error_{type(exc).__name__}")

    def disable(self, layer_name: str, reason: str) -> None:
        self.disabled = reason
        self._announce(layer_name)

    def snapshot(self) -> HeadStats:
        self._flush()
        return self.accumulator.snapshot()

    def _flush(self) -> None:
        if not self._pending:
            return
        acc = torch.cat([a for a, _ in self._pending])                 # [R, H, 4]
        lens = torch.cat([n for _, n in self._pending])                # [R]
        self._pending.clear()
        self.accumulator.add(finalize_stats(acc, lens)[None])          # [1, R, H, 5]

    def _announce(self, layer_name: str) -> None:
        if not self._announced:
            self._announced = True
            logger.warning("headwise: per-head telemetry is off for %s (%s); its tokens are unaffected",
                           layer_name, self.disabled)

    def _layout_problem(self, layout: str | None, query: torch.Tensor, kv_cache: torch.Tensor) -> str | None:
        s = self.spec
        if layout not in KEY_VIEWS:
            return f"kv_layout_{layout}"
        if kv_cache.dim() != 4 or kv_cache.shape[1] != s.num_kv_heads or kv_cache.shape[3] != 2 * s.head_dim:
            return "kv_layout_shape"
        if query.dim() != 3 or query.shape[1] != s.num_heads or query.shape[2] != s.head_dim:
            return "query_shape"
        return None
