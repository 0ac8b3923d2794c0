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
from idlm.models.llama import LORA_OFF, CausalLM


@dataclass
class RunnerInput:
    block_table: list[int]  # covers start + len(plan.token_ids) positions
    start: int  # position of the first new row (= tokens already in the KV cache)
    plan: StepPlan


class ModelRunner:
    def __init__(self, model: CausalLM, kv: KVCache, device: torch.device):
        self.model = model
        self.kv = kv
        self.device = device
        self.num_forwards = 0
        self.num_rows = 0  # rows fed over all forwards

    @torch.inference_mode()
    def run(self, batch: list[RunnerInput]) -> torch.Tensor:
        """One forward over all rows (every fed row's k/v is written); logits [sum of num_logits, V] float32."""
        ids, gates, rows, positions = [], [], [], []
        offset = 0
        for item in batch:
            n = len(item.plan.token_ids)
            ids.extend(item.plan.token_ids)
            gates.extend(item.plan.lora_gate)
            positions.extend(range(item.start, item.start + n))
            rows.extend(range(offset + n - item.plan.num_logits, offset + n))
            offset += n
        dev = self.device
        meta = PagedAttention.build(self.kv.k, self.kv.v, self.kv.block_size, [b.block_table for b in batch],
                                    [b.start for b in batch], [len(b.plan.token_ids) for b in batch], dev)
        if all(gates):
            gate = None  # adapter (if any) on every row
        elif not any(gates):
            gate = LORA_OFF
        else:
            gate = torch.tensor(gates, device=dev)
        hidden = self.model(torch.tensor(ids, dtype=torch.long, device=dev),
                            torch.tensor(positions, dtype=torch.long, device=dev), meta, lora_gate=gate)
        self.num_forwards += 1
        self.num_rows += len(ids)
        if not rows:
            return hidden.new_zeros(0, self.model.config.vocab_size, dtype=torch.float32)
        return self.model.logits(hidden[torch.tensor(rows, device=dev)]).float()
