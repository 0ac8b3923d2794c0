"""The block manager with plain integers: growth, rollback across block boundaries, reference counts, the
prefix cache (hash chain, salts, the last token always recomputed, eviction order), free counts."""
from __future__ import annotations

import pytest

from idlm.engine.block_manager import BlockManager


def test_grow_truncate_free_counts():
    bm = BlockManager(8, 4)
    t: list[int] = []
    assert bm.grow(t, 9) and len(t) == 3 and bm.num_free_blocks == 5
    assert bm.grow(t, 12) and len(t) == 3  # fits already
    bm.truncate(t, 5)  # rollback across a block boundary keeps ceil(5/4) = 2 blocks
    assert len(t) == 2 and bm.num_free_blocks == 6
    bm.truncate(t, 5)
    assert len(t) == 2
    assert not bm.grow(t, 4 * 9)  # would need 7 more blocks, 6 free: nothing taken
    assert len(t) == 2 and bm.num_free_blocks == 6
    bm.free(t)
    assert t == [] and bm.num_free_blocks == 8


def test_prefix_hits_share_blocks_and_never_cover_the_last_token():
    bm = BlockManager(16, 4)
    prompt = list(range(100, 114))  # 14 tokens: 3 full blocks
    a: list[int] = []
    assert bm.grow(a, len(prompt))
    hashes: list[int] = []
    bm.register(a, hashes, prompt, 14, salt=0)
    assert len(hashes) == 3
    hit, hit_hashes = bm.match_prefix(prompt, 0)
    assert hit == a[:3] and hit_hashes == hashes
    # a prompt of exactly 12 tokens: its last token must be recomputed, so only 2 blocks are served
    assert len(bm.match_prefix(prompt[:12], 0)[0]) == 2
    assert len(bm.match_prefix(prompt[:13], 0)[0]) == 3
    # a different first block breaks the chain, a different salt (other KV) never matches
    assert bm.match_prefix([1] + prompt[1:], 0)[0] == []
    assert bm.match_prefix(prompt, 1)[0] == []
    b: list[int] = []
    free = bm.num_free_blocks
    assert bm.new_blocks_for_hit(hit) == 0  # all held by a
    bm.share(b, hit)
    assert bm.num_free_blocks == free and [bm.ref_count[x] for x in hit] == [2, 2, 2]
    bm.free(a)
    assert [bm.ref_count[x] for x in hit] == [1, 1, 1]
    bm.free(b)
    assert bm.num_free_blocks == 16
    # freed but still cached: a third request finds them, and they leave the free list when shared
    hit3, _ = bm.match_prefix(prompt, 0)
    assert hit3 == hit and bm.new_blocks_for_hit(hit3) == 3
    c: list[int] = []
    bm.share(c, hit3)
    assert bm.num_free_blocks == 13
    bm.free(c)


def test_uncached_blocks_are_reused_first_and_cached_ones_evicted_last():
    bm = BlockManager(4, 2)
    a: list[int] = []
    assert bm.grow(a, 4)
    bm.register(a, [], [1, 2, 3, 4], 4, 0)
    bm.free(a)
    plain: list[int] = []
    assert bm.grow(plain, 2)
    bm.free(plain)
    assert len(bm.match_prefix([1, 2, 3, 4, 5], 0)[0]) == 2  # still cached
    big: list[int] = []
    assert bm.grow(big, 6)  # takes the 2 uncached blocks, then evicts a cached one: the chain's tail went first
    assert len(bm.match_prefix([1, 2, 3, 4, 5], 0)[0]) == 1  # so the prefix's first block still serves
    assert bm.grow(big, 8)
    assert bm.cached == {} and bm.num_free_blocks == 0
    bm.free(big)


def test_committed_blocks_never_roll_back_and_double_free_is_caught():
    bm = BlockManager(4, 2)
    t: list[int] = []
    assert bm.grow(t, 4)
    bm.register(t, [], [1, 2, 3, 4], 4, 0)
    with pytest.raises(RuntimeError, match="committed"):
        bm.truncate(t, 1)
    b = t[0]
    bm.free(t)
    with pytest.raises(RuntimeError):
        bm._release(b)


def test_register_keeps_the_first_block_for_a_hash():
    bm = BlockManager(8, 2)
    a, b = [], []
    assert bm.grow(a, 4) and bm.grow(b, 4)
    ha, hb = [], []
    bm.register(a, ha, [5, 6, 7, 8], 4, 0)
    bm.register(b, hb, [5, 6, 7, 8], 4, 0)  # computed twice concurrently: b's copies stay private
    assert ha == hb and bm.match_prefix([5, 6, 7, 8, 9], 0)[0] == a
    private = list(b)
    bm.free(b)  # private blocks go back first in line
    assert bm.free_ids[0] in private
    bm.free(a)
