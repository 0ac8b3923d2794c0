"""Paged KV cache: a preallocated pool of fixed-size blocks and per-sequence block tables.

The pool owns memory; a `BlockTable` owns a sequence's blocks and its length. Growing a sequence
allocates blocks, `truncate` rolls back the last k positions (ISD drops MASK rows and rejected
drafts every step) and returns blocks that became empty, `free` returns them all.
"""
from __future__ import annotations

import torch

from idlm.config import ModelConfig


class OutOfBlocks(RuntimeError):
    """The pool has no free block left for a growing sequence."""


class BlockAllocator:
    """Hands out block ids from a free list."""

    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        self._free = list(range(num_blocks - 1, -1, -1))

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self) -> int:
        if not self._free:
            raise OutOfBlocks("KV cache pool exhausted")
        return self._free.pop()

    def release(self, block_id: int) -> None:
        self._free.append(block_id)


class BlockTable:
    """One sequence's blocks; `num_tokens` positions hold valid KV."""

    def __init__(self, allocator: BlockAllocator, block_size: int):
        self.allocator = allocator
        self.block_size = block_size
        self.blocks: list[int] = []
        self.num_tokens = 0

    def capacity(self) -> int:
        return len(self.blocks) * self.block_size

    def reserve(self, num_tokens: int) -> None:
        """Make room for `num_tokens` positions in total (allocating blocks as needed)."""
        while self.capacity() < num_tokens:
            self.blocks.append(self.allocator.allocate())

    def append(self, n: int) -> None:
        """Mark n more positions as written (room must have been reserved)."""
        self.reserve(self.num_tokens + n)
        self.num_tokens += n

    def truncate(self, k: int) -> None:
        """Roll back the last k positions and release blocks that no longer hold any."""
        if k < 0 or k > self.num_tokens:
            raise ValueError(f"cannot roll back {k} of {self.num_tokens} positions")
        self.num_tokens -= k
        keep = -(-self.num_tokens // self.block_size)
        while len(self.blocks) > keep:
            self.allocator.release(self.blocks.pop())

    def free(self) -> None:
        self.truncate(self.num_tokens)
        while self.blocks:
            self.allocator.release(self.blocks.pop())


class KVCache:
    """Per-layer k/v pools of shape [num_blocks, block_size, kv_heads, head_dim]."""

    def __init__(self, cfg: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype, device):
        shape = (num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_layers)]
        self.block_size = block_size
        self.allocator = BlockAllocator(num_blocks)

    def new_table(self) -> BlockTable:
        return BlockTable(self.allocator, self.block_size)

    @property
    def num_free_blocks(self) -> int:
        return self.allocator.num_free

    @staticmethod
    def bytes_per_block(cfg: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
        elem = torch.finfo(dtype).bits // 8
        return 2 * cfg.num_layers * block_size * cfg.num_kv_heads * cfg.head_dim * elem
