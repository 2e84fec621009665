"""Paged attention with per-head telemetry (the reference torch path; CPU and CUDA).

Decode rows (one query token per sequence) run batched: each sequence's keys are gathered from
the paged cache into a padded [B, N] block, masked past its context length. Prefill chunks run
per sequence through torch's scaled_dot_product_attention with a causal mask offset by the
cached prefix.

Telemetry (DESIGN.md, "Per-head telemetry"): for each row that needs it we compute, in the same
pass that produces the attention output, the centred accumulators of a flash-style kernel with
a single tile: m = max s, e_j = exp(s_j - m), l = sum e, t = sum e (s - m) <= 0. Masked keys
get a large finite score instead of -inf, so e_j is exactly 0 there and e_j (s_j - m) is 0 too
(0 * -inf would be NaN): no separate masking pass. The two weighted sums come out of one matmul
of e with fixed per-key weights (j < 4, j), built once per step. The output is bit-identical
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

from server.engine.kv_cache import KVCache
from server.engine.telemetry import NUM_ACCUMULATORS, key_weights

@dataclass(frozen=True)
class PrefillSpan:
    """One sequence's multi-token chunk within the flat batch of query rows."""

    start: int                 # first row of the chunk in the flat batch
    length: int                # query rows in the chunk
    slots: torch.Tensor        # [C] cache slots of every key the chunk sees (C = cached + length)
    want_stats: bool           # the chunk's last row samples a token: compute its telemetry


@dataclass(frozen=True)
class AttentionMetadata:
    """Where each layer's attention reads and writes; built once per step by the runner.

    Telemetry rows come out in this order: every decode row, then the last row of each
    prefill span with want_stats (only when compute_stats is set).
    """

    slot_mapping: torch.Tensor         # [T] cache slot of each new token
    decode_rows: torch.Tensor          # [Bd] rows of the flat batch that are single-token queries
    decode_slots: torch.Tensor         # [Bd, N] cache slots of their keys, padded with 0
    decode_context_lens: torch.Tensor  # [Bd] keys each decode row sees
    prefills: tuple[PrefillSpan, ...]
    compute_stats: bool
    sink_tokens: int = 4
    decode_key_weights: torch.Tensor | None = None  # [N, 2] key_weights() of the decode keys, when stats


    @property
    def num_decode(self) -> int:
        return int(self.decode_rows.shape[0])


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
    qh = q.transpose(0, 1)                                           # [H, n, D]
    kh = k.transpose(0, 1).repeat_interleave(h // kvh, dim=0)        # [H, C, D]
    vh = v.transpose(0, 1).repeat_interleave(h // kvh, dim=0)        # [H, C, D]
    if c == n:
        out = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=scale)  # [H, n, D]
    else:
        rows = torch.arange(n, device=q.device)[:, None] + (c - n)   # [n, 1] query positions
        mask = torch.arange(c, device=q.device)[None, :] <= rows      # [n, C]
        out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=scale)  # [H, n, D]
    return out.transpose(0, 1)                                       # [n, H, D]


def paged_attention(layer: int, q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, cache: KVCache,
                    meta: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Write the step's new K/V into the cache, then attend every query row.

    q [T, H, D]; k_new, v_new [T, KVH, D]. Returns out [T, H, D] and, when meta.compute_stats,
    accumulators [R, H, NUM_ACCUMULATORS] in the metadata's telemetry-row order.
    """
    scale = 1.0 / math.sqrt(q.shape[-1])
    cache.write(layer, meta.slot_mapping, k_new, v_new)
    out = torch.empty_like(q)                                        # [T, H, D]
    parts: list[torch.Tensor] = []
    if meta.num_decode:
        k, v = cache.gather(layer, meta.decode_slots)                # [Bd, N, KVH, D]
        o, st = attend(q[meta.decode_rows], k, v, meta.decode_context_lens, scale,
                       meta.compute_stats, meta.sink_tokens, meta.decode_key_weights)  # [Bd, H, D], [Bd, H, 4]
        out[meta.decode_rows] = o
        if st is not None:
            parts.append(st)
    for span in meta.prefills:
        k, v = cache.gather(layer, span.slots)                       # [C, KVH, D]
        qs = q[span.start:span.start + span.length]                  # [n, H, D]
        out[span.start:span.start + span.length] = prefill_attention(qs, k, v, scale)
        if meta.compute_stats and span.want_stats:
            ctx = torch.tensor([k.shape[0]], device=q.device)        # [1]
            _, st = attend(qs[-1:], k[None], v[None], ctx, scale, True, meta.sink_tokens)  # [1, H, 4]
            parts.append(st)
    acc = (parts[0] if len(parts) == 1 else torch.cat(parts)) if parts else None  # [R, H, 4]
    return out, acc
