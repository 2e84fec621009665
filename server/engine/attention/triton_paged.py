"""The GPU backend: every query row through Triton kernels over the paged cache.

A step's attention is three launches per layer: store_kv writes the new K/V (triton_kernels.py);
triton_prefill.paged_prefill attends every row of the step's prefill chunks (varlen, causal,
over a cached prefix, no telemetry); triton_kernels.paged_decode attends the LAST row of every
sequence (the decode rows, and each chunk's row that samples, gathered) with the telemetry
accumulators (l, t, sink sum, position sum of server/engine/telemetry.py) carried next to the
online softmax, switched by a per-row flag on the device, with split-K (flash-decoding) once a
row has more than DecodeTiles.split_keys keys. The last rows go through the decode kernel whether
or not they compute telemetry (as in the torch reference), so no output depends on telemetry,
and a row's result never depends on the other rows of the batch.

A decode-only step launches only store_kv and paged_decode, over plans whose launches can be
fixed for CUDA graphs (graph_plan, cuda_graphs.py).

Runs on CUDA wherever triton imports. On a CPU device only under Triton's interpreter
(TRITON_INTERPRET=1 set before the kernels are imported: slow, for tests), and never picked by
"auto" there. fp32, bf16 and fp16 caches; accumulators always fp32.
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from server.engine.attention.metadata import AttentionMetadata
from server.engine.kv_cache import KVCache
from server.engine.telemetry import NUM_ACCUMULATORS, key_weights

if TYPE_CHECKING:  # the kernel modules import triton, which this module must not need at import
    from server.engine.attention.triton_kernels import DecodeTiles
    from server.engine.attention.triton_prefill import PrefillTiles


@functools.cache
def _triton_import_error() -> str | None:
    """Why triton cannot be imported, or None."""
    try:
        import triton  # noqa: F401
    except Exception as exc:  # not installed, or a broken install
        return f"triton is not importable ({type(exc).__name__}: {exc}); pip install triton"
    return None


def unavailable_on(device: torch.device) -> str | None:
    """Why the Triton backend cannot run on device, or None when it can."""
    kind = torch.device(device).type
    if kind == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        return ("on a CPU its kernels run only in Triton's interpreter (TRITON_INTERPRET=1, slow, for tests); "
                "use --attention-backend cpu or torch")
    if kind not in ("cpu", "cuda"):
        return f"Triton kernels run on CUDA devices, not {kind}"
    return _triton_import_error()


@dataclass(frozen=True)
class LastRows:
    """The last query row of every sequence of a step (decode rows and each prefill chunk's row
    that samples): the decode kernel's inputs (views of AttentionMetadata's tensors)."""

    index: torch.Tensor | None       # [B] their rows of the flat batch; None: rows 0 .. B - 1 (no prefill)
    table: torch.Tensor              # [B, W] int32 block tables, W covering the longest row
    lens: torch.Tensor               # [B] int32 keys each row sees
    flags: torch.Tensor              # [B] int32 1 where the row computes telemetry this step
    want_stats: bool                 # some row computes telemetry
    stats_rows: torch.Tensor | None  # [R] rows that compute telemetry, None when all (or none)
    num_splits: int                  # splits of the longest row (1: no reduce)


@dataclass(frozen=True)
class PrefillChunks:
    """The prefill kernel's inputs: the step's chunks (sequences num_decodes ..)."""

    q_start: torch.Tensor            # [C + 1] int32 first row of each chunk, then T
    seq_lens: torch.Tensor           # [C] int32 keys each chunk's last row sees
    table: torch.Tensor              # [C, W] int32


@dataclass(frozen=True)
class TritonPlan:
    """The Triton backend's per-step inputs, derived once per step from AttentionMetadata."""

    slot_mapping: torch.Tensor       # [T] cache slot of each new token (< 0: none)
    last: LastRows
    prefill: PrefillChunks | None    # None: a decode-only step


