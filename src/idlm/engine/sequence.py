"""A request inside the engine: plain token state, its kv block table, text and stats.

`token_ids` = prompt + committed output. The first `num_computed_tokens` of them have KV in the cache;
the rest (the ISD anchor: the prompt before its first forward, the last clean token or correction after
one) are fed by the next step, followed by the `drafts` to verify and the MASK rows. Only the scheduler
changes `num_computed_tokens` and `block_table`. Per-request tensors (penalty history, the proposal q)
live in the decoder's per-slot buffers under `slot`; random draws come from (`seed`, position), so a
request needs no generator object and gives the same output batched, alone or preempted.
"""
from __future__ import annotations

import enum
import time
from typing import Any

from idlm.decoding.adaptive import Adaptive, ChoiceState
from idlm.decoding.decoder import CLEAN, TokenLogprob
from idlm.decoding.detokenize import IncrementalDetokenizer, StopChecker
from idlm.decoding.policy import Decoding
from idlm.decoding.sampling import SamplingParams
from idlm.decoding.stats import RequestStats


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    def __init__(
        self,
        seq_id: int,
        prompt_ids: list[int],
        params: SamplingParams,
        decoding: Decoding | Adaptive,
        seed: int,
        tokenizer: Any,
        eos_token_ids: list[int],
    ):
        self.seq_id = seq_id
        self.token_ids = list(prompt_ids)
        self.num_prompt_tokens = len(prompt_ids)
        self.num_computed_tokens = 0
        self.block_table: list[int] = []
        self.block_hashes: list[int] = []  # hash chain of the registered full kv blocks
        self.status = Status.WAITING
        self.finish_reason: str | None = None
        self.params = params
        # `auto` requests re-choose `decoding` before every step (engine); the others keep theirs
        self.adaptive = decoding if isinstance(decoding, Adaptive) else None
        self.choice = ChoiceState()
        self.decoding = decoding.candidates[0] if isinstance(decoding, Adaptive) else decoding
        self.seed = seed
        self.drafts: list[int] = []  # ISD: drafted last step, verified by the next (q in the decoder's slot)
        self.alternatives: list[int] = []  # other candidates for drafts[0] (a decoding with tree > 1)
        self.slot: int | None = None
        self.kinds: list[str] = []  # how each output token was committed (decoder.DRAFTED / CLEAN / CORRECTION)
        self.logprobs: list[TokenLogprob] = []  # one per output token when params.logprobs is set
        self.detok = IncrementalDetokenizer(tokenizer, prompt_ids)
        self.stop = StopChecker.from_params(params, eos_token_ids)
        self.stats = RequestStats(prompt_tokens=len(prompt_ids), decoding=decoding.name, stride=decoding.stride)
        self.started = time.perf_counter()

    # ---- token state -------------------------------------------------------------------------
    @property
    def prompt_ids(self) -> list[int]:
        return self.token_ids[: self.num_prompt_tokens]

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def num_uncomputed(self) -> int:
        """Committed tokens the next step must feed before any drafts (prefill, anchor)."""
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED

    def emit(self, tokens: list[int], kinds: list[str] | None = None,
             logprobs: list[TokenLogprob] | None = None) -> list[int]:
        """Commit tokens in order (with how each was committed and its logprob, when given), stopping at the
        first one that ends generation; returns those kept."""
        kept = []
        for t in tokens:
            if self.finish_reason is not None:
                break
            self.token_ids.append(t)
            kept.append(t)
            end = self.stop.step(t, self.detok)
            if end is not None:
                self.finish_reason = end.reason
        self.kinds += (kinds or [CLEAN] * len(tokens))[: len(kept)]
        if logprobs is not None:
            self.logprobs += logprobs[: len(kept)]
        self.stats.generated_tokens = self.num_output_tokens
        return kept

    def mark_finished(self) -> None:
        self.status = Status.FINISHED
        self.stats.seconds = time.perf_counter() - self.started

    # ---- text --------------------------------------------------------------------------------
    def read_text_delta(self) -> str:
        """Text produced since the last call that can be streamed (a possible stop-string start waits)."""
        return self.stop.pop_delta()

    @property
    def text(self) -> str:
        """Output text; a matched stop string and what follows it are cut."""
        end = self.stop.finished
        return self.detok.text if end is None else self.detok.text[: end.text_end]
