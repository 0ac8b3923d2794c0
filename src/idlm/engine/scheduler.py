"""Who runs in the next forward, with how many rows: continuous batching over kv blocks and a token budget.

Each step the running sequences come first, in arrival order: a sequence feeds its whole step (its
uncomputed committed tokens, its drafts, its MASK rows) when the step's token budget
(`max_num_batched_tokens`) has room, else a prefill chunk of its prompt (at least one prompt token is left
for the step that samples), else it waits a step. When a sequence cannot get the kv blocks its rows need,
the newest running sequence is preempted by recompute: its blocks are freed and it goes back to the front of
the waiting queue with its committed tokens and decoding state (drafts; the decoder keeps its per-slot
tensors), so its output does not change. Waiting sequences are admitted in order while slots, budget and
blocks for their whole prompt allow (prompt blocks found in the prefix cache are shared, not recomputed).

After the forward, `postprocess` moves each sequence's computed-token count, rolls back the rows the
decoding dropped (MASK rows, rejected drafts), registers newly full blocks of committed tokens in the
prefix cache and frees whatever finished. Only integers pass through here.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from idlm.engine.block_manager import BlockManager
from idlm.engine.sequence import Sequence, Status


@dataclass
class Scheduled:
    seq: Sequence
    num_rows: int  # rows this step feeds
    chunk: bool  # a prefill chunk: committed tokens only, no logits
    started: bool  # got its slot in this step (its per-slot state must be reset)


class Scheduler:
    def __init__(self, blocks: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 enable_prefix_caching: bool = True, stationary: bool = False):
        self.blocks = blocks
        self.stationary = stationary
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.enable_prefix_caching = enable_prefix_caching
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.free_slots = list(range(max_num_seqs - 1, -1, -1))

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- one step ------------------------------------------------------------------------------
    def _full_rows(self, seq: Sequence, num_uncomputed: int) -> int:
        """Rows of the sequence's whole next step; in the stationary mode an ISD step is padded to its layout's
        widest (cold and verify rounds feed the same count, so a step's shape depends on the batch only)."""
        d = seq.decoding
        rows = d.step_rows(num_uncomputed, len(seq.drafts), len(seq.alternatives))
        return max(rows, d.stationary_rows) if self.stationary and d.num_masks else rows

    def _rows(self, seq: Sequence, budget: int) -> tuple[int, bool]:
        """(rows, is_chunk) the sequence can feed within `budget`; (0, False) when it must wait."""
        c = seq.num_uncomputed
        full = self._full_rows(seq, c)
        if full <= budget:
            return full, False
        if c > 1 and budget > 0:
            return min(c - 1, budget), True
        return 0, False

    def schedule(self) -> list[Scheduled]:
        budget = self.max_num_batched_tokens
        out: list[Scheduled] = []
        queue, self.running = deque(self.running), []
        preempted = False
        while queue:
            seq = queue.popleft()
            rows, chunk = self._rows(seq, budget)
            if rows == 0:
                self.running.append(seq)
                continue
            while not self.blocks.grow(seq.block_table, seq.num_computed_tokens + rows):
                preempted = True
                if queue:
                    self._preempt(queue.pop())
                else:
                    self._preempt(seq)
                    seq = None
                    break
            if seq is None:
                break
            self.running.append(seq)
            out.append(Scheduled(seq, rows, chunk, False))
            budget -= rows
        while not preempted and self.waiting and len(self.running) < self.max_num_seqs and budget > 0:
            seq = self.waiting[0]
            hit, hashes = [], []
            if self.enable_prefix_caching:
                hit, hashes = self.blocks.match_prefix(seq.token_ids, seq.decoding.kv_salt)
            computed = len(hit) * self.blocks.block_size
            c = seq.num_tokens - computed
            total = computed + self._full_rows(seq, c)
            need = self.blocks.blocks_for(total) - len(hit) + self.blocks.new_blocks_for_hit(hit)
            if need > self.blocks.num_free_blocks:
                break
            seq.num_computed_tokens = computed
            rows, chunk = self._rows(seq, budget)
            if rows == 0:
                seq.num_computed_tokens = 0
                break
            self.waiting.popleft()
            self.blocks.share(seq.block_table, hit)
            seq.block_hashes = hashes
            if not self.blocks.grow(seq.block_table, total):
                raise RuntimeError("kv blocks counted free were not available")
            started = seq.slot is None
            if started:
                seq.slot = self.free_slots.pop()
            seq.status = Status.RUNNING
            seq.stats.cached_tokens += computed
            self.running.append(seq)
            out.append(Scheduled(seq, rows, chunk, started))
            budget -= rows
        return out

    def postprocess(self, step: list[Scheduled], kept: list[int]) -> list[Sequence]:
        """kept[i]: leading fed rows of step[i] whose KV stays (committed tokens). Returns the finished."""
        finished = []
        for sch, k in zip(step, kept):
            seq = sch.seq
            if seq.status is not Status.RUNNING:
                continue  # aborted meanwhile
            seq.num_computed_tokens += k
            if not sch.chunk:
                self.blocks.truncate(seq.block_table, seq.num_computed_tokens)
            if self.enable_prefix_caching:
                self.blocks.register(seq.block_table, seq.block_hashes, seq.token_ids, seq.num_computed_tokens,
                                     seq.decoding.kv_salt)
            if seq.finish_reason is not None:
                self._release(seq)
                finished.append(seq)
        if finished:
            self.running = [s for s in self.running if not s.finished]
        return finished

    # ---- leaving ---------------------------------------------------------------------------------
    def abort(self, seq: Sequence) -> None:
        """End a request wherever it is (client gone) and free its blocks."""
        if seq.finished:
            return
        if seq in self.waiting:
            self.waiting.remove(seq)
        if seq in self.running:
            self.running.remove(seq)
        seq.finish_reason = "abort"
        self._release(seq)

    def _preempt(self, seq: Sequence) -> None:
        self.blocks.free(seq.block_table)
        seq.num_computed_tokens = 0
        seq.block_hashes = []
        seq.status = Status.WAITING
        seq.stats.preemptions += 1
        self.waiting.appendleft(seq)

    def _release(self, seq: Sequence) -> None:
        self.blocks.free(seq.block_table)
        if seq.slot is not None:
            self.free_slots.append(seq.slot)
            seq.slot = None
        seq.mark_finished()
