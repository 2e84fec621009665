"""Telemetry accumulators of query rows over vLLM's paged K cache (pure torch, no vLLM import).

Two cache layouts are read, both [num_blocks, num_kv_heads, block_size, 2 * head_dim] logically:
- vLLM's CPU_ATTN cache with the "vec" ISA (AVX-512 / AVX2 machines, any dtype but
  bf16-with-AMX): per (block, KV head), block_size * head_dim key elements stored column-major,
  [head_dim, block_size], then as many value elements; a block's keys are already K^T
  (vec_key_blocks). Other ISAs (amx, vec16, neon, fp8) pack keys differently; the caller turns
  telemetry off for those (server/vllm_plugin/layer.py).
- FLASH_ATTN's and TRITON_ATTN's cache (GPUs): element [b, h, j, :head_dim] is the key of slot j
  (the values follow in [head_dim:]); the physical strides may be NHD, the view handles them
  (split_key_blocks).

The accumulators are the ones of server/engine/attention/torch_ref.py (a flash-style kernel with
one tile): m = max s, e_j = exp(s_j - m) with masked keys given a large finite score (e_j is then
exactly 0, and e_j (s_j - m) too: no 0 * -inf), l = sum e, t = sum e (s - m), and e @ W for the
per-key weight columns of server.engine.telemetry (sink indicator, position; l rides along as a
column of ones). finalize_stats there turns them into statistics. Everything is batched over the
step's telemetry rows; the scores are computed block by block straight from the gathered cache
blocks (no K copy in another layout), and what all layers of a step share (rows, lengths,
block ids, mask) is built once per step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from server.engine.telemetry import NUM_ACCUMULATORS, key_weights


def vec_key_blocks(kv_cache: torch.Tensor) -> torch.Tensor:
    """The key half of a CPU_ATTN "vec" cache as K^T blocks (a view, no copy).

    kv_cache [NB, KVH, BS, 2 * D] -> [NB, KVH, D, BS]: element [b, h, d, j] is dimension d of the
    key in slot j of block b for KV head h.
    """
    nb, kvh, bs, two_d = kv_cache.shape
    d = two_d // 2
    halves = kv_cache.view(nb, kvh, 2 * bs, d)                       # [NB, KVH, 2 BS, D]
    keys = halves[:, :, :bs]                                         # [NB, KVH, BS, D] memory of [D, BS]
    return keys.view(nb, kvh, d, bs)                                 # [NB, KVH, D, BS]


def split_key_blocks(kv_cache: torch.Tensor) -> torch.Tensor:
    """The key half of a FLASH_ATTN / TRITON_ATTN cache as K^T blocks (a view, no copy).

    kv_cache [NB, KVH, BS, 2 * D] (any strides) -> [NB, KVH, D, BS].
    """
    d = kv_cache.shape[-1] // 2
    return kv_cache[..., :d].transpose(2, 3)                         # [NB, KVH, D, BS]


@dataclass(frozen=True)
class StepRows:
    """What every layer of one step shares (built once per step, see shared_step_rows)."""

    rows: torch.Tensor          # [R] long, index of each telemetry row in the flat batch
    first_rows: bool            # rows are 0 .. R - 1 (a decode-only step): q[:R] needs no gather
    lens: torch.Tensor          # [R] long, keys each row sees (its query position + 1)
    block_ids: torch.Tensor     # [R * W] long, each row's first W cache blocks
    masked: torch.Tensor | None  # [R, 1, 1, N] bool, True for keys past a row's length; None: all rows see N
    width: int                  # W = ceil(N / block_size)
    num_keys: int               # N = max(lens)


def step_rows(query_start_loc: torch.Tensor, seq_lens: torch.Tensor, block_table: torch.Tensor,
              block_size: int) -> StepRows | None:
    """The step's telemetry rows (the last query row of every sequence: a decode's only row, a
    prefill chunk's last row; padding entries with no query or no keys are skipped) and where
    their keys live. query_start_loc [B + 1]; seq_lens [B]; block_table [B, max_blocks].
    None when the step has no such row."""
    starts = query_start_loc.to(torch.long)                           # [B + 1]
    qlen = starts[1:] - starts[:-1]                                   # [B]
    seqs = torch.nonzero((qlen > 0) & (seq_lens[:qlen.shape[0]] > 0)).flatten()  # [R]
    if seqs.numel() == 0:
        return None
    lens = seq_lens.to(torch.long)[seqs]                              # [R]
    n = int(lens.max())
    width = -(-n // block_size)
    block_ids = block_table[seqs, :width].reshape(-1).to(torch.long)  # [R * W]
    masked = (torch.arange(n, device=lens.device)[None, :] >= lens[:, None])[:, None, None, :]  # [R, 1, 1, N]
    rows = starts[1:][seqs] - 1                                       # [R]
    r = rows.shape[0]
    return StepRows(rows=rows, first_rows=int(rows[-1]) == r - 1, lens=lens, block_ids=block_ids,
                    masked=masked if bool(masked.any()) else None, width=width, num_keys=n)


def shared_step_rows(meta: object, block_size: int) -> StepRows | None:
    """step_rows of an attention-metadata object (query_start_loc, seq_lens, block_table), built by
    the first layer that asks and kept on the object itself: every layer of the step reads the
    same metadata object, and the next step brings a new one, so nothing outlives the step."""
    cached = meta.__dict__.get("_headwise_step_rows", _MISSING)
    if cached is _MISSING:
        cached = step_rows(meta.query_start_loc, meta.seq_lens, meta.block_table, block_size)
        meta.__dict__["_headwise_step_rows"] = cached
    return cached


_MISSING = object()


def telemetry_queries(query: torch.Tensor, step: StepRows) -> torch.Tensor:
    """The telemetry rows of a layer's q: query [T, H, D] -> [R, H, D] (a view for decode-only steps)."""
    return query[:step.rows.shape[0]] if step.first_rows else query.index_select(0, step.rows)


