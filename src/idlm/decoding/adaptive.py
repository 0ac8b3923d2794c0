"""Adaptive decoding: before each step, every `auto` request takes the lossless decoding predicted fastest.

The candidates are AR and ISD / R-ISD at strides 2..N, with and without branches, all lossless (exact
drafting, alpha = 1, every draft verified), so a switch changes speed only: greedy output stays AR's token
for token and sampled output stays distributed as AR's. The prediction combines

- the request's running acceptance by draft position: its verify outcomes so far, smoothed towards a prior
  (the adapter's measured acceptance) with `prior_weight` pseudo-tests per position; acceptance by position
  does not depend on the stride (MASK row j sees only the rows before it);
- the round model (tokens per forward and cold share of each layout, decoding/round_model.py);
- a cost model (seconds of a verify round, a cold round and an AR step at this batch size).

The choice reads committed history, stats and costs only, never the values of pending drafts. Pending
drafts beyond the chosen decoding's are dropped (AR drops them all): a verified prefix of drafts is as exact
as all of them. A request on AR gathers no acceptance evidence, so every `probe_every` AR steps it probes
the best ISD candidate for one cold and one verify round, unless that candidate is predicted far slower
than AR (`probe_floor`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from idlm.decoding.policy import Decoding
from idlm.decoding.round_model import estimate
from idlm.decoding.stats import RequestStats


class RoundCosts(Protocol):
    def round_seconds(self, decoding: Decoding, batch: int, mask_token_id: int) -> tuple[float, float]: ...


@dataclass
class ChoiceState:
    """One request's adaptive state: AR steps since its last ISD step, and the probe it is running."""

    ar_streak: int = 0
    probe: Decoding | None = None
    probe_tests: int = 0  # drafts tested when the probe started (the probe ends with a verify round)
    seen: tuple[int, int] = (-1, 0)  # (drafts tested, batch) the speeds below were predicted for
    speeds: list[float] = field(default_factory=list)


@dataclass
class Adaptive:
    candidates: list[Decoding]  # AR first, then the ISD layouts
    costs: RoundCosts
    prior: list[float]  # acceptance by draft position assumed before a request has verified anything
    mask_token_id: int
    prior_weight: float = 4.0
    probe_every: int = 32
    probe_floor: float = 0.75
    _seconds: dict[int, list[tuple[float, float]]] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if not self.candidates or self.candidates[0].name != "ar" or any(c.name == "ar" for c in self.candidates[1:]):
            raise ValueError("adaptive candidates: AR first, then ISD decodings")
        lossy = [c.label for c in self.candidates if not c.lossless]
        if lossy:
            raise ValueError(f"adaptive decoding switches between lossless decodings only; lossy: {lossy}")
        if len({c.kv_salt for c in self.candidates}) != 1:
            raise ValueError("adaptive candidates must keep the same KV (the adapter on the same rows)")
        if not self.prior or any(not 0.0 <= a <= 1.0 for a in self.prior):
            raise ValueError(f"prior acceptance must be probabilities by draft position, got {self.prior!r}")

    name = "auto"

    @property
    def stride(self) -> int:
        return max(c.stride for c in self.candidates)

    @property
    def max_step_rows(self) -> int:
        return max(c.max_step_rows for c in self.candidates)

    @property
    def widest(self) -> Decoding:
        """The candidate with the most rows per step (what a request must be able to fit)."""
        return max(self.candidates, key=lambda c: c.step_rows(1, c.num_masks))

    def acceptance(self, stats: RequestStats) -> list[float]:
        """Running acceptance by draft position, smoothed towards the prior."""
        depth = max(c.num_masks for c in self.candidates)
        w = self.prior_weight
        out = []
        for j in range(depth):
            prior = self.prior[min(j, len(self.prior) - 1)]
            tested = stats.proposed_by_position[j] if j < len(stats.proposed_by_position) else 0
            accepted = stats.accepted_by_position[j] if j < len(stats.accepted_by_position) else 0
            out.append((w * prior + accepted) / (w + tested))
        return out

    def speedups(self, acceptance: list[float], batch: int) -> list[float]:
        """Predicted tokens/s of each candidate over AR's when `batch` sequences decode alike."""
        seconds = self._seconds.get(batch)
        if seconds is None:
            seconds = [self.costs.round_seconds(c, batch, self.mask_token_id) for c in self.candidates]
            self._seconds[batch] = seconds
        t_ar = seconds[0][0]
        return [1.0] + [estimate(acceptance, c.stride, c.branches).speedup(*s, t_ar)
                        for c, s in zip(self.candidates[1:], seconds[1:])]

    def choose(self, state: ChoiceState, stats: RequestStats, batch: int) -> Decoding:
        """This step's decoding for one request (updates its state)."""
        if state.probe is not None:
            if stats.drafts_tested == state.probe_tests:
                return state.probe  # the probe's verify round has not run yet
            state.probe = None
        if state.seen != (stats.drafts_tested, batch):  # new evidence or load: predict again
            state.seen = (stats.drafts_tested, batch)
            state.speeds = self.speedups(self.acceptance(stats), max(1, batch))
        speed = state.speeds
        best = max(range(len(speed)), key=speed.__getitem__)
        if best == 0:
            state.ar_streak += 1
            isd = max(range(1, len(speed)), key=speed.__getitem__, default=0)
            if isd and state.ar_streak > self.probe_every and speed[isd] >= self.probe_floor:
                state.ar_streak, state.probe, state.probe_tests = 0, self.candidates[isd], stats.drafts_tested
                return state.probe
            return self.candidates[0]
        state.ar_streak = 0
        return self.candidates[best]
