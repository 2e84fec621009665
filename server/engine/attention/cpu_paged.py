"""The CPU fast path: decode rows through a C++ paged-decode op, prefill chunks as the reference.

The step's new keys and values go into the cache through torch.ops.headwise.write_kv (one call
instead of two casts and two index_copy_, with the same rounding). Decode rows (one query token
per sequence) go to torch.ops.headwise.paged_decode
(csrc/paged_decode.cpp, built by cpu_extension.py): it reads each sequence's keys and values
straight from the layer's paged cache through its block table, with no gathered padded copy, and
computes the output and, when asked, the telemetry accumulators (l, t, sink sum, position sum of
server/engine/telemetry.py) in the same pass, one exact two-pass softmax per (row, query head),
parallel over (row, KV head) pairs. Its output is bit-identical with telemetry on or off and
does not depend on the other rows of the batch. Prefill chunks run exactly as in the torch
reference (torch_ref.prefill_spans / attend_prefill).

Available only on a CPU device and only where the extension builds (a C++ compiler and ninja);
otherwise "auto" picks the torch reference, after one logged warning naming the reason.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from server.engine.attention.cpu_extension import load_paged_decode
from server.engine.attention.metadata import AttentionMetadata
from server.engine.attention.torch_ref import (PrefillSpan, attend_prefill, decode_stats_rows, prefill_spans,
                                               weights_dtype)
from server.engine.kv_cache import KVCache
from server.engine.telemetry import key_weights


@dataclass(frozen=True)
class CpuPlan:
    """The CPU backend's per-step inputs, derived once per step from AttentionMetadata."""

    slot_mapping: torch.Tensor         # [T] cache slot of each new token
    num_decodes: int
    decode_table: torch.Tensor | None  # [Bd, W] int32 block tables of the decode rows (a view)
    decode_lens: torch.Tensor | None   # [Bd] int32 keys each decode row sees
    decode_want_stats: bool            # some decode row computes telemetry this step
    decode_stats: torch.Tensor | None  # [Rd] decode rows that compute telemetry, None when all
    prefills: tuple[PrefillSpan, ...]


class CpuPagedBackend:
    """Decode attention in one C++ op over the paged cache; prefill chunks as the reference."""

    name = "cpu"

    def __init__(self, cache: KVCache, sink_tokens: int, max_positions: int | None = None) -> None:
        ext = load_paged_decode()
        if ext.op is None:
            raise RuntimeError(f"the cpu attention backend is unavailable: {ext.reason}")
        self.op = ext.op
        self.write = ext.write
        self.cache = cache
        self.sink_tokens = sink_tokens
        k0 = cache.k[0]                                                    # [num_blocks + 1, bs, KVH, D]
        if k0.dtype not in (torch.float32, torch.bfloat16) or k0.device.type != "cpu":
            raise ValueError(f"the cpu attention backend needs a float32 or bfloat16 KV cache on the CPU, "
                             f"not {k0.dtype} on {k0.device}")
        self.scale = 1.0 / math.sqrt(k0.shape[-1])
        n = max_positions or cache.num_blocks * cache.block_size
        self.key_weights = key_weights(n, sink_tokens, k0.device, weights_dtype(k0.dtype))  # [P, 2] (prefill rows)
        self.block_offsets = torch.arange(cache.block_size, device=k0.device)  # [bs]

    @staticmethod
    def supports(device: torch.device) -> bool:
        return torch.device(device).type == "cpu" and load_paged_decode().op is not None

    @staticmethod
    def unavailable_reason(device: torch.device | None = None) -> str | None:
        """Why the C++ op could not be built or loaded, if it could not."""
        return load_paged_decode().reason

    def prepare(self, meta: AttentionMetadata) -> CpuPlan:
        bd, bs = meta.num_decodes, self.cache.block_size
        stats = meta.stats_seqs_cpu.tolist() if meta.stats_seqs_cpu is not None else []
        table = lens = None
        if bd:
            width = -(-int(meta.seq_lens_cpu[:bd].max()) // bs)
            table = meta.block_table[:bd, :width]                                    # [Bd, W] int32
            lens = meta.seq_lens[:bd]                                                # [Bd] int32
        want = bool(stats) and stats[0] < bd
        return CpuPlan(meta.slot_mapping, bd, table, lens, want, decode_stats_rows(stats, bd, meta.seq_lens.device),
                       prefill_spans(meta, stats, self.block_offsets))

    def forward(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                plan: CpuPlan) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Write the step's new K/V into the cache, then attend every query row.

        q [T, H, D]; k, v [T, KVH, D]. Returns out [T, H, D] and, when telemetry is on this
        step, accumulators [R, H, NUM_ACCUMULATORS] in AttentionMetadata.stats_seqs_cpu order.
        """
        cache = self.cache
        self.write(cache.k[layer], cache.v[layer], plan.slot_mapping, k.contiguous(), v.contiguous())
        bd = plan.num_decodes
        parts: list[torch.Tensor] = []
        acc = None
        if not plan.prefills:   # decodes only: the op's output is the step's output
            out, acc = self._decode(layer, q, plan)                      # [Bd, H, D], [Bd, H, 4]
        else:
            out = torch.empty_like(q)                                    # [T, H, D]
            if bd:
                out[:bd], acc = self._decode(layer, q[:bd], plan)        # [Bd, H, D], [Bd, H, 4]
        if bd and plan.decode_want_stats:
            parts.append(acc if plan.decode_stats is None else acc[plan.decode_stats])  # [Rd, H, 4]
        for span in plan.prefills:
            a = attend_prefill(cache, layer, q, out, span, self.scale, self.sink_tokens, self.key_weights)
            if a is not None:
                parts.append(a)                                          # [1, H, 4]
        if not parts:
            return out, None
        return out, parts[0] if len(parts) == 1 else torch.cat(parts)   # [R, H, 4]

    def _decode(self, layer: int, q: torch.Tensor, plan: CpuPlan) -> tuple[torch.Tensor, torch.Tensor]:
        """The op over the decode rows: q [Bd, H, D] float32 -> out [Bd, H, D], accumulators
        [Bd, H, 4] (empty when no decode row wants telemetry)."""
        return self.op(q.contiguous(), self.cache.k[layer], self.cache.v[layer], plan.decode_table,
                       plan.decode_lens, self.scale, plan.decode_want_stats, self.sink_tokens)
