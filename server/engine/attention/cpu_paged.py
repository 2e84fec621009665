"""The CPU fast path: decode rows and prefill chunks through C++ ops over the paged cache.

The step's new keys and values go into the cache through torch.ops.headwise.write_kv (one call
instead of two casts and two index_copy_, with the same rounding). Decode rows (one query token
per sequence) go to torch.ops.headwise.paged_decode (csrc/paged_decode.cpp, built by
cpu_extension.py): it reads each sequence's keys and values straight from the layer's paged cache
through its block table, with no gathered padded copy, and computes the output and, when asked,
the telemetry accumulators (l, t, sink sum, position sum of server/engine/telemetry.py) in the
same pass, one exact two-pass softmax per (row, query head), parallel over (row, KV head) pairs.
Its output is bit-identical with telemetry on or off and does not depend on the other rows of
the batch. A prefill chunk's rows but the last go to torch.ops.headwise.paged_prefill
(csrc/paged_prefill.cpp: causal attention over the same block table, the same float32 softmax,
16 rows per tile; over a bfloat16 cache, on a CPU with AVX-512 BF16, bfloat16 dot products with q
and the softmax weights rounded to bfloat16, twice as fast); its last row, the one that samples,
goes through paged_decode like a decode row of that position, which also yields its telemetry,
so a prompt's last token is attended exactly as a generated one would be, whether or not its
telemetry is on.

Available only on a CPU device and only where the extension builds (a C++ compiler and ninja);
otherwise "auto" picks the torch reference, after one logged warning naming the reason.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from server.engine.attention.cpu_extension import load_paged_decode
from server.engine.attention.metadata import AttentionMetadata
from server.engine.attention.torch_ref import decode_stats_rows
from server.engine.kv_cache import KVCache


@dataclass(frozen=True)
class CpuPrefill:
    """One prefill sequence's chunk: rows start .. start + length - 1 of the flat batch."""

    start: int                 # first query row
    length: int                # query rows (>= 2)
    keys: int                  # keys the chunk's last row sees (the cached prefix plus the chunk)
    table: torch.Tensor        # [1, W] int32 the sequence's block table (a view), W blocks hold `keys`
    seq_len: torch.Tensor      # [1] int32 = keys (a view of the metadata's seq_lens)
    want_stats: bool           # the last row computes telemetry this step


@dataclass(frozen=True)
class CpuPlan:
    """The CPU backend's per-step inputs, derived once per step from AttentionMetadata."""

    slot_mapping: torch.Tensor         # [T] cache slot of each new token
    num_decodes: int
    decode_table: torch.Tensor | None  # [Bd, W] int32 block tables of the decode rows (a view)
    decode_lens: torch.Tensor | None   # [Bd] int32 keys each decode row sees
    decode_want_stats: bool            # some decode row computes telemetry this step
    decode_stats: torch.Tensor | None  # [Rd] decode rows that compute telemetry, None when all
    prefills: tuple[CpuPrefill, ...]


class CpuPagedBackend:
    """Decode rows and prefill chunks through C++ ops over the paged cache."""

    name = "cpu"

    def __init__(self, cache: KVCache, sink_tokens: int, max_positions: int | None = None) -> None:
        ext = load_paged_decode()
        if ext.op is None:
            raise RuntimeError(f"the cpu attention backend is unavailable: {ext.reason}")
        self.op = ext.op
        self.write = ext.write
        self.prefill = ext.prefill
        self.cache = cache
        self.sink_tokens = sink_tokens
        k0 = cache.k[0]                                                    # [num_blocks + 1, bs, KVH, D]
        if k0.dtype not in (torch.float32, torch.bfloat16) or k0.device.type != "cpu":
            raise ValueError(f"the cpu attention backend needs a float32 or bfloat16 KV cache on the CPU, "
                             f"not {k0.dtype} on {k0.device}")
        self.scale = 1.0 / math.sqrt(k0.shape[-1])

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
                       self._prefills(meta, set(stats)))

    def _prefills(self, meta: AttentionMetadata, stats: set[int]) -> tuple[CpuPrefill, ...]:
        """The prefill chunks of a step: sequences num_decodes .. (stats: those whose last row
        computes telemetry)."""
        bs = self.cache.block_size
        qsl = meta.query_start_loc_cpu.tolist()
        lens = meta.seq_lens_cpu.tolist()
        return tuple(CpuPrefill(qsl[b], qsl[b + 1] - qsl[b], lens[b], meta.block_table[b:b + 1, :-(-lens[b] // bs)],
                                meta.seq_lens[b:b + 1], b in stats)
                     for b in range(meta.num_decodes, meta.num_seqs))

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
            a = self._prefill(layer, q, out, span)
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

    def _prefill(self, layer: int, q: torch.Tensor, out: torch.Tensor, span: CpuPrefill) -> torch.Tensor | None:
        """One chunk: rows but the last through paged_prefill, the last through paged_decode (as a
        decode row at its position, whether or not it computes telemetry, so outputs never depend
        on it). q, out [T, H, D] (out written in place). Returns the last row's accumulators
        [1, H, 4] when span.want_stats, else None."""
        kc, vc = self.cache.k[layer], self.cache.v[layer]
        first, last = span.start, span.start + span.length - 1
        out[first:last] = self.prefill(q[first:last].contiguous(), kc, vc, span.table[0],
                                       span.keys - span.length, self.scale)  # [n - 1, H, D]
        o, acc = self.op(q[last:last + 1].contiguous(), kc, vc, span.table, span.seq_len, self.scale,
                         span.want_stats, self.sink_tokens)              # [1, H, D], [1, H, 4]
        out[last:last + 1] = o
        return acc if span.want_stats else None
