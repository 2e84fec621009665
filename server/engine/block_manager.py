"""Paged-block allocator: ref counts, prefix caching of full blocks, lazy eviction (no torch).

A sequence owns a block table (list of block ids). Full blocks whose K/V have been computed are
*committed* under a key that chains the block's tokens to its parent block's key, so a later
sequence with the same token prefix can share them (ref count > 1). A block whose ref count
drops to zero goes to the free queue but keeps its key: it is only evicted (its key dropped)
when the allocator hands it out again, oldest-freed first. Keys compare the full token chain
by equality, so a hash collision can never produce a wrong hit.

Two-phase use, as the scheduler needs it: `can_allocate` asks, `allocate` changes state.
References: vLLM v1 KVCacheManager / BlockPool; nano-vllm block_manager.py.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass


class BlockKey:
    """Identity of a full block's contents: its tokens and its parent's key (the whole prefix)."""

    __slots__ = ("parent", "tokens", "_hash")

    def __init__(self, parent: BlockKey | None, tokens: tuple[int, ...]) -> None:
        self.parent = parent
        self.tokens = tokens
        self._hash = hash((parent._hash if parent is not None else 0, tokens))

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, BlockKey):
            return NotImplemented
        a: BlockKey | None = self
        b: BlockKey | None = other
        while a is not b:  # a loop, not recursion: chains can be thousands of blocks long
            if a is None or b is None or a._hash != b._hash or a.tokens != b.tokens:
                return False
            a, b = a.parent, b.parent
        return True


@dataclass
class _Block:
    block_id: int
    ref_count: int = 0
    key: BlockKey | None = None


@dataclass(frozen=True)
class PrefixHit:
    """Cached blocks that cover the first num_tokens tokens of a sequence."""

    block_ids: tuple[int, ...]
    num_tokens: int


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError("num_blocks and block_size must be > 0")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._blocks = [_Block(i) for i in range(num_blocks)]
        self._free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self._cached: dict[BlockKey, dict[int, None]] = {}  # key -> blocks holding it (oldest first)
        self.prefix_queries = 0  # tokens looked up
        self.prefix_hits = 0     # tokens found cached

    # -- queries (no state change) ---------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of blocks held by live sequences (cached-but-free blocks count as free)."""
        return 1.0 - len(self._free) / self.num_blocks

    def ref_count(self, block_id: int) -> int:
        return self._blocks[block_id].ref_count

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def find_prefix(self, token_ids: Sequence[int]) -> PrefixHit:
        """Longest chain of committed blocks equal to a prefix of token_ids.

        At least one token is always left to compute (its logits give the next token), so at
        most (len - 1) // block_size blocks can hit.
        """
        if not self.enable_prefix_caching:
            return PrefixHit((), 0)
        bs = self.block_size
        hits: list[int] = []
        parent: BlockKey | None = None
        for b in range((len(token_ids) - 1) // bs):
            key = BlockKey(parent, tuple(token_ids[b * bs:(b + 1) * bs]))
            holders = self._cached.get(key)
            if not holders:
                break
            block_id = next(iter(holders))
            hits.append(block_id)
            parent = self._blocks[block_id].key
        return PrefixHit(tuple(hits), len(hits) * bs)

    def can_allocate(self, num_new_blocks: int, reuse: Sequence[int] = ()) -> bool:
        """Whether num_new_blocks fresh blocks can be handed out after taking the `reuse` hits."""
        reclaimed = sum(1 for b in reuse if self._blocks[b].ref_count == 0)
        return num_new_blocks <= len(self._free) - reclaimed

    # -- state changes ----------------------------------------------------------------------
    def allocate(self, block_table: list[int], num_new_blocks: int, reuse: Sequence[int] = ()) -> None:
        """Append the `reuse` hits (ref count + 1) and num_new_blocks fresh blocks to block_table."""
        if not self.can_allocate(num_new_blocks, reuse):
            raise RuntimeError("allocate() called without room; ask can_allocate() first")
        for block_id in reuse:
            block = self._blocks[block_id]
            if block.ref_count == 0:
                del self._free[block_id]
            block.ref_count += 1
            block_table.append(block_id)
        for _ in range(num_new_blocks):
            block_id, _ = self._free.popitem(last=False)
            block = self._blocks[block_id]
            if block.key is not None:  # lazy eviction: the cached contents are overwritten now
                holders = self._cached.get(block.key)
                if holders is not None:
                    holders.pop(block_id, None)
                    if not holders:
                        del self._cached[block.key]
                block.key = None
            block.ref_count = 1
            block_table.append(block_id)

    def free(self, block_table: list[int]) -> None:
        """Drop one reference to each block of the table and empty it. Tail blocks are queued
        for eviction before head blocks, since heads are the likelier shared prefixes."""
        for block_id in reversed(block_table):
            block = self._blocks[block_id]
            if block.ref_count <= 0:
                raise RuntimeError(f"block {block_id} freed more often than allocated")
            block.ref_count -= 1
            if block.ref_count == 0:
                self._free[block_id] = None
        block_table.clear()

    def commit(self, block_table: Sequence[int], token_ids: Sequence[int], num_computed_tokens: int,
               num_committed_blocks: int = 0) -> int:
        """Make every full, computed block of a sequence findable by later sequences.

        Blocks before num_committed_blocks are already committed; returns the new count.
        """
        num_full = min(num_computed_tokens // self.block_size, len(block_table))
        if not self.enable_prefix_caching or num_full <= num_committed_blocks:
            return max(num_committed_blocks, 0) if self.enable_prefix_caching else 0
        bs = self.block_size
        parent = self._blocks[block_table[num_committed_blocks - 1]].key if num_committed_blocks > 0 else None
        for b in range(num_committed_blocks, num_full):
            block = self._blocks[block_table[b]]
            if block.key is None:
                key = BlockKey(parent, tuple(token_ids[b * bs:(b + 1) * bs]))
                holders = self._cached.get(key)
                if holders:  # share the existing key object: later comparisons stop at identity
                    key = self._blocks[next(iter(holders))].key
                    holders[block.block_id] = None
                else:
                    self._cached[key] = {block.block_id: None}
                block.key = key
            parent = block.key
        return num_full

    def record_lookup(self, num_tokens: int, num_hit_tokens: int) -> None:
        self.prefix_queries += num_tokens
        self.prefix_hits += num_hit_tokens
