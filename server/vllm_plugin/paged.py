"""Telemetry accumulators of query rows over vLLM's paged K cache (pure torch, no vLLM import).

vLLM's CPU_ATTN cache of one layer is [num_blocks, num_kv_heads, block_size, 2 * head_dim]: per
(block, KV head), block_size * head_dim key elements then as many value elements. With the "vec"
ISA (AVX-512 / AVX2 machines, any dtype but bf16-with-AMX) the key part of a block is stored
column-major, [head_dim, block_size], so a block's keys are already laid out as K^T and the score
matmul needs no transpose. Other ISAs (amx, vec16, neon, fp8) pack keys differently; the caller
turns telemetry off for those (server/vllm_plugin/layer.py).

The accumulators are the ones of server/engine/attention/torch_ref.py (a flash-style kernel with
one tile): m = max s, e_j = exp(s_j - m) with masked keys given a large finite score (e_j is then
exactly 0, and e_j (s_j - m) too: no 0 * -inf), l = sum e, t = sum e (s - m), and e @ W for the
per-key weight columns of server.engine.telemetry (sink indicator, position). finalize_stats
there turns them into statistics. Everything is batched over the step's telemetry rows.
"""

from __future__ import annotations

import torch

from server.engine.telemetry import NUM_ACCUMULATORS


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


def gather_keys_t(key_blocks: torch.Tensor, block_table: torch.Tensor, num_keys: int) -> torch.Tensor:
    """K^T of each row's first num_keys cache positions (past a row's own length the keys are
    whatever its table's blocks hold; the caller masks them).

    key_blocks [NB, KVH, D, BS]; block_table [R, max_blocks] int -> [R, KVH, D, num_keys] float32.
    """
    nb, kvh, d, bs = key_blocks.shape
    r = block_table.shape[0]
    width = -(-num_keys // bs)
    ids = block_table[:, :width].reshape(-1).to(torch.long)          # [R * W]
    blocks = key_blocks.index_select(0, ids)                         # [R * W, KVH, D, BS]
    blocks = blocks.view(r, width, kvh, d, bs).permute(0, 2, 3, 1, 4)  # [R, KVH, D, W, BS]
    return blocks.reshape(r, kvh, d, width * bs)[..., :num_keys].float()  # [R, KVH, D, N]


def row_accumulators(q: torch.Tensor, keys_t: torch.Tensor, context_lens: torch.Tensor, scale: float,
                     weights: torch.Tensor) -> torch.Tensor:
    """Centred accumulators of one query row per sequence over its first context_lens keys.

    q [R, H, D]; keys_t [R, KVH, D, N] (N >= max context_lens); context_lens [R] (>= 1);
    weights [>= N, len(KEY_WEIGHT_COLUMNS)] float32 (server.engine.telemetry.key_weights).
    Returns [R, H, NUM_ACCUMULATORS] float32: l, t, sum e (j < sink), sum e j.
    """
    r, h, d = q.shape
    kvh, n = keys_t.shape[1], keys_t.shape[3]
    qg = q.float().view(r, kvh, h // kvh, d)                          # [R, KVH, G, D]
    s = torch.matmul(qg, keys_t) * scale                              # [R, KVH, G, N]
    pos = torch.arange(n, device=q.device)                            # [N]
    valid = (pos[None, :] < context_lens[:, None])[:, None, None, :]  # [R, 1, 1, N]
    s = s.masked_fill(~valid, torch.finfo(s.dtype).min / 2)           # [R, KVH, G, N] finite fill
    m = s.amax(dim=-1, keepdim=True)                                  # [R, KVH, G, 1] key 0 is valid
    shifted = s - m                                                   # [R, KVH, G, N] <= 0
    e = torch.exp(shifted)                                            # [R, KVH, G, N] 0 where masked
    l = e.sum(dim=-1, keepdim=True)                                   # [R, KVH, G, 1]
    t = (e * shifted).sum(dim=-1, keepdim=True)                       # [R, KVH, G, 1] <= 0
    sink_pos = torch.matmul(e, weights[:n])                           # [R, KVH, G, 2]
    acc = torch.cat([l, t, sink_pos], dim=-1)                         # [R, KVH, G, 4]
    return acc.reshape(r, h, NUM_ACCUMULATORS)                        # [R, H, 4]


def telemetry_rows(query_start_loc: torch.Tensor, seq_lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows that get telemetry in one step: the last query row of every sequence (a decode's
    only row, a prefill chunk's last row), skipping padding entries with no query or no keys.

    query_start_loc [B + 1]; seq_lens [B] -> (rows [R] long, indices into the flat batch;
    seqs [R] long, indices into seq_lens / block_table).
    """
    starts = query_start_loc.to(torch.long)                           # [B + 1]
    qlen = starts[1:] - starts[:-1]                                   # [B]
    seqs = torch.nonzero((qlen > 0) & (seq_lens > 0)).flatten()       # [R]
    return starts[1:][seqs] - 1, seqs                                 # [R], [R]


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
