"""A request's life inside the engine: its tokens, KV blocks, sampler state, text and stats."""
from __future__ import annotations

import enum
import time
from typing import Any

from idlm.decoding.detokenize import IncrementalDetokenizer, StopChecker
from idlm.decoding.sampling import PenaltyState, SamplingParams, make_generator
from idlm.decoding.stats import RequestStats
from idlm.engine.kv_cache import BlockTable


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    """Prompt + committed output. KV holds `kv.num_tokens` leading tokens of prompt + output."""

    def __init__(
        self,
        seq_id: int,
        prompt_ids: list[int],
        params: SamplingParams,
        tokenizer: Any,
        eos_token_ids: list[int],
        kv: BlockTable,
        vocab_size: int,
        device: Any = "cpu",
    ):
        self.seq_id = seq_id
        self.prompt_ids = list(prompt_ids)
        self.output_ids: list[int] = []
        self.params = params
        self.kv = kv
        self.status = Status.WAITING
        self.finish_reason: str | None = None
        self.generator = make_generator(params.seed, device)
        self.penalties = PenaltyState(self.prompt_ids, vocab_size, device) if params.uses_penalties else None
        self.detok = IncrementalDetokenizer(tokenizer, self.prompt_ids)
        self.stop = StopChecker.from_params(params, eos_token_ids)
        self.stats = RequestStats(prompt_tokens=len(self.prompt_ids))
        self.decoding_state: Any = None  # owned by the decoding policy (ISD: pending token, drafts, q)
        self._started = time.perf_counter()

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    def emit(self, tokens: list[int]) -> int:
        """Commit tokens in order, stopping at the first one that ends generation; returns how many were kept."""
        kept = 0
        for t in tokens:
            if self.finished:
                break
            self.output_ids.append(t)
            if self.penalties is not None:
                self.penalties.append([t])
            kept += 1
            end = self.stop.step(t, self.detok)
            if end is not None:
                self.finish(end.reason)
        self.stats.generated_tokens = len(self.output_ids)
        return kept

    def finish(self, reason: str) -> None:
        """End the request and give its KV blocks back."""
        if self.finished:
            return
        self.status = Status.FINISHED
        self.finish_reason = reason
        self.kv.free()
        self.stats.seconds = time.perf_counter() - self._started

    def read_text_delta(self) -> str:
        """Text produced since the last call that can be streamed (a possible stop-string start waits)."""
        return self.stop.pop_delta()

    @property
    def text(self) -> str:
        """Output text; a matched stop string and what follows it are cut."""
        end = self.stop.finished
        return self.detok.text if end is None else self.detok.text[: end.text_end]
