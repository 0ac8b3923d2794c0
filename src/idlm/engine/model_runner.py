"""Builds one batched forward from the sequences' step plans and returns each one's logit rows."""
from __future__ import annotations

import torch

from idlm.decoding.policy import StepPlan
from idlm.engine.kv_cache import KVCache
from idlm.engine.sequence import Sequence
from idlm.models.attention import PagedAttention
from idlm.models.llama import LORA_OFF, CausalLM


class ModelRunner:
    """Owns the model and the KV pool; knows nothing about decoding rules."""

    def __init__(self, model: CausalLM, kv_cache: KVCache, device: torch.device):
        self.model = model
        self.kv = kv_cache
        self.device = device
        self.num_forwards = 0

    @torch.inference_mode()
    def run(self, batch: list[tuple[Sequence, StepPlan]]) -> list[torch.Tensor]:
        """One forward for all plans; every fed row's KV is written (the policy rolls back what it drops)."""
        ids, starts, lens, tables, gates, rows = [], [], [], [], [], []
        offset = 0
        gated = any(p.lora_gate is not None for _, p in batch)
        for seq, plan in batch:
            n = len(plan.token_ids)
            start = seq.kv.num_tokens
            seq.kv.reserve(start + n)
            ids.extend(plan.token_ids)
            starts.append(start)
            lens.append(n)
            tables.append(seq.kv.blocks)
            if gated:
                gates.extend(plan.lora_gate if plan.lora_gate is not None else [1.0] * n)
            rows.extend(offset + r for r in plan.logit_rows)
            offset += n
        dev = self.device
        meta = PagedAttention.build(self.kv.k, self.kv.v, self.kv.block_size, tables, starts, lens, dev)
        positions = torch.cat([torch.arange(s, s + n) for s, n in zip(starts, lens)]).to(dev)
        input_ids = torch.tensor(ids, dtype=torch.long, device=dev)
        gate = None
        if gated:
            gate = torch.tensor(gates, device=dev) if any(gates) else LORA_OFF
        hidden = self.model(input_ids, positions, meta, lora_gate=gate)
        logits = self.model.logits(hidden[torch.tensor(rows, device=dev)]).float()
        self.num_forwards += 1
        out, k = [], 0
        for seq, plan in batch:
            seq.kv.num_tokens += len(plan.token_ids)
            seq.stats.forwards += 1
            out.append(logits[k : k + len(plan.logit_rows)])
            k += len(plan.logit_rows)
        return out
