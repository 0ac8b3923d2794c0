"""The engine loop: schedule, plan each sequence's step, run one batched forward, commit."""
from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass
from typing import Any

import torch

from idlm.decoding.policy import DecodingPolicy
from idlm.decoding.sampling import SamplingParams
from idlm.engine.kv_cache import KVCache
from idlm.engine.model_runner import ModelRunner
from idlm.engine.scheduler import Scheduler
from idlm.engine.sequence import Sequence
from idlm.models.llama import CausalLM


class PromptTooLongError(ValueError):
    """The prompt (plus the room generation needs) does not fit the model's context."""


@dataclass
class EngineConfig:
    kv_cache_tokens: int = 32768
    block_size: int = 16
    max_num_seqs: int = 64
    max_model_len: int | None = None  # default: the model's max_position_embeddings


class LLMEngine:
    """Requests in, committed tokens out. Decoding policies decide what each step feeds and keeps."""

    def __init__(self, model: CausalLM, tokenizer: Any, eos_token_ids: list[int], config: EngineConfig):
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.model = model
        self.tokenizer = tokenizer
        self.eos_token_ids = list(eos_token_ids)
        self.config = config
        self.max_model_len = config.max_model_len or model.config.max_position_embeddings
        num_blocks = -(-config.kv_cache_tokens // config.block_size)
        self.kv = KVCache(model.config, num_blocks, config.block_size, self.dtype, self.device)
        self.runner = ModelRunner(model, self.kv, self.device)
        self.scheduler = Scheduler(self.kv, config.max_num_seqs)
        self._policies: dict[int, DecodingPolicy] = {}
        self._ids = itertools.count()

    def add_request(self, prompt_ids: list[int], params: SamplingParams, policy: DecodingPolicy) -> Sequence:
        if not prompt_ids:
            raise ValueError("empty prompt")
        room = len(prompt_ids) + 2 * policy.stride
        if room > self.max_model_len:
            raise PromptTooLongError(
                f"prompt has {len(prompt_ids)} tokens; the model's context is {self.max_model_len} tokens"
            )
        if room > self.kv.allocator.num_blocks * self.kv.block_size:
            raise PromptTooLongError(
                f"prompt has {len(prompt_ids)} tokens; the KV cache holds {self.config.kv_cache_tokens} tokens"
            )
        # never generate past the context window
        limit = self.max_model_len - len(prompt_ids) - 2 * policy.stride + 2
        if params.max_tokens > limit:
            params = dataclasses.replace(params, max_tokens=max(1, limit))
        seq = Sequence(
            next(self._ids), prompt_ids, params, self.tokenizer, self.eos_token_ids, self.kv.new_table(),
            self.model.config.vocab_size, self.device,
        )
        seq.stats.decoding, seq.stats.stride = policy.name, policy.stride
        self._policies[seq.seq_id] = policy
        self.scheduler.add(seq)
        return seq

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def step(self) -> list[Sequence]:
        """Run one forward over the running batch; returns the sequences it served."""
        rows = {sid: 2 * p.stride for sid, p in self._policies.items()}
        batch = self.scheduler.schedule(rows)
        if not batch:
            return []
        plans = [(seq, self._policies[seq.seq_id].plan(seq)) for seq in batch]
        logits = self.runner.run(plans)
        for (seq, plan), lg in zip(plans, logits):
            self._policies[seq.seq_id].commit(seq, plan, lg)
        for seq in batch:
            if seq.finished:
                self._policies.pop(seq.seq_id, None)
        return batch

    def abort(self, seq: Sequence) -> None:
        """Stop a request (e.g. client gone) and free its KV blocks."""
        self.scheduler.abort(seq)
        self._policies.pop(seq.seq_id, None)

    @torch.inference_mode()
    def run_to_completion(self, seqs: list[Sequence]) -> None:
        while any(not s.finished for s in seqs):
            self.step()
