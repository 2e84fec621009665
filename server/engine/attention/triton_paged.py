"""The GPU backend: decode rows through Triton paged-attention kernels, prefill chunks as the reference.

Decode rows (one query token per sequence) go to triton_kernels.paged_decode: it reads each
sequence's keys and values straight from the layer's paged cache through its block table (no
gathered copy), G query heads per KV head in one program (GQA), online softmax, split-K
(flash-decoding) once a row has more than DecodeTiles.split_keys keys, and the telemetry
accumulators (l, t, sink sum, position sum of server/engine/telemetry.py) carried next to the
softmax for the rows that sample, switched by a per-row flag on the device. Its output is
bit-identical with telemetry on or off and does not depend on the other rows of the batch.

Prefill chunks run exactly as in the torch reference (torch_ref.prefill_spans / attend_prefill:
SDPA over the gathered chunk + cached prefix, the sampling row through the reference's
single-row attention for its telemetry); a Triton varlen paged prefill kernel is not written yet.

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
from server.engine.attention.torch_ref import PrefillSpan, attend_prefill, decode_stats_rows, prefill_spans
from server.engine.kv_cache import KVCache
from server.engine.telemetry import NUM_ACCUMULATORS, key_weights

if TYPE_CHECKING:  # triton_kernels imports triton, which this module must not need at import
    from server.engine.attention.triton_kernels import DecodeTiles


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
class DecodeRows:
    """The decode rows' kernel inputs for one step (views of AttentionMetadata's tensors)."""

    table: torch.Tensor              # [Bd, W] int32 block tables, W covering the longest row
    lens: torch.Tensor               # [Bd] int32 keys each row sees
    flags: torch.Tensor              # [Bd] int32 1 where the row computes telemetry this step
    want_stats: bool                 # some decode row computes telemetry
    stats_rows: torch.Tensor | None  # [Rd] rows that compute telemetry, None when all (or none)
    num_splits: int                  # splits of the longest row (1: no reduce)


@dataclass(frozen=True)
class TritonPlan:
    """The Triton backend's per-step inputs, derived once per step from AttentionMetadata."""

    slot_mapping: torch.Tensor       # [T] cache slot of each new token
    num_decodes: int
    decode: DecodeRows | None        # None: no decode rows this step
    prefills: tuple[PrefillSpan, ...]


