"""Moves sequences between waiting and running; admits only what the KV pool can hold."""
from __future__ import annotations

from collections import deque

from idlm.engine.kv_cache import KVCache
from idlm.engine.sequence import Sequence, Status


class Scheduler:
    """FIFO admission bounded by `max_num_seqs` and free KV blocks (prompt + one step of rows)."""

    def __init__(self, kv: KVCache, max_num_seqs: int):
        self.kv = kv
        self.max_num_seqs = max_num_seqs
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return any(not s.finished for s in self.waiting) or any(not s.finished for s in self.running)

    def schedule(self, step_rows: dict[int, int]) -> list[Sequence]:
        """Admit waiting sequences that fit, then return the running batch.

        step_rows: seq_id -> rows that sequence's next step feeds beyond its prompt (the stride's block).
        """
        self.running = [s for s in self.running if not s.finished]
        reserved = sum(self._blocks_needed(s, step_rows.get(s.seq_id, 1)) for s in self.running)
        while self.waiting and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if seq.finished:
                self.waiting.popleft()
                continue
            need = self._blocks_needed(seq, step_rows.get(seq.seq_id, 1))
            if reserved + need > self.kv.num_free_blocks and self.running:
                break
            self.waiting.popleft()
            seq.status = Status.RUNNING
            self.running.append(seq)
            reserved += need
        return list(self.running)

    def _blocks_needed(self, seq: Sequence, rows: int) -> int:
        """New blocks this sequence needs for its next step."""
        total = seq.num_tokens + rows
        return max(0, -(-total // self.kv.block_size) - len(seq.kv.blocks))

    def abort(self, seq: Sequence) -> None:
        seq.finish("abort")
        if seq in self.waiting:
            self.waiting.remove(seq)
        if seq in self.running:
            self.running.remove(seq)
