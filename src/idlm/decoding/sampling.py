"""Sampling parameters, the logit-transform pipeline, and token draws.

`distribution` is the single place that turns logits into the probabilities a token is drawn
from. AR sampling draws from it, and ISD verification compares p and q that both come from it,
so the accept/resample rule preserves exactly the distribution the user asked for. It runs on all
logit rows of a step at once (per-row parameters as tensors). The randomness of every draw is keyed by
(seed, position, stream) and hashed on the device, so one op serves all rows of a step.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import Tensor


MAX_LOGPROBS = 20  # most likely tokens reported per position (OpenAI's limit)


@dataclass
class SamplingParams:
    """Per-request decoding options, named as in vLLM.

    `repetition_penalty` follows transformers (prompt + generated tokens, positive logits divided,
    negative multiplied); `presence_penalty` / `frequency_penalty` follow OpenAI (generated tokens
    only, subtracted). `top_k` 0 or -1 and `top_p` 1 switch those filters off; `temperature` 0 is greedy.
    `logprobs` None: none; k >= 0: each committed token's log-probability under the verifying (anchor) model's
    raw distribution (before penalties, temperature and filters) and the k most likely tokens there.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: list[str] | str | None = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    max_tokens: int = 256
    ignore_eos: bool = False
    logprobs: int | None = None

    def __post_init__(self) -> None:
        for name in ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
                raise ValueError(f"{name} must be a number, got {value!r}")
        for name in ("top_k", "max_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{name} must be an int, got {value!r}")
        if not (0.0 <= self.temperature < math.inf):
            raise ValueError(f"temperature must be finite and >= 0 (0 = greedy), got {self.temperature}")
        if not (0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < -1:
            raise ValueError(f"top_k must be -1, 0 (both: off) or a positive int, got {self.top_k}")
        if not (0.0 <= self.min_p <= 1.0):
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if not (0.0 < self.repetition_penalty < math.inf):
            raise ValueError(f"repetition_penalty must be finite and > 0 (1 = off), got {self.repetition_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not (-2.0 <= getattr(self, name) <= 2.0):
                raise ValueError(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.logprobs is not None and (isinstance(self.logprobs, bool) or not isinstance(self.logprobs, int)
                                          or not 0 <= self.logprobs <= MAX_LOGPROBS):
            raise ValueError(f"logprobs must be None or an int in [0, {MAX_LOGPROBS}], got {self.logprobs!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise ValueError(f"seed must be an int or None, got {self.seed!r}")
        if self.stop is None:
            self.stop = []
        elif isinstance(self.stop, str):
            self.stop = [self.stop]
        else:
            self.stop = list(self.stop)
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"stop must be a string or a list of non-empty strings, got {self.stop!r}")
        self.stop_token_ids = list(self.stop_token_ids or [])
        if any(isinstance(t, bool) or not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            raise ValueError(f"stop_token_ids must be non-negative ints, got {self.stop_token_ids!r}")

    @property
    def greedy(self) -> bool:
        """Argmax decoding (temperature 0)."""
        return self.temperature == 0

    @property
    def uses_penalties(self) -> bool:
        """Whether any penalty reads the token history (otherwise no `PenaltyState` is needed)."""
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


class RowSampling:
    """The sampling parameters of a step's logit rows as tensors (one entry per row), so that one pipeline
    serves every row of every request in a step with a fixed number of tensor ops.

    `seen` [R, V] (token in the prompt or the generated text: repetition penalty) and `counts` [R, V] (times
    generated: presence / frequency penalties) are each row's history; needed only when a row uses penalties.
    """

    def __init__(
        self,
        params: Sequence[SamplingParams],
        device: torch.device | str = "cpu",
        seen: Tensor | None = None,
        counts: Tensor | None = None,
    ):
        def col(values, dtype=torch.float32):
            return torch.tensor(values, dtype=dtype, device=device)

        self.greedy_all = all(p.greedy for p in params)
        self.temperature = col([p.temperature for p in params])
        self.top_k = col([p.top_k if p.top_k > 0 else 0 for p in params], torch.long)
        self.max_top_k = max((p.top_k for p in params), default=0)
        top_p_rows = [i for i, p in enumerate(params) if p.top_p < 1.0 and not p.greedy]
        self.top_p_rows = col(top_p_rows, torch.long) if top_p_rows else None  # only these rows pay for a sort
        self.top_p = col([params[i].top_p for i in top_p_rows]) if top_p_rows else None
        self.min_p = col([p.min_p for p in params]) if any(p.min_p > 0.0 for p in params) else None
        self.penalized = any(p.uses_penalties for p in params)
        if self.penalized:
            if seen is None or counts is None:
                raise ValueError("penalties are set but no token history (seen, counts) was given")
            self.repetition = col([p.repetition_penalty for p in params])[:, None]
            self.presence = col([p.presence_penalty for p in params])[:, None]
            self.frequency = col([p.frequency_penalty for p in params])[:, None]
            self.seen, self.counts = seen, counts


def _penalize(logits: Tensor, rows: RowSampling) -> Tensor:
    """Repetition (transformers: positive logits divided, negative multiplied, over seen tokens), then
    presence and frequency (OpenAI: over generated tokens, subtracted). Neutral values change nothing."""
    rp = rows.repetition
    logits = torch.where(rows.seen, torch.where(logits > 0, logits / rp, logits * rp), logits)
    return logits - rows.presence * (rows.counts > 0).to(logits.dtype) - rows.frequency * rows.counts


def distribution(logits: Tensor, rows: RowSampling) -> Tensor:
    """The probabilities [R, V] (float32) each row's token is drawn from, for logits [R, V].

    Order: penalties (repetition, presence, frequency) -> temperature -> top-k -> top-p -> min-p ->
    softmax. A greedy row (temperature 0) gives a one-hot at the argmax of its penalized logits.
    """
    logits = logits.float()
    if rows.penalized:
        logits = _penalize(logits, rows)
    greedy = rows.temperature == 0
    onehot = torch.zeros_like(logits).scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)
    if rows.greedy_all:
        return onehot
    # Shift by the max first so that a tiny temperature cannot overflow to inf.
    temperature = torch.where(greedy, torch.ones_like(rows.temperature), rows.temperature)[:, None]
    logits = (logits - logits.amax(-1, keepdim=True)) / temperature
    vocab = logits.shape[-1]
    if 0 < rows.max_top_k:
        k = torch.where(rows.top_k >= vocab, 0, rows.top_k)
        top = torch.topk(logits, min(rows.max_top_k, vocab), dim=-1).values
        kth = top.gather(-1, (k - 1).clamp(min=0)[:, None])
        logits = logits.masked_fill((k > 0)[:, None] & (logits < kth), -math.inf)
    if rows.top_p_rows is not None:
        sub = logits.index_select(0, rows.top_p_rows)
        logits = logits.index_copy(0, rows.top_p_rows, sub.masked_fill(_top_p_drop(sub, rows.top_p), -math.inf))
    if rows.min_p is not None:
        # p(v) < min_p * max p  <=>  logit(v) < max logit + log(min_p)   (log 0 = -inf: off)
        floor = logits.amax(-1, keepdim=True) + torch.log(rows.min_p)[:, None]
        logits = logits.masked_fill(logits < floor, -math.inf)
    return torch.where(greedy[:, None], onehot, torch.softmax(logits, -1))


TOP_P_CANDIDATES = 1024


def _top_p_drop(logits: Tensor, top_p: Tensor) -> Tensor:
    """Tokens outside the nucleus: those whose higher-ranked tokens already hold `top_p` of the mass.

    The nucleus almost always lies within the top TOP_P_CANDIDATES tokens, so those are ranked first (a
    partial sort); only when some row's nucleus is wider are all tokens sorted.
    """
    probs = torch.softmax(logits, -1)
    k = min(TOP_P_CANDIDATES, probs.shape[-1])
    ranked, order = torch.topk(probs, k, dim=-1, sorted=True)
    if k < probs.shape[-1] and not bool((ranked.sum(-1) >= top_p).all()):
        ranked, order = torch.sort(probs, dim=-1, descending=True, stable=True)
    mass_before = ranked.cumsum(-1) - ranked  # probability of the tokens ranked above
    keep = torch.zeros_like(probs, dtype=torch.bool).scatter_(-1, order, mass_before < top_p[:, None])
    return ~keep


def sample(probs: Tensor, keys: Tensor) -> Tensor:
    """One token per row of probs [R, V] (need not sum to 1), with the randomness of the row's key [R].

    Exponential race: argmax(p / E) with E ~ Exp(1) i.i.d. picks v with probability p(v) / sum(p), never a
    zero-probability token, and a one-hot always yields its argmax. Unlike inverting the CDF with one uniform,
    the winner only changes when two candidates are nearly tied, so the tiny differences between a batched
    and a lone forward almost never change a seeded request's tokens.
    """
    e = -torch.log(uniforms(keys, probs.shape[-1]))
    return (probs.float() / e).argmax(-1)


_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
_MIX1, _MIX2 = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB


def _signed(x: int) -> int:
    return x - (1 << 64) if x >= 1 << 63 else x


def _mix64(x: int) -> int:
    """splitmix64's finalizer: a bijection on 64-bit integers with full avalanche."""
    x = (x ^ (x >> 30)) * _MIX1 & _MASK64
    x = (x ^ (x >> 27)) * _MIX2 & _MASK64
    return x ^ (x >> 31)


def row_key(seed: int, position: int, stream: int) -> int:
    """The key of one draw: (seed, token position, stream). Counter-based, so a request's draws do not depend
    on what else ran, in which batch, or whether it was preempted and recomputed."""
    x = _mix64((seed & _MASK64) ^ _GOLDEN)
    return _signed(_mix64(x ^ ((position & 0xFFFFFFFFFF) << 8 | (stream & 0xFF))))


def _mix64_tensor(x: Tensor) -> Tensor:
    """`_mix64` on int64 tensors (multiplication wraps mod 2^64; shifts made logical by masking)."""
    x = x ^ ((x >> 30) & ((1 << 34) - 1))
    x = x * _signed(_MIX1)
    x = x ^ ((x >> 27) & ((1 << 37) - 1))
    x = x * _signed(_MIX2)
    return x ^ ((x >> 31) & ((1 << 33) - 1))


def uniforms(keys: Tensor, n: int) -> Tensor:
    """[R, n] float32 uniforms strictly inside (0, 1): element i of row r hashes (keys[r], i)."""
    x = keys.long()[:, None] + torch.arange(1, n + 1, device=keys.device) * _signed(_GOLDEN)
    bits = (_mix64_tensor(x) >> 41) & ((1 << 23) - 1)  # 23 bits: (k + 1/2) / 2^23 is exact in float32
    return (bits.float() + 0.5) * (1.0 / (1 << 23))


def residual_distribution(p: Tensor, q: Tensor) -> Tensor:
    """normalize(max(0, p - q)) over the last dim; p where the residual is all zero (p == q)."""
    residual = (p - q).clamp_min(0)
    total = residual.sum(-1, keepdim=True)
    return torch.where(total > 0, residual / total, p)
