"""KV blocks as integers: hand them out, share them by prefix, take them back.

A sequence's KV lives in fixed-size kv blocks (`block_size` positions each) listed in its block table
(a plain `list[int]` the sequence holds). The block manager only moves block ids; the model runner owns
the tensors behind them and the scheduler is its only caller.

Prefix caching: a kv block that is full of committed tokens is registered under a hash chain
h_i = hash(h_{i-1}, salt, tokens of block i). `salt` names whatever else changes the KV of those tokens
(the base model's KV or base + adapter on every row), so KV written one way is never served to a request
that needs the other. A later request whose leading tokens hash the same shares those blocks (reference
counts) and skips recomputing them. Freed blocks keep their hash until they are handed out again, least
recently freed first, so a finished request's prompt stays reusable while memory allows.
"""
from __future__ import annotations

from collections import deque


def chain_hash(prev: int | None, salt: int, tokens: tuple[int, ...]) -> int:
    """Hash of one full kv block given the hash of the block before it (None for the first)."""
    return hash((prev, salt, tokens))


class BlockManager:
    """Reference-counted kv blocks with a hash-chain prefix cache. Integers in, integers out."""

    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need at least one kv block of at least one token, got {num_blocks} x {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.ref_count = [0] * num_blocks
        self.free_ids: deque[int] = deque(range(num_blocks))  # front: handed out next
        self.block_hash: list[int | None] = [None] * num_blocks
        self.block_tokens: list[tuple[int, ...] | None] = [None] * num_blocks
        self.cached: dict[int, int] = {}  # hash -> block id

    # ---- accounting ---------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self.free_ids)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def blocks_needed(self, table: list[int], num_tokens: int) -> int:
        """New blocks a table must get to hold `num_tokens` positions."""
        return max(0, self.blocks_for(num_tokens) - len(table))

    # ---- prefix cache -------------------------------------------------------------------------
    def match_prefix(self, token_ids: list[int], salt: int) -> tuple[list[int], list[int]]:
        """Cached blocks holding the longest run of full blocks of `token_ids[:-1]` (the last token is always
        recomputed: its logit row is needed). Returns (block ids, their hashes); changes nothing."""
        blocks, hashes, prev = [], [], None
        bs = self.block_size
        for i in range((len(token_ids) - 1) // bs):
            tokens = tuple(token_ids[i * bs : (i + 1) * bs])
            h = chain_hash(prev, salt, tokens)
            b = self.cached.get(h)
            if b is None or self.block_tokens[b] != tokens:
                break
            blocks.append(b)
            hashes.append(h)
            prev = h
        return blocks, hashes

    def new_blocks_for_hit(self, hit: list[int]) -> int:
        """Free blocks a prefix hit takes out of the free list (cached blocks no request holds)."""
        return sum(1 for b in hit if self.ref_count[b] == 0)

    def share(self, table: list[int], hit: list[int]) -> None:
        """Start an empty table with the cached blocks of a prefix hit."""
        if table:
            raise ValueError("a prefix hit starts an empty block table")
        for b in hit:
            if self.ref_count[b] == 0:
                self.free_ids.remove(b)
            self.ref_count[b] += 1
            table.append(b)

    def register(self, table: list[int], hashes: list[int], token_ids: list[int], num_tokens: int, salt: int) -> None:
        """Register the full blocks among the first `num_tokens` committed positions; `hashes` (the sequence's
        chain so far) grows by one per newly registered block."""
        bs = self.block_size
        for i in range(len(hashes), min(num_tokens // bs, len(table))):
            tokens = tuple(token_ids[i * bs : (i + 1) * bs])
            h = chain_hash(hashes[-1] if hashes else None, salt, tokens)
            hashes.append(h)
            b = table[i]
            if self.block_hash[b] is None and h not in self.cached:
                self.block_hash[b], self.block_tokens[b] = h, tokens
                self.cached[h] = b

    # ---- growth and release -------------------------------------------------------------------
    def grow(self, table: list[int], num_tokens: int) -> bool:
        """Make the table hold `num_tokens` positions; False (and nothing taken) when blocks run short."""
        need = self.blocks_needed(table, num_tokens)
        if need > len(self.free_ids):
            return False
        for _ in range(need):
            table.append(self._take())
        return True

    def truncate(self, table: list[int], num_tokens: int) -> None:
        """Roll back to `num_tokens` positions: release the blocks past them (ISD drops MASK rows and rejected
        drafts every step). Those blocks were never registered: only committed tokens are."""
        keep = self.blocks_for(num_tokens)
        while len(table) > keep:
            b = table.pop()
            if self.block_hash[b] is not None:
                raise RuntimeError(f"kv block {b} holds committed tokens; only uncommitted rows roll back")
            self._release(b)

    def free(self, table: list[int]) -> None:
        """Release every block of the table (tail first, so shared prefix blocks are the last to be reused)."""
        while table:
            self._release(table.pop())

    def _take(self) -> int:
        b = self.free_ids.popleft()
        if self.ref_count[b]:
            raise RuntimeError(f"kv block {b} is on the free list while held")
        if self.block_hash[b] is not None:  # evict its cache entry
            del self.cached[self.block_hash[b]]
            self.block_hash[b] = self.block_tokens[b] = None
        self.ref_count[b] = 1
        return b

    def _release(self, b: int) -> None:
        self.ref_count[b] -= 1
        if self.ref_count[b] < 0:
            raise RuntimeError(f"kv block {b} released more often than taken")
        if self.ref_count[b] == 0:
            if self.block_hash[b] is None:
                self.free_ids.appendleft(b)  # nothing to keep: reuse first
            else:
                self.free_ids.append(b)  # keep the cached prefix as long as possible
