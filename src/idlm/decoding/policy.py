"""What a decoding policy tells the engine for one step of one sequence, and what it gets back."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from idlm.engine.sequence import Sequence


@dataclass
class StepPlan:
    """Rows to feed after the sequence's cached prefix (positions kv.num_tokens ...).

    logit_rows: rows whose output distributions the policy needs.
    lora_gate: per row 1.0 where an adapter delta applies, 0.0 where not; None = no gating (adapter, if
    any, on every row).
    """

    token_ids: list[int]
    logit_rows: list[int]
    lora_gate: list[float] | None = None


class DecodingPolicy(Protocol):
    name: str
    stride: int

    def plan(self, seq: Sequence) -> StepPlan:
        """Decide what this sequence feeds in the next forward."""

    def commit(self, seq: Sequence, plan: StepPlan, logits: torch.Tensor) -> None:
        """Consume the logits of `plan.logit_rows`: emit tokens, roll back unkept KV rows."""