class TritonPagedBackend:
    """Decode attention in Triton kernels over the paged cache; prefill chunks as the reference."""

    name = "triton"

    def __init__(self, cache: KVCache, sink_tokens: int, max_positions: int | None = None,
                 tiles: DecodeTiles | None = None) -> None:
        k0 = cache.k[0]                                                    # [num_blocks + 1, bs, KVH, D]
        why = unavailable_on(k0.device)
        if why:
            raise RuntimeError(f"the triton attention backend is unavailable: {why}")
        from server.engine.attention import triton_kernels

        if k0.device.type == "cpu" and not triton_kernels.interpreted():
            raise RuntimeError("the triton attention backend on a CPU needs TRITON_INTERPRET=1 set before "
                               "server.engine.attention.triton_kernels is first imported")
        if k0.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"the triton attention backend takes float32, bfloat16 or float16 caches, not {k0.dtype}")
        self.kernels = triton_kernels
        self.tiles = tiles or triton_kernels.DecodeTiles()
        self.cache = cache
        self.sink_tokens = sink_tokens
        self.scale = 1.0 / math.sqrt(k0.shape[-1])
        n = self.max_positions = max_positions or cache.num_blocks * cache.block_size
        self.kernel_weights = key_weights(n, sink_tokens, k0.device, torch.float32)  # [P, 2] (decode kernel)
        self.key_weights = (self.kernel_weights if k0.dtype == torch.float32
                            else key_weights(n, sink_tokens, k0.device, k0.dtype))   # [P, 2] (prefill rows)
        self.block_offsets = torch.arange(cache.block_size, device=k0.device)       # [bs]

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
        bd = meta.num_decodes
        stats = meta.stats_seqs_cpu.tolist() if meta.stats_seqs_cpu is not None else []
        decode = self._decode_rows(meta, stats) if bd else None
        return TritonPlan(meta.slot_mapping, bd, decode, prefill_spans(meta, stats, self.block_offsets))

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
        rows = DecodeRows(table=block_table, lens=seq_lens, flags=flags, want_stats=True, stats_rows=None,
                          num_splits=splits)
        return TritonPlan(slot_mapping, seq_lens.shape[0], rows, ())

    def _decode_rows(self, meta: AttentionMetadata, stats: list[int]) -> DecodeRows:
        """Block tables, lengths and telemetry flags of the decode rows; stats: the sequences
        whose last row computes telemetry (decodes and prefills)."""
        bd, bs = meta.num_decodes, self.cache.block_size
        device = meta.seq_lens.device
        max_len = int(meta.seq_lens_cpu[:bd].max())
        sampled = [s for s in stats if s < bd]
        flags = torch.zeros(bd, dtype=torch.int32)                                   # [Bd] host
        flags[sampled] = 1
        return DecodeRows(table=meta.block_table[:bd, :-(-max_len // bs)],          # [Bd, W]
                          lens=meta.seq_lens[:bd],                                  # [Bd]
                          flags=flags.to(device),                                   # [Bd]
                          want_stats=bool(sampled), stats_rows=decode_stats_rows(stats, bd, device),
                          num_splits=self.kernels.num_splits(max_len, self.tiles))

    def forward(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                plan: TritonPlan) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Write the step's new K/V into the cache, then attend every query row.

        q [T, H, D]; k, v [T, KVH, D]. Returns out [T, H, D] and, when telemetry is on this
        step, accumulators [R, H, NUM_ACCUMULATORS] (fp32) in AttentionMetadata.stats_seqs_cpu order.
        """
        cache = self.cache
        k = k if k.stride(-1) == 1 else k.contiguous()                   # [T, KVH, D]
        v = v if v.stride(-1) == 1 else v.contiguous()                   # [T, KVH, D]
        self.kernels.store_kv(k, v, cache.k[layer], cache.v[layer], plan.slot_mapping)
        out = torch.empty_like(q)                                        # [T, H, D]
        parts: list[torch.Tensor] = []
        rows = plan.decode
        if rows is not None:
            acc = self._decode(layer, q[:plan.num_decodes], out[:plan.num_decodes], rows)  # [Bd, H, 4]
            if rows.want_stats:
                parts.append(acc if rows.stats_rows is None else acc[rows.stats_rows])    # [Rd, H, 4]
        for span in plan.prefills:
            a = attend_prefill(cache, layer, q, out, span, self.scale, self.sink_tokens, self.key_weights)
            if a is not None:
                parts.append(a.float())                                  # [1, H, 4]
        if not parts:
            return out, None
        return out, parts[0] if len(parts) == 1 else torch.cat(parts)   # [R, H, 4]

    def _decode(self, layer: int, q: torch.Tensor, out: torch.Tensor, rows: DecodeRows) -> torch.Tensor:
        """The kernels over the decode rows: q [Bd, H, D] -> out [Bd, H, D] (written in place);
        returns the accumulators [Bd, H, 4] fp32 (only flagged rows written)."""
        kern = self.kernels
        bd, h, d = q.shape
        q = q if q.stride(-1) == 1 else q.contiguous()                   # [Bd, H, D]
        acc = torch.empty(bd, h, NUM_ACCUMULATORS, device=q.device, dtype=torch.float32)  # [Bd, H, 4]
        scratch = (None if rows.num_splits == 1 else
                   kern.DecodeScratch.allocate(bd, h, rows.num_splits, d, NUM_ACCUMULATORS, q.device))
        kern.paged_decode(q, self.cache.k[layer], self.cache.v[layer], rows.table, rows.lens, rows.flags,
                          self.kernel_weights, out, acc, self.scale, self.tiles, scratch)
        return acc