def row_accumulators(q: torch.Tensor, key_blocks: torch.Tensor, step: StepRows, scale: float,
                     weights: torch.Tensor) -> torch.Tensor:
    """Centred accumulators of each telemetry row over its keys, read straight from the cache.

    q [R, H, D] (the step's telemetry rows of the layer's q); key_blocks [NB, KVH, D, BS]
    (vec_key_blocks); weights [>= N, 1 + len(KEY_WEIGHT_COLUMNS)]: a column of ones, then
    server.engine.telemetry.key_weights. Returns [R, H, NUM_ACCUMULATORS] float32: l, t,
    sum e (j < sink), sum e j.
    """
    r, h, d = q.shape
    nb, kvh, _, bs = key_blocks.shape
    w, n = step.width, step.num_keys
    blocks = key_blocks.index_select(0, step.block_ids).view(r, w, kvh, d, bs).float()  # [R, W, KVH, D, BS]
    qg = (q.float() * scale).view(r, 1, kvh, h // kvh, d)            # [R, 1, KVH, G, D]
    s = torch.matmul(qg, blocks)                                     # [R, W, KVH, G, BS]
    s = s.permute(0, 2, 3, 1, 4).reshape(r, kvh, h // kvh, w * bs)[..., :n]  # [R, KVH, G, N]
    if step.masked is not None:
        s = s.masked_fill(step.masked, torch.finfo(s.dtype).min / 2)  # [R, KVH, G, N] finite fill
    m = s.amax(dim=-1, keepdim=True)                                 # [R, KVH, G, 1] key 0 is valid
    shifted = s - m                                                  # [R, KVH, G, N] <= 0
    e = torch.exp(shifted)                                           # [R, KVH, G, N] 0 where masked
    l_sink_pos = torch.matmul(e, weights[:n])                        # [R, KVH, G, 3] sum e, sum e (j < 4), sum e j
    t = (e * shifted).sum(dim=-1, keepdim=True)                      # [R, KVH, G, 1] <= 0
    acc = torch.cat([l_sink_pos[..., :1], t, l_sink_pos[..., 1:]], dim=-1)  # [R, KVH, G, 4]
    return acc.reshape(r, h, NUM_ACCUMULATORS)                       # [R, H, 4]


def weight_table(n: int, sink_tokens: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """[n, 3] on device: a column of ones (for l), then key_weights(n, sink_tokens)."""
    kw = key_weights(n, sink_tokens, device)                         # [n, 2]
    return torch.cat([torch.ones(n, 1, device=device), kw], dim=-1)  # [n, 3]


class StepSampler:
    """Which steps compute telemetry: an even stride with exactly a `rate` fraction of steps
    over any long run (step k is taken when floor((k + 1) rate) > floor(k rate)), deterministic,
    so every layer and every tensor-parallel rank takes the same steps."""

    def __init__(self, rate: float) -> None:
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"telemetry sample rate must be in [0, 1], got {rate}")
        self.rate = rate
        self._step = 0

    def take(self) -> bool:
        k = self._step
        self._step += 1
        return int((k + 1) * self.rate) > int(k * self.rate)
