"""Per-request and aggregate decoding statistics."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class RequestStats:
    """What one request cost. `forwards` counts every model forward that served it, prefill included."""

    prompt_tokens: int = 0
    generated_tokens: int = 0
    forwards: int = 0
    seconds: float = 0.0
    decoding: str = "ar"
    stride: int = 1
    # ISD only: verify rounds with all drafts accepted (V), with a rejection (R), cold starts (C); `branched`:
    # rejections after which a branch's drafts were ready (the next round verifies instead of starting cold)
    rounds: dict[str, int] = field(default_factory=lambda: {"V": 0, "R": 0, "C": 0})
    branched: int = 0
    tree_hits: int = 0  # first draft rejected, an alternative candidate accepted (two tokens committed)
    proposed_by_position: list[int] = field(default_factory=list)
    accepted_by_position: list[int] = field(default_factory=list)
    acceptance_sum: float = 0.0  # sum over tested drafts of min(1, p(x)/q(x))
    drafts_tested: int = 0
    rows: int = 0  # rows fed to the model for this request (prefill, drafts, MASK rows, branches)
    cached_tokens: int = 0  # prompt tokens served from the prefix cache
    preemptions: int = 0  # times the request's KV was dropped under memory pressure (recomputed after)
    choices: dict[str, int] = field(default_factory=dict)  # sampling steps by decoding label (`auto` switches)

    @property
    def tokens_per_forward(self) -> float:
        return self.generated_tokens / self.forwards if self.forwards else 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.generated_tokens / self.seconds if self.seconds > 0 else 0.0

    @property
    def acceptance_by_position(self) -> list[float]:
        return [a / p if p else 0.0 for a, p in zip(self.accepted_by_position, self.proposed_by_position)]

    @property
    def introspective_acceptance(self) -> float:
        return self.acceptance_sum / self.drafts_tested if self.drafts_tested else 0.0

    def record_test(self, position: int, accepted: bool) -> None:
        """Account one draft tested at draft position `position` (0-based)."""
        while len(self.proposed_by_position) <= position:
            self.proposed_by_position.append(0)
            self.accepted_by_position.append(0)
        self.proposed_by_position[position] += 1
        self.accepted_by_position[position] += int(accepted)
        self.drafts_tested += 1

    def merge(self, other: "RequestStats") -> None:
        """Add another request's counters into this aggregate."""
        self.prompt_tokens += other.prompt_tokens
        self.generated_tokens += other.generated_tokens
        self.forwards += other.forwards
        self.seconds += other.seconds
        for k, v in other.rounds.items():
            self.rounds[k] = self.rounds.get(k, 0) + v
        for i, (p, a) in enumerate(zip(other.proposed_by_position, other.accepted_by_position)):
            while len(self.proposed_by_position) <= i:
                self.proposed_by_position.append(0)
                self.accepted_by_position.append(0)
            self.proposed_by_position[i] += p
            self.accepted_by_position[i] += a
        self.acceptance_sum += other.acceptance_sum
        self.drafts_tested += other.drafts_tested
        self.branched += other.branched
        self.tree_hits += other.tree_hits
        self.rows += other.rows
        self.cached_tokens += other.cached_tokens
        self.preemptions += other.preemptions
        for k, v in other.choices.items():
            self.choices[k] = self.choices.get(k, 0) + v

    def to_dict(self) -> dict[str, Any]:
        d = {
            "prompt_tokens": self.prompt_tokens,
            "generated_tokens": self.generated_tokens,
            "forwards": self.forwards,
            "tokens_per_forward": round(self.tokens_per_forward, 4),
            "seconds": round(self.seconds, 4),
            "tokens_per_second": round(self.tokens_per_second, 2),
            "decoding": self.decoding,
            "stride": self.stride,
            "rows_per_forward": round(self.rows / self.forwards, 3) if self.forwards else 0.0,
            "cached_tokens": self.cached_tokens,
            "preemptions": self.preemptions,
        }
        if self.decoding == "auto":
            d["choices"] = dict(self.choices)
        if self.decoding != "ar":
            d["rounds"] = dict(self.rounds)
            d["branched"] = self.branched
            d["tree_hits"] = self.tree_hits
            forwards = sum(self.rounds.values())
            d["cold_share"] = round(self.rounds["C"] / forwards, 4) if forwards else 0.0
            d["acceptance_by_position"] = [round(x, 4) for x in self.acceptance_by_position]
            d["introspective_acceptance"] = round(self.introspective_acceptance, 4)
        return d

