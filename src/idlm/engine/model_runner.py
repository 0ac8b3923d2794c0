"""Builds one batched forward from the step's plans and returns the logit rows they ask for.

The runner owns the model and the KV tensors and nothing else of a sequence: it is handed each sequence's
block table, the position its new rows start at, and the rows (tokens, adapter gate, how many trailing
rows need logits), all plain integers.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from idlm.decoding.policy import StepPlan
from idlm.engine.kv_cache import KVCache
from idlm.models.attention import PagedAttention
from idlm.models.compile import CompiledForward
from idlm.models.llama import LORA_OFF, CausalLM


@dataclass
class RunnerInput:
    block_table: list[int]  # covers start + len(plan.token_ids) positions
    start: int  # position of the first new row (= tokens already in the KV cache)
    plan: StepPlan


class ModelRunner:
    def __init__(self, model: CausalLM, kv: KVCache, device: torch.device, compile: bool = False):
        """compile: run forwards through `models.compile.CompiledForward` (the model's kernels stay, the ops
        between them are compiled; the first step of each shape class compiles)."""
        self.model = model
        self.forward = CompiledForward(model) if compile else model
        self.kv = kv
        self.device = device
        self.num_forwards = 0
        self.num_rows = 0  # rows fed over all forwards

    @torch.inference_mode()
    def run(self, batch: list[RunnerInput]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One forward over all rows (every fed row's k/v is written). Returns the logits [rows, V] (float32) of
        each plan's logit rows, in order, and the hidden states of the rows from each plan's `hidden_start` on
        (alternatives and branches: their logits are computed later, for the rows the decoder uses), or None
        when no plan has such rows."""
        ids, gates, rows, positions, hidden_rows = [], [], [], [], []
        offset = 0
        for item in batch:
            plan = item.plan
            n = len(plan.token_ids)
            ids.extend(plan.token_ids)
            gates.extend(plan.lora_gate)
            if plan.offsets is None:
                positions.extend(range(item.start, item.start + n))
            else:
                positions.extend(item.start + o for o in plan.offsets)
            first = offset + plan.first_logit
            rows.extend(range(first, first + plan.num_logits))
            if plan.hidden_start >= 0:
                hidden_rows.extend(range(offset + plan.hidden_start, offset + (n if plan.hidden_end < 0 else plan.hidden_end)))
            offset += n
        dev = self.device
        meta = PagedAttention.build(self.kv.k, self.kv.v, self.kv.block_size, [b.block_table for b in batch],
                                    [b.start for b in batch], [len(b.plan.token_ids) for b in batch], dev,
                                    lead=[b.plan.lead for b in batch], run_start=[b.plan.run_start for b in batch])
        if all(gates):
            gate = None  # adapter (if any) on every row
        elif not any(gates):
            gate = LORA_OFF
        else:
            gate = torch.tensor(gates, device=dev)
        hidden = self.forward(torch.tensor(ids, dtype=torch.long, device=dev),
                              torch.tensor(positions, dtype=torch.long, device=dev), meta, lora_gate=gate)
        self.num_forwards += 1
        self.num_rows += len(ids)
        extra = hidden[torch.tensor(hidden_rows, device=dev)] if hidden_rows else None
        if not rows:
            return hidden.new_zeros(0, self.model.config.vocab_size, dtype=torch.float32), extra
        return self.head(hidden[torch.tensor(rows, device=dev)]), extra

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits (float32) of hidden rows."""
        return self.model.logits(hidden).float()