class TritonPagedBackend:
    """Attention in Triton kernels over the paged cache (see the module docstring)."""

    name = "triton"

    def __init__(self, cache: KVCache, sink_tokens: int, max_positions: int | None = None,
                 tiles: DecodeTiles | None = None, prefill_tiles: PrefillTiles | None = None) -> None:
        k0 = cache.k[0]                                                    # [num_blocks + 1, bs, KVH, D]
        why = unavailable_on(k0.device)
        if why:
            raise RuntimeError(f"the triton attention backend is unavailable: {why}")
        from server.engine.attention import triton_kernels, triton_prefill

        if k0.device.type == "cpu" and not triton_kernels.interpreted():
            raise RuntimeError("the triton attention backend on a CPU needs TRITON_INTERPRET=1 set before "
                               "server.engine.attention.triton_kernels is first imported")
        if k0.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"the triton attention backend takes float32, bfloat16 or float16 caches, not {k0.dtype}")
        self.kernels = triton_kernels
        self.prefill_kernels = triton_prefill
        self.tiles = tiles or triton_kernels.DecodeTiles()
        self.prefill_tiles = prefill_tiles or triton_prefill.PrefillTiles()
        self.cache = cache
        self.sink_tokens = sink_tokens
        self.scale = 1.0 / math.sqrt(k0.shape[-1])
        n = self.max_positions = max_positions or cache.num_blocks * cache.block_size
        self.kernel_weights = key_weights(n, sink_tokens, k0.device, torch.float32)  # [P, 2]

    @staticmethod
    def supports(device: torch.device) -> bool:
        return unavailable_on(device) is None

    @staticmethod
    def auto_picks(device: torch.device) -> bool:
        """"auto" takes it on CUDA only (on a CPU the interpreter is for tests)."""
        return torch.device(device).type == "cuda" and unavailable_on(device) is None

    @staticmethod
    def unavailable_reason(device: torch.device) -> str | None:
        return unavailable_on(device)

    def prepare(self, meta: AttentionMetadata) -> TritonPlan:
        bd, b = meta.num_decodes, meta.num_seqs
        device = meta.seq_lens.device
        stats = meta.stats_seqs_cpu.tolist() if meta.stats_seqs_cpu is not None else []
        width = -(-meta.max_seq_len // self.cache.block_size)
        table = meta.block_table[:, :width]                                          # [B, W]
        prefill, index = None, None
        if bd < b:
            qsl = meta.query_start_loc
            prefill = PrefillChunks(q_start=qsl[bd:], seq_lens=meta.seq_lens[bd:], table=table[bd:])  # [C + 1], [C], [C, W]
            self.prefill_kernels.check_chunks(meta.query_start_loc_cpu[bd:].tolist(), meta.seq_lens_cpu[bd:].tolist(),
                                              meta.num_tokens, width, self.cache.block_size)
            index = (qsl[1:] - 1).long()                                            # [B] each sequence's last row
        flags = torch.zeros(b, dtype=torch.int32)                                    # [B] host
        flags[stats] = 1
        stats_rows = (None if not stats or stats == list(range(b))
                      else torch.tensor(stats, dtype=torch.long, device=device))    # [R]
        last = LastRows(index=index, table=table, lens=meta.seq_lens, flags=flags.to(device),
                        want_stats=bool(stats), stats_rows=stats_rows,
                        num_splits=self.kernels.num_splits(meta.max_seq_len, self.tiles))
        return TritonPlan(meta.slot_mapping, last, prefill)

    def graph_plan(self, slot_mapping: torch.Tensor, seq_lens: torch.Tensor, block_table: torch.Tensor,
                   flags: torch.Tensor) -> TritonPlan:
        """A decode-only plan over persistent buffers, for a CUDA graph (cuda_graphs.py): slot_mapping
        [B] int64 (< 0: a padded row, nothing written), seq_lens [B] int32 (>= 1), block_table [B, W]
        int32 (W covering the longest possible row), flags [B] int32 (1: the row computes
        telemetry). The launches do not depend on the step: every row's accumulators are returned
        (only flagged rows' are written) and the splits are those of the longest possible row, so
        one graph replays for any step of B decode rows, sampled or not. A row's output is the
        same bits as in an eager step (a single split through the reduce is exact)."""
        splits = self.kernels.num_splits(self.max_positions, self.tiles)
        last = LastRows(index=None, table=block_table, lens=seq_lens, flags=flags, want_stats=True, stats_rows=None,
                        num_splits=splits)
        return TritonPlan(slot_mapping, last, None)

    def forward(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                plan: TritonPlan) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Write the step's new K/V into the cache, then attend every query row.

        q [T, H, D]; k, v [T, KVH, D]. Returns out [T, H, D] and, when telemetry is on this
        step, accumulators [R, H, NUM_ACCUMULATORS] (fp32) in AttentionMetadata.stats_seqs_cpu order.
        """
        cache = self.cache
        kc, vc = cache.k[layer], cache.v[layer]
        k = k if k.stride(-1) == 1 else k.contiguous()                   # [T, KVH, D]
        v = v if v.stride(-1) == 1 else v.contiguous()                   # [T, KVH, D]
        q = q if q.stride(-1) == 1 else q.contiguous()                   # [T, H, D]
        self.kernels.store_kv(k, v, kc, vc, plan.slot_mapping)
        out = torch.empty_like(q)                                        # [T, H, D]
        if plan.prefill is not None:
            p = plan.prefill
            self.prefill_kernels.paged_prefill(q, kc, vc, p.table, p.q_start, p.seq_lens, out, self.scale,
                                               self.prefill_tiles)
        last = plan.last
        if last.index is None:
            b = last.lens.shape[0]
            acc = self._decode(layer, q[:b], out[:b], last)              # [B, H, 4]
        else:
            q_last = q.index_select(0, last.index)                       # [B, H, D]
            out_last = torch.empty_like(q_last)                          # [B, H, D]
            acc = self._decode(layer, q_last, out_last, last)            # [B, H, 4]
            out.index_copy_(0, last.index, out_last)                     # the chunks' last rows replaced
        if not last.want_stats:
            return out, None
        return out, acc if last.stats_rows is None else acc[last.stats_rows]  # [R, H, 4]

    def _decode(self, layer: int, q: torch.Tensor, out: torch.Tensor, rows: LastRows) -> torch.Tensor:
        """The decode kernels over the last rows: q [B, H, D] -> out [B, H, D] (written in place);
        returns the accumulators [B, H, 4] fp32 (only flagged rows written)."""
        kern = self.kernels
        b, h, d = q.shape
        acc = torch.empty(b, h, NUM_ACCUMULATORS, device=q.device, dtype=torch.float32)  # [B, H, 4]
        scratch = (None if rows.num_splits == 1 else
                   kern.DecodeScratch.allocate(b, h, rows.num_splits, d, NUM_ACCUMULATORS, q.device))
        kern.paged_decode(q, self.cache.k[layer], self.cache.v[layer], rows.table, rows.lens, rows.flags,
                          self.kernel_weights, out, acc, self.scale, self.tiles, scratch)
        return acc
