"""Autoregressive decoding: feed what is not cached yet, sample one token from the last row."""
from __future__ import annotations

import torch

from idlm.decoding.policy import StepPlan
from idlm.decoding.sampling import distribution, sample
from idlm.engine.sequence import Sequence


class ARDecoding:
    """The baseline: one token per forward (the prefill forward emits the first token)."""

    name = "ar"
    stride = 1

    def __init__(self, base_only: bool = False):
        self.base_only = base_only  # with a gated adapter loaded, AR is the base model's

    def plan(self, seq: Sequence) -> StepPlan:
        rows = seq.all_ids[seq.kv.num_tokens :]
        gate = [0.0] * len(rows) if self.base_only else None
        return StepPlan(token_ids=rows, logit_rows=[len(rows) - 1], lora_gate=gate)

    def commit(self, seq: Sequence, plan: StepPlan, logits: torch.Tensor) -> None:
        probs = distribution(logits, seq.params, seq.penalties)
        token = int(sample(probs, seq.generator)[0])
        seq.emit([token])
