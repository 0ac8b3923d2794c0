"""Incremental detokenization and stop conditions for streamed generation.

`IncrementalDetokenizer` turns generated token ids into text deltas. It decodes a small window
(a few tokens already turned into text, plus the new ones) and emits the part past the window's
old text, so tokenizers that drop a leading space at the start of a decode stay correct, and it
holds back an incomplete UTF-8 character (decoded as U+FFFD) until its last byte arrives.

`StopChecker` is fed tokens one at a time and says after which one generation ends, where the
output text is cut, and which text is safe to stream (a tail that may begin a stop string waits).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Literal, Protocol, Sequence

from idlm.decoding.sampling import SamplingParams

REPLACEMENT_CHAR = "\ufffd"
# Prompt tokens decoded in front of the first generated token (context for leading-space rules).
PROMPT_CONTEXT_TOKENS = 5


class Tokenizer(Protocol):
    """What the detokenizer needs: `transformers` tokenizers and `tokenizers.Tokenizer` both fit."""

    def decode(self, ids: list[int], skip_special_tokens: bool = ...) -> str: ...


class IncrementalDetokenizer:
    """Generated token ids in, new text out.

    Token ids `[prefix:read]` are already reflected in `text`; their decoded text is the window
    prefix. `_tail` counts characters emitted past that prefix while a character is incomplete.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int] = (), skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        context = [int(t) for t in prompt_ids[-PROMPT_CONTEXT_TOKENS:]]
        self._ids = context
        self._prefix = 0
        self._read = len(context)
        self._prefix_text = self._decode(context)
        self._tail = 0
        self._parts: list[str] = []
        self._text = ""

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens) if ids else ""

    def add(self, token_ids: Iterable[int]) -> str:
        """Append generated tokens; return the newly completed text (may be empty)."""
        self._ids.extend(token_ids)
        return self._advance(final=False)

    def finish(self) -> str:
        """Emit whatever is still held back (an incomplete character decodes to U+FFFD)."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        window = self._decode(self._ids[self._prefix :])
        complete = window if final else window.rstrip(REPLACEMENT_CHAR)
        delta = complete[len(self._prefix_text) + self._tail :]
        if len(complete) == len(window) and len(window) > len(self._prefix_text):
            # Window ends on a character boundary: its tokens become the next window's prefix.
            self._prefix, self._read = self._read, len(self._ids)
            self._prefix_text = self._decode(self._ids[self._prefix : self._read])
            self._tail = 0
        else:
            self._tail += len(delta)
        if delta:
            self._parts.append(delta)
        return delta

    @property
    def text(self) -> str:
        """All output text emitted so far."""
        if self._parts:
            self._text += "".join(self._parts)
            self._parts.clear()
        return self._text


FinishReason = Literal["stop", "length"]


@dataclass(frozen=True)
class Finish:
    """Why and where generation ended: output text is `detokenizer.text[:text_end]`.

    `matched` is the stop string or stop/EOS token id that ended it (None for "length").
    """

    reason: FinishReason
    matched: str | int | None
    text_end: int


class StopChecker:
    """Decides, token by token, whether generation ends (EOS, stop ids, stop strings, max_tokens).

    Feed each generated token through `step` (it also feeds the detokenizer, except EOS / stop
    token ids, whose text never enters the output); the first non-None result is final, and the
    tokens after it must be dropped. `pop_delta` returns the text that is safe to stream.
    """

    def __init__(
        self,
        stop: Sequence[str] = (),
        stop_token_ids: Iterable[int] = (),
        eos_token_ids: Iterable[int] = (),
        max_tokens: int = 256,
        ignore_eos: bool = False,
    ):
        self.stop = [stop] if isinstance(stop, str) else list(stop)
        self.stop_token_ids = set(stop_token_ids)
        self.eos_token_ids = set() if ignore_eos else set(eos_token_ids)
        self.max_tokens = max_tokens
        self.num_tokens = 0
        self.finished: Finish | None = None
        self._span = max((len(s) for s in self.stop), default=1) - 1  # chars a match can reach back
        self._text_len = 0  # characters of output text seen so far
        self._recent = ""  # the last `_span` characters of it
        self._unsent = ""  # text not yet returned by pop_delta

    @classmethod
    def from_params(cls, params: SamplingParams, eos_token_ids: Iterable[int]) -> "StopChecker":
        """Build from a `SamplingParams` and the model's EOS ids."""
        return cls(params.stop, params.stop_token_ids, eos_token_ids, params.max_tokens, params.ignore_eos)

    def step(self, token_id: int, detokenizer: IncrementalDetokenizer) -> Finish | None:
        """Account for one generated token; return a Finish if generation ends with it."""
        if self.finished is not None:
            raise RuntimeError("generation already finished; drop the tokens after the stopping one")
        self.num_tokens += 1
        is_stop_token = token_id in self.stop_token_ids or token_id in self.eos_token_ids
        delta = "" if is_stop_token else detokenizer.add([token_id])
        if is_stop_token or self.num_tokens >= self.max_tokens:
            delta += detokenizer.finish()
        match = self._scan(delta)
        if match is not None:
            self.finished = Finish("stop", match[0], match[1])
        elif is_stop_token:
            self.finished = Finish("stop", token_id, self._text_len)
        elif self.num_tokens >= self.max_tokens:
            self.finished = Finish("length", None, self._text_len)
        return self.finished

    def _scan(self, delta: str) -> tuple[str, int] | None:
        """Append delta; return (stop string, start in output text) of the earliest new match."""
        if not delta:
            return None
        region = self._recent + delta
        offset = self._text_len - len(self._recent)
        self._text_len += len(delta)
        self._unsent += delta
        self._recent = region[len(region) - self._span :] if self._span else ""
        best: tuple[str, int] | None = None
        for s in self.stop:
            i = region.find(s)
            if i >= 0 and (best is None or offset + i < best[1]):
                best = (s, offset + i)
        return best

    def _held_back(self) -> int:
        """Length of the longest text tail that is a proper prefix of a stop string."""
        held = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(self._recent)), held, -1):
                if self._recent.endswith(s[:k]):
                    held = k
                    break
        return held

    def pop_delta(self) -> str:
        """Text that can be streamed now: output text not returned before, minus a possible
        stop-string beginning at its end; after a finish, everything up to the cut."""
        if self.finished is not None:
            keep = self.finished.text_end - (self._text_len - len(self._unsent))
        else:
            keep = len(self._unsent) - self._held_back()
        out, self._unsent = self._unsent[: max(keep, 0)], self._unsent[max(keep, 0) :]
        if self.finished is not None:
            self._unsent = ""
        return out
