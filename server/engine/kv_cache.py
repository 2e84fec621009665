"""Paged K/V storage: per layer, K and V pages of shape [num_blocks, block_size, num_kv_heads, head_dim].

A token at position p of a sequence lives in slot block_table[p // block_size] * block_size
+ p % block_size. One extra block past the allocator's blocks stays all zeros and is never
written: padded reads point at it (pad_slot), so a padded key or value is always a finite 0. Writes go through a slot mapping (one slot per new token); reads gather a
sequence's slots. Sizing turns a memory budget into a number of blocks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from server.config import CacheConfig, ModelConfig


def num_blocks_for(model: ModelConfig, cache: CacheConfig, max_model_len: int, dtype_bytes: int = 4) -> int:
    """Blocks that fit the memory budget (or cache.num_blocks). Raises ValueError when one
    request of max_model_len tokens could not fit, so the whole window is always usable."""
    bytes_per_block = model.kv_bytes_per_token(dtype_bytes) * cache.block_size
    num_blocks = cache.num_blocks if cache.num_blocks is not None else cache.memory_bytes // bytes_per_block
    needed = -(-max_model_len // cache.block_size)
    if num_blocks < needed:
        raise ValueError(
            f"KV cache of {num_blocks} blocks x {cache.block_size} tokens holds fewer than max_model_len="
            f"{max_model_len} tokens; give it at least {needed * bytes_per_block / 2**20:.0f} MiB "
            f"or lower max_model_len")
    return num_blocks


@dataclass
class KVCache:
    """K and V pages of every layer. Allocated once; the block manager decides who owns what."""

    k: list[torch.Tensor]  # L x [num_blocks + 1, block_size, KVH, D]
    v: list[torch.Tensor]  # L x [num_blocks + 1, block_size, KVH, D]

    @classmethod
    def allocate(cls, model: ModelConfig, num_blocks: int, block_size: int,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> KVCache:
        """num_blocks usable blocks, plus the zero padding block. The usable blocks are left
        uninitialized: every slot is written before any read sees it (reads stop at a sequence's
        length or go to the padding block), and on a CPU the pages of blocks never used are never
        touched, so resident memory grows with the tokens the cache has held, not its budget."""
        shape = (num_blocks + 1, block_size, model.num_kv_heads, model.head_dim)

        def pages() -> torch.Tensor:
            t = torch.empty(shape, device=device, dtype=dtype)  # [num_blocks + 1, bs, KVH, D]
            t[num_blocks].zero_()                                # the padding block
            return t

        return cls(k=[pages() for _ in range(model.num_layers)], v=[pages() for _ in range(model.num_layers)])

    @property
    def num_blocks(self) -> int:
        """Blocks the allocator may hand out (the padding block excluded)."""
        return self.k[0].shape[0] - 1

    @property
    def pad_slot(self) -> int:
        """A slot that always reads as zeros."""
        return self.num_blocks * self.block_size

    @property
    def block_size(self) -> int:
        return self.k[0].shape[1]

    @property
    def dtype(self) -> torch.dtype:
        return self.k[0].dtype

    def write(self, layer: int, slot_mapping: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store new tokens' K/V (rounded to the cache's dtype). slot_mapping [T]; k, v [T, KVH, D]."""
        kvh, d = k.shape[1], k.shape[2]
        dt = self.dtype
        self.k[layer].view(-1, kvh, d).index_copy_(0, slot_mapping, k.to(dt))  # [num_blocks * bs, KVH, D]
        self.v[layer].view(-1, kvh, d).index_copy_(0, slot_mapping, v.to(dt))  # [num_blocks * bs, KVH, D]

    def gather(self, layer: int, slots: torch.Tensor,
               dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """K/V at the given slots, as dtype (default: the cache's). slots [...] -> k, v [..., KVH, D]."""
        kvh, d = self.k[layer].shape[2], self.k[layer].shape[3]
        k = self.k[layer].view(-1, kvh, d)[slots]  # [..., KVH, D]
        v = self.v[layer].view(-1, kvh, d)[slots]  # [..., KVH, D]
        return (k, v) if dtype is None else (k.to(dtype), v.to(dtype))

