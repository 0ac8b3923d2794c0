"""Sampling parameters, the logit-transform pipeline, and token draws.

`distribution` is the single place that turns logits into the probabilities a token is drawn
from. AR sampling draws from it, and ISD verification compares p and q that both come from it,
so the accept/resample rule preserves exactly the distribution the user asked for.
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import Tensor


@dataclass
class SamplingParams:
    """Per-request decoding options, named as in vLLM.

    `repetition_penalty` follows transformers (prompt + generated tokens, positive logits divided,
    negative multiplied); `presence_penalty` / `frequency_penalty` follow OpenAI (generated tokens
    only, subtracted). `top_k` 0 or -1 and `top_p` 1 switch those filters off; `temperature` 0 is greedy.
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


class PenaltyState:
    """A request's committed token history as the penalties read it.

    `seen[v]`: token v occurs in the prompt or the generated text (repetition penalty);
    `counts[v]`: how often v was generated (presence / frequency penalties). Committed tokens only
    grow, so the state is built once and updated with `append`.
    """

    def __init__(self, prompt_ids: Sequence[int], vocab_size: int, device: torch.device | str = "cpu"):
        self.seen = torch.zeros(vocab_size, dtype=torch.bool, device=device)
        self.counts = torch.zeros(vocab_size, dtype=torch.float32, device=device)
        if len(prompt_ids):
            self.seen[torch.as_tensor(prompt_ids, dtype=torch.long, device=device)] = True

    def append(self, token_ids: Sequence[int] | Tensor) -> None:
        """Record newly committed generated tokens."""
        ids = torch.as_tensor(token_ids, dtype=torch.long, device=self.counts.device).reshape(-1)
        self.counts.index_add_(0, ids, torch.ones(ids.numel(), dtype=torch.float32, device=ids.device))
        self.seen[ids] = True


def _penalize(logits: Tensor, params: SamplingParams, seen: Tensor, counts: Tensor) -> Tensor:
    """Apply repetition, then presence and frequency penalties (seen/counts broadcast to logits)."""
    if params.repetition_penalty != 1.0:
        rp = params.repetition_penalty
        logits = torch.where(seen, torch.where(logits > 0, logits / rp, logits * rp), logits)
    if params.presence_penalty != 0.0:
        logits = logits - params.presence_penalty * (counts > 0).to(logits.dtype)
    if params.frequency_penalty != 0.0:
        logits = logits - params.frequency_penalty * counts
    return logits


def _apply_penalties(
    logits: Tensor, params: SamplingParams, history: PenaltyState | None, row_extra: list[list[int]] | None
) -> Tensor:
    if history is None:
        raise ValueError("penalties are set but no PenaltyState was given")
    out = _penalize(logits, params, history.seen, history.counts)
    if not row_extra:
        return out
    if len(row_extra) != logits.shape[0]:
        raise ValueError(f"row_extra has {len(row_extra)} rows, logits have {logits.shape[0]}")
    # Only the tokens a row adds to the committed history change; recompute those entries.
    rows, cols, extra = [], [], []
    for r, tokens in enumerate(row_extra):
        for tok, n in Counter(tokens).items():
            rows.append(r)
            cols.append(tok)
            extra.append(float(n))
    if not rows:
        return out
    device = logits.device
    rows_t = torch.tensor(rows, dtype=torch.long, device=device)
    cols_t = torch.tensor(cols, dtype=torch.long, device=device)
    counts = history.counts[cols_t] + torch.tensor(extra, dtype=torch.float32, device=device)
    seen = torch.ones(len(rows), dtype=torch.bool, device=device)
    out[rows_t, cols_t] = _penalize(logits[rows_t, cols_t], params, seen, counts)
    return out


def distribution(
    logits: Tensor,
    params: SamplingParams,
    history: PenaltyState | None = None,
    row_extra: list[list[int]] | None = None,
) -> Tensor:
    """The probabilities [R, V] (float32) a token is drawn from, for logits [R, V].

    Order: penalties (repetition, presence, frequency) -> temperature -> top-k -> top-p -> min-p ->
    softmax. Greedy gives a one-hot at the argmax of the penalized logits. Row r's history is
    `history` plus the generated tokens `row_extra[r]` (ISD: the drafts row r conditions on).
    """
    logits = logits.float()
    if params.uses_penalties:
        logits = _apply_penalties(logits, params, history, row_extra)
    if params.greedy:
        return torch.zeros_like(logits).scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)
    if params.temperature != 1.0:
        # Shift by the max first so that a tiny temperature cannot overflow to inf.
        logits = (logits - logits.amax(-1, keepdim=True)) / params.temperature
    vocab = logits.shape[-1]
    if 0 < params.top_k < vocab:
        kth = torch.topk(logits, params.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, -math.inf)
    if params.top_p < 1.0:
        probs, order = torch.sort(torch.softmax(logits, -1), dim=-1, descending=True, stable=True)
        mass_before = probs.cumsum(-1) - probs  # probability of the tokens ranked above
        drop = torch.zeros_like(mass_before, dtype=torch.bool).scatter_(-1, order, mass_before >= params.top_p)
        logits = logits.masked_fill(drop, -math.inf)
    if params.min_p > 0.0:
        # p(v) < min_p * max p  <=>  logit(v) < max logit + log(min_p)
        floor = logits.amax(-1, keepdim=True) + math.log(params.min_p)
        logits = logits.masked_fill(logits < floor, -math.inf)
    return torch.softmax(logits, -1)


def sample(probs: Tensor, generator: torch.Generator) -> Tensor:
    """Draw one token per row of probs [R, V]; returns int64 [R].

    Exponential race: argmax(p / E) with E ~ Exp(1) i.i.d. picks v with probability p(v), never a
    zero-probability token, and a one-hot always yields its argmax.
    """
    u = torch.rand(probs.shape, generator=generator, device=probs.device, dtype=torch.float32)
    e = -torch.log(u.clamp_min_(torch.finfo(torch.float32).tiny))
    return (probs.float() / e).argmax(-1)


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator on `device`, seeded with `seed`, or from system entropy when seed is None."""
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator


def residual_distribution(p: Tensor, q: Tensor) -> Tensor:
    """normalize(max(0, p - q)) over the last dim; p where the residual is all zero (p == q)."""
    residual = (p - q).clamp_min(0)
    total = residual.sum(-1, keepdim=True)
    return torch.where(total > 0, residual / total, p)
