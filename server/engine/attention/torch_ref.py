"""The reference attention backend: paged attention with per-head telemetry in torch ops (CPU and CUDA).

Decode rows (one query token per sequence) run batched: each sequence's keys are gathered from
the paged cache into a padded [B, N] block, masked past its context length. Each prefill chunk
gathers its keys once; all rows but the last run through torch's scaled_dot_product_attention
with a causal mask offset by the cached prefix, the last row (the one that samples) through the
same single-row attention as decodes, which also yields its telemetry.

Telemetry (DESIGN.md, "Per-head telemetry"): for each row that needs it we compute, in the same
pass that produces the attention output, the centred accumulators of a flash-style kernel with
a single tile: m = max s, e_j = exp(s_j - m), l = sum e, t = sum e (s - m) <= 0. Masked keys
get a large finite score instead of -inf, so e_j is exactly 0 there and e_j (s_j - m) is 0 too
(0 * -inf would be NaN): no separate masking pass. The two weighted sums come out of one matmul
of e with fixed per-key weights (j < sink_tokens, j), built once at start-up. The output is bit-identical
with telemetry on or off (l is the same sum either way), so sampling telemetry never changes
a generated token. Then entropy H = ln l - t/l (both terms >= 0, no cancellation),
max weight 1/l, sink mass sum_{j<4} e_j / l, look-back distance (i - sum e_j j / l) / i.
The probabilities e/l that weight V are the only ones ever formed. Each layer only carries the
four accumulators (l, t, sink sum, position-weighted sum); finalize_stats turns every layer's
rows into statistics in one call per step, which keeps the per-layer cost to a few ops.

References: FlashAttention-2 (online softmax), DESIGN.md's fused-entropy recurrence,
StreamingLLM (attention sinks), ViT mean attention distance.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from server.engine.attention.metadata import AttentionMetadata
from server.engine.kv_cache import KVCache
from server.engine.telemetry import NUM_ACCUMULATORS, key_weights


def weights_dtype(cache_dtype: torch.dtype) -> torch.dtype:
    """The dtype of a backend's key-weight table: the cache's, but float32 for a bfloat16 cache
    (whose activations stay float32; bfloat16 cannot hold positions past 256 exactly)."""
    return torch.float32 if cache_dtype == torch.bfloat16 else cache_dtype


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, context_lens: torch.Tensor, scale: float,
           compute_stats: bool, sink_tokens: int = 4,
           weights: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Attention of one query row per sequence over its first context_lens keys, with telemetry.

    q [B, H, D]; k, v [B, N, KVH, D]; context_lens [B] (>= 1). The query sits at position
    context_lens - 1. Keys past a row's context are masked; their values must be finite (the
    runner points them at the cache's zero slot). Returns out [B, H, D] and the telemetry
    accumulators [B, H, NUM_ACCUMULATORS] (or None); finalize_stats turns them into statistics.
    weights: key_weights(N, sink_tokens) when the caller has them already (built once per step).
    """
    b, h, d = q.shape
    n, kvh = k.shape[1], k.shape[2]
    g = h // kvh
    qg = q.view(b, kvh, g, d)                                        # [B, KVH, G, D]
    kt = k.permute(0, 2, 3, 1)                                       # [B, KVH, D, N]
    s = torch.matmul(qg, kt) * scale                                 # [B, KVH, G, N]
    pos = torch.arange(n, device=q.device)                           # [N]
    valid = (pos[None, :] < context_lens[:, None])[:, None, None, :]  # [B, 1, 1, N]
    # finite fill: exp(fill - m) is exactly 0 and 0 * (fill - m) is 0, where -inf would give NaN
    s = s.masked_fill(~valid, torch.finfo(s.dtype).min / 2)          # [B, KVH, G, N]
    m = s.amax(dim=-1, keepdim=True)                                 # [B, KVH, G, 1] a valid score: key 0 is valid
    shifted = s - m                                                  # [B, KVH, G, N] <= 0, huge negative where masked
    e = torch.exp(shifted)                                           # [B, KVH, G, N] exactly 0 where masked
    l = e.sum(dim=-1, keepdim=True)                                  # [B, KVH, G, 1]
    out = (torch.matmul(e, v.permute(0, 2, 1, 3)) / l).reshape(b, h, d)  # [B, H, D]
    if not compute_stats:
        return out, None
    if weights is None:
        weights = key_weights(n, sink_tokens, q.device, q.dtype)    # [N, 2]
    t = (e * shifted).sum(dim=-1, keepdim=True)                      # [B, KVH, G, 1] <= 0
    sink_pos = torch.matmul(e, weights)                              # [B, KVH, G, 2] sum e (j < 4), sum e j
    acc = torch.cat([l, t, sink_pos], dim=-1)                        # [B, KVH, G, 4]
    return out, acc.reshape(b, h, NUM_ACCUMULATORS)                  # [B, H, 4]


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal attention of a chunk's n query rows over C >= n keys (the first C - n cached).

    q [n, H, D]; k, v [C, KVH, D] -> out [n, H, D].
    """
    n, h, _ = q.shape
    c, kvh, _ = k.shape
    # a leading batch dim of 1: with 4-D inputs torch's CPU SDPA takes its flash kernel, with
    # 3-D ones the unfused math path (3x slower on a 256-row chunk over 1,000 keys)
    qh = q.transpose(0, 1)[None]                                     # [1, H, n, D]
    kh = k.transpose(0, 1).repeat_interleave(h // kvh, dim=0)[None]  # [1, H, C, D]
    vh = v.transpose(0, 1).repeat_interleave(h // kvh, dim=0)[None]  # [1, H, C, D]
    if c == n:
        out = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=scale)  # [1, H, n, D]
    else:
        rows = torch.arange(n, device=q.device)[:, None] + (c - n)   # [n, 1] query positions
        mask = torch.arange(c, device=q.device)[None, :] <= rows      # [n, C]
        out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=scale)  # [1, H, n, D]
    return out[0].transpose(0, 1)                                    # [n, H, D]


@dataclass(frozen=True)
class PrefillSpan:
    """One prefill sequence's chunk: rows start .. start + length - 1 of the flat batch."""

    start: int                 # first query row
    length: int                # query rows (>= 2)
    slots: torch.Tensor        # [C] cache slots of every key the chunk's last row sees
    want_stats: bool           # the last row computes telemetry this step


