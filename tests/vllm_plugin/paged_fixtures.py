"""Synthetic paged caches and the float64 reference statistics, shared by the plugin's tests and
by gpu_attn_driver.py (which runs under .venv-vllm, without pytest)."""

from __future__ import annotations

import math

import torch

BS, KVH, H, D = 32, 3, 9, 64


def _placed(keys: list[torch.Tensor], num_blocks: int, g: torch.Generator, spare_cols: int):
    """Shuffled blocks for each sequence's keys: (block_table [B, W + spare_cols] int32, the
    (block, chunk [<= BS, KVH, D]) pairs to write)."""
    width = max(-(-k.shape[0] // BS) for k in keys)
    order = torch.randperm(num_blocks, generator=g)
    table = torch.zeros(len(keys), width + spare_cols, dtype=torch.int32)
    pieces, used = [], 0
    for b, k in enumerate(keys):
        for w in range(-(-k.shape[0] // BS)):
            table[b, w] = blk = int(order[used])
            used += 1
            pieces.append((blk, k[w * BS:(w + 1) * BS]))
    return table, pieces


def paged_cache(keys: list[torch.Tensor], num_blocks: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Write each sequence's keys [n, KVH, D] into a [NB, KVH, BS, 2 D] cache the way vLLM's
    cpu_attn_reshape_and_cache does for the vec ISA (K^T per block), on shuffled blocks.
    Returns (kv_cache, block_table [B, max_blocks] int32). Unused slots hold garbage."""
    g = torch.Generator().manual_seed(seed)
    cache = torch.randn(num_blocks, KVH, BS, 2 * D, generator=g) * 50    # garbage everywhere
    table, pieces = _placed(keys, num_blocks, g, spare_cols=2)
    flat = cache.view(num_blocks, KVH, 2 * BS * D)
    for blk, chunk in pieces:                                            # chunk [<=BS, KVH, D]
        kt = flat[blk, :, :BS * D].view(KVH, D, BS)                      # column-major K block
        kt[:, :, :chunk.shape[0]] = chunk.permute(1, 2, 0)
    return cache, table


def split_cache(keys: list[torch.Tensor], num_blocks: int, seed: int = 7,
                nhd: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """The same for FLASH_ATTN / TRITON_ATTN's [NB, KVH, BS, 2 D] cache (keys in [..., :D]); nhd:
    with the NHD strides vLLM allocates on GPUs ([NB, BS, KVH, 2 D] in memory)."""
    g = torch.Generator().manual_seed(seed)
    if nhd:
        cache = (torch.randn(num_blocks, BS, KVH, 2 * D, generator=g) * 50).permute(0, 2, 1, 3)  # [NB, KVH, BS, 2 D]
    else:
        cache = torch.randn(num_blocks, KVH, BS, 2 * D, generator=g) * 50                         # [NB, KVH, BS, 2 D]
    table, pieces = _placed(keys, num_blocks, g, spare_cols=1)
    for blk, chunk in pieces:                                            # chunk [<=BS, KVH, D]
        cache[blk, :, :chunk.shape[0], :D] = chunk.permute(1, 0, 2)
    return cache, table


def reference(q: torch.Tensor, k: torch.Tensor, sink: int = 4) -> torch.Tensor:
    """float64 statistics of one row: q [H, D], k [n, KVH, D] -> [H, 5] in STAT_NAMES order."""
    q, k = q.double(), k.double()
    n = k.shape[0]
    kk = k.repeat_interleave(H // KVH, dim=1)                              # [n, H, D]
    s = torch.einsum("hd,nhd->hn", q, kk) / math.sqrt(D)                   # [H, n]
    p = torch.softmax(s, dim=-1)                                           # [H, n]
    ent = -(p * torch.log(p.clamp_min(1e-300))).sum(-1)                    # [H]
    norm = ent / math.log(n) if n > 1 else torch.zeros_like(ent)
    i = n - 1
    pos = torch.arange(n, dtype=torch.float64)
    look = (i - (p * pos).sum(-1)) / i if i > 0 else torch.zeros_like(ent)
    return torch.stack([ent, norm, p.amax(-1), p[:, :sink].sum(-1), look], dim=-1)
