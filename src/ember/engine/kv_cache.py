"""Block allocator for the paged KV cache, with reference counts and automatic prefix caching.

It knows nothing about tensors: a block is an index into the cache tensors the runner owns.
A full block is identified by a chained hash of (hash of the previous block, its token ids), so
equal hashes mean equal prefixes; token ids are compared on every hit to rule out collisions.
Freed blocks keep their contents and hash until they are reused (least recently freed first),
so a later request with the same prefix can still hit them.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

BlockKey = tuple[int | None, tuple[int, ...]]  # (parent hash, token ids)


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    hash: int | None = None  # set once the block is full and its K/V computed
    key: BlockKey | None = None


class BlockAllocator:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 1:
            raise ValueError("the KV cache needs at least one block")
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        # Free blocks in eviction order (oldest first); cached ones can be revived from here.
        self.free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.cached: dict[int, int] = {}  # block hash -> block id
        self.prefix_queries = 0  # prompt tokens looked up (counted by the scheduler on admission)
        self.prefix_hits = 0  # of which found in the cache

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    def usage(self) -> float:
        return 1.0 - len(self.free) / len(self.blocks)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def can_allocate(self, n: int) -> bool:
        return n <= len(self.free)

    def allocate(self, n: int) -> list[int]:
        """Take n fresh blocks (evicting cached contents of the least recently freed)."""
        if n > len(self.free):
            raise RuntimeError(f"out of KV blocks: want {n}, have {len(self.free)}")
        out = []
        for _ in range(n):
            block_id, _ = self.free.popitem(last=False)
            block = self.blocks[block_id]
            if block.hash is not None:
                if self.cached.get(block.hash) == block_id:
                    del self.cached[block.hash]
                block.hash = block.key = None
            block.ref_count = 1
            out.append(block_id)
        return out

    def free_blocks(self, block_ids: list[int]) -> None:
        # Tail blocks first, so they are evicted before the shared heads of a prefix.
        for block_id in reversed(block_ids):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free[block_id] = None
            elif block.ref_count < 0:
                raise RuntimeError(f"block {block_id} freed twice")

    def match_prefix(self, token_ids: list[int]) -> list[int]:
        """Take a reference on the cached blocks that hold a prefix of `token_ids`.

        At least one token is always left to compute, because the model must see the last
        prompt token to produce logits.
        """
        if not self.enable_prefix_caching:
            return []
        hits: list[int] = []
        parent: int | None = None
        max_full = (len(token_ids) - 1) // self.block_size
        for i in range(max_full):
            key = (parent, tuple(token_ids[i * self.block_size : (i + 1) * self.block_size]))
            block_hash = hash(key)
            block_id = self.cached.get(block_hash)
            if block_id is None or self.blocks[block_id].key != key:
                break
            hits.append(block_id)
            parent = block_hash
        for block_id in hits:
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self.free[block_id]
            block.ref_count += 1
        return hits

    def register_full_blocks(
        self, token_ids: list[int], block_table: list[int], num_computed: int, start: int
    ) -> int:
        """Publish blocks [start, num_computed // block_size) of a sequence in the prefix cache.

        Returns the new count of published blocks, which the caller passes back as `start`.
        """
        if not self.enable_prefix_caching:
            return start
        full = num_computed // self.block_size
        parent = self.blocks[block_table[start - 1]].hash if start > 0 else None
        for i in range(start, full):
            block = self.blocks[block_table[i]]
            key = (parent, tuple(token_ids[i * self.block_size : (i + 1) * self.block_size]))
            if block.hash is None:
                block.key = key
                block.hash = hash(key)
                # Keep the first owner of a hash; a duplicate stays private to its sequence.
                self.cached.setdefault(block.hash, block.block_id)
            parent = block.hash
        return max(start, full)