def decode_stats_rows(stats: list[int], num_decodes: int, device: torch.device) -> torch.Tensor | None:
    """[Rd] the decode rows (of 0 .. num_decodes - 1) that compute telemetry, in order; None when
    that is all of them or there are none to pick (no telemetry, no decodes)."""
    if not stats or not num_decodes or stats[:num_decodes] == list(range(num_decodes)):
        return None
    return torch.tensor([s for s in stats if s < num_decodes], dtype=torch.long, device=device)  # [Rd]


def prefill_spans(meta: AttentionMetadata, stats: list[int], block_offsets: torch.Tensor
                  ) -> tuple[PrefillSpan, ...]:
    """The prefill chunks of a step (sequences num_decodes ..), each with the cache slots of all
    its keys. stats: the sequences whose last row computes telemetry; block_offsets [bs] = 0..bs-1."""
    bs = block_offsets.shape[0]
    want = set(stats)
    qsl = meta.query_start_loc_cpu.tolist()
    lens = meta.seq_lens_cpu.tolist()
    spans = []
    for b in range(meta.num_decodes, meta.num_seqs):
        c = lens[b]
        table = meta.block_table[b, :-(-c // bs)]                                             # [W]
        slots = (table[:, None] * bs + block_offsets).reshape(-1)[:c]                         # [C]
        spans.append(PrefillSpan(qsl[b], qsl[b + 1] - qsl[b], slots, b in want))
    return tuple(spans)


def attend_prefill(cache: KVCache, layer: int, q: torch.Tensor, out: torch.Tensor, span: PrefillSpan,
                   scale: float, sink_tokens: int, weights: torch.Tensor) -> torch.Tensor | None:
    """One prefill chunk: rows but the last through prefill_attention, the last (the one that
    samples) through attend(), whether or not it computes telemetry, so outputs never depend on it.
    q, out [T, H, D] (out written in place); weights [P, 2] key weights of every position.
    Returns the last row's accumulators [1, H, 4] when span.want_stats, else None."""
    kc, vc = cache.gather(layer, span.slots, q.dtype)                # [C, KVH, D]
    first, last = span.start, span.start + span.length - 1
    out[first:last] = prefill_attention(q[first:last], kc[:-1], vc[:-1], scale)  # [n - 1, H, D]
    c = kc.shape[0]
    ctx = torch.full((1,), c, dtype=torch.long, device=q.device)      # [1]
    o, acc = attend(q[last:last + 1], kc[None], vc[None], ctx, scale, span.want_stats, sink_tokens,
                    weights[:c].to(q.dtype))                         # [1, H, D], [1, H, 4]
    out[last:last + 1] = o
    return acc


@dataclass(frozen=True)
class TorchPlan:
    """The torch backend's per-step indices, derived once per step from AttentionMetadata."""

    slot_mapping: torch.Tensor         # [T] cache slot of each new token (AttentionMetadata's)
    num_decodes: int
    decode_slots: torch.Tensor | None  # [Bd, N] cache slots of the decode rows' keys, pad_slot past each length
    decode_lens: torch.Tensor          # [Bd] keys each decode row sees
    decode_stats: torch.Tensor | None  # [Rd] decode rows that compute telemetry, None when all (or no stats)
    prefills: tuple[PrefillSpan, ...]
    compute_stats: bool


class TorchAttentionBackend:
    """The reference backend: torch ops only, any device.

    Decode rows run batched over keys gathered into a padded [Bd, N] block. Each prefill chunk
    gathers its keys once: rows but the last go through scaled_dot_product_attention, the last
    row (the one that samples) through attend(), so it is attended once and its telemetry comes
    from the same pass; it takes that path whether or not telemetry is on, so outputs never
    depend on it. Per-key weights are sliced from one table built at start-up.
    """

    name = "torch"

    def __init__(self, cache: KVCache, sink_tokens: int, max_positions: int | None = None) -> None:
        self.cache = cache
        self.sink_tokens = sink_tokens
        k0 = cache.k[0]                                                    # [num_blocks + 1, bs, KVH, D]
        self.scale = 1.0 / math.sqrt(k0.shape[-1])
        n = max_positions or cache.num_blocks * cache.block_size
        self.key_weights = key_weights(n, sink_tokens, k0.device, weights_dtype(k0.dtype))  # [P, 2]
        self.positions = torch.arange(n, device=k0.device)                     # [P]
        self.block_offsets = torch.arange(cache.block_size, device=k0.device)  # [bs]

    @staticmethod
    def supports(device: torch.device) -> bool:
        return True

    def prepare(self, meta: AttentionMetadata) -> TorchPlan:
        bd = meta.num_decodes
        stats = meta.stats_seqs_cpu.tolist() if meta.stats_seqs_cpu is not None else []
        decode_stats = decode_stats_rows(stats, bd, meta.block_table.device)                       # [Rd] or None
        decode_lens = meta.seq_lens[:bd]                                                          # [Bd]
        decode_slots = (self._slots(meta.block_table[:bd], decode_lens, int(meta.seq_lens_cpu[:bd].max()))
                        if bd else None)                                                          # [Bd, N]
        prefills = prefill_spans(meta, stats, self.block_offsets)
        return TorchPlan(meta.slot_mapping, bd, decode_slots, decode_lens, decode_stats, prefills, bool(stats))

    def _slots(self, table: torch.Tensor, lens: torch.Tensor, n: int) -> torch.Tensor:
        """Cache slots of the first lens[b] positions of each block-table row, the zero slot
        past them. table [B, max_blocks] int32, lens [B] -> [B, n]."""
        bs = self.cache.block_size
        width = -(-n // bs)
        slots = (table[:, :width, None] * bs + self.block_offsets).view(table.shape[0], -1)[:, :n]  # [B, n]
        inside = self.positions[:n] < lens[:, None]                                               # [B, n]
        return torch.where(inside, slots, self.cache.pad_slot)                                    # [B, n]

    def forward(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                plan: TorchPlan) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Write the step's new K/V into the cache, then attend every query row.

        q [T, H, D]; k, v [T, KVH, D]. Returns out [T, H, D] and, when telemetry is on this
        step, accumulators [R, H, NUM_ACCUMULATORS] in AttentionMetadata.stats_seqs_cpu order.
        """
        cache, scale, sink = self.cache, self.scale, self.sink_tokens
        cache.write(layer, plan.slot_mapping, k, v)
        out = torch.empty_like(q)                                        # [T, H, D]
        parts: list[torch.Tensor] = []
        bd = plan.num_decodes
        if bd:
            kd, vd = cache.gather(layer, plan.decode_slots, q.dtype)     # [Bd, N, KVH, D]
            weights = self.key_weights[:kd.shape[1]]                     # [N, 2]
            o, acc = attend(q[:bd], kd, vd, plan.decode_lens, scale, plan.compute_stats, sink, weights)
            out[:bd] = o                                                 # [Bd, H, D]
            if acc is not None:
                parts.append(acc if plan.decode_stats is None else acc[plan.decode_stats])  # [Rd, H, 4]
        for span in plan.prefills:
            acc = attend_prefill(cache, layer, q, out, span, scale, sink, self.key_weights)  # [1, H, 4] or None
            if acc is not None:
                parts.append(acc)
        if not parts:
            return out, None
        return out, parts[0] if len(parts) == 1 else torch.cat(parts)   # [R, H, 4]
