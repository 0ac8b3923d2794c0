"""The engine loop: schedule -> one batched forward -> batched decoding -> commit.

    request -> Scheduler.schedule (who runs, how many rows; kv blocks) -> ModelRunner.run (tensors, model)
            -> Decoder.decode (sample / verify / draft for the whole step) -> Sequence.emit (stop checks, text)
            -> Scheduler.postprocess (computed tokens, rollback, prefix cache, frees)
"""
from __future__ import annotations

import dataclasses
import itertools
import random
from dataclasses import dataclass
from typing import Any

import torch

from idlm.decoding.adaptive import Adaptive
from idlm.decoding.decoder import DecodeItem, Decoder, DecodeResult
from idlm.decoding.policy import Decoding
from idlm.decoding.sampling import SamplingParams
from idlm.engine.block_manager import BlockManager
from idlm.engine.kv_cache import KVCache
from idlm.engine.model_runner import ModelRunner, RunnerInput
from idlm.engine.scheduler import Scheduler
from idlm.engine.sequence import Sequence
from idlm.models.llama import CausalLM


class PromptTooLongError(ValueError):
    """The request (prompt + max_tokens + one step's rows) can never fit the context or the KV pool."""


@dataclass
class EngineConfig:
    kv_cache_tokens: int = 32768
    kv_block_size: int = 16
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048  # rows per forward (prefill chunks, drafts and MASK rows count)
    max_model_len: int | None = None  # default: the model's max_position_embeddings
    enable_prefix_caching: bool = True
    clamp_max_tokens: bool = False  # shorten max_tokens to what fits instead of refusing the request
    stationary: bool = False  # every ISD decode step feeds its layout's widest row count (scheduler.py)
    compile: bool = False  # compiled forwards (models/compile.py); each new step shape class compiles once

    def __post_init__(self) -> None:
        for name in ("kv_cache_tokens", "kv_block_size", "max_num_seqs", "max_num_batched_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2, got {self.max_model_len}")


class LLMEngine:
    """Requests in, committed tokens out; one `step` is one forward."""

    def __init__(self, model: CausalLM, tokenizer: Any, eos_token_ids: list[int], config: EngineConfig):
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.model = model
        self.tokenizer = tokenizer
        self.eos_token_ids = list(eos_token_ids)
        self.config = config
        self.max_model_len = config.max_model_len or model.config.max_position_embeddings
        num_blocks = -(-config.kv_cache_tokens // config.kv_block_size)
        self.kv = KVCache(model.config, num_blocks, config.kv_block_size, self.dtype, self.device)
        self.runner = ModelRunner(model, self.kv, self.device, config.compile)
        self.blocks = BlockManager(num_blocks, config.kv_block_size)
        self.scheduler = Scheduler(self.blocks, config.max_num_seqs, config.max_num_batched_tokens,
                                   config.enable_prefix_caching, config.stationary)
        self.decoder = Decoder(model.config.vocab_size, config.max_num_seqs, self.device)
        self._ids = itertools.count()
        self._entropy = random.SystemRandom()

    # ---- requests --------------------------------------------------------------------------------
    def add_request(self, prompt_ids: list[int], params: SamplingParams, decoding: Decoding | Adaptive) -> Sequence:
        """`decoding`: fixed, or `Adaptive` (re-chosen before every step among lossless decodings)."""
        params = self.check_request(prompt_ids, params, decoding)
        seed = params.seed if params.seed is not None else self._entropy.getrandbits(63)
        seq = Sequence(next(self._ids), prompt_ids, params, decoding, seed, self.tokenizer, self.eos_token_ids)
        self.scheduler.add(seq)
        return seq

    @property
    def capacity(self) -> int:
        """Tokens one request can hold: the context, or the whole KV pool if smaller."""
        return min(self.max_model_len, self.blocks.num_blocks * self.blocks.block_size)

    def room(self, num_prompt_tokens: int, decoding: Decoding | Adaptive) -> int:
        """The largest max_tokens that fits after the prompt, keeping one step's rows (with margin) free."""
        return self.capacity - num_prompt_tokens - (decoding.max_step_rows + 2)

    def check_request(self, prompt_ids: list[int], params: SamplingParams,
                      decoding: Decoding | Adaptive) -> SamplingParams:
        """Raise (PromptTooLongError, ValueError) if the request can never run; returns its params (max_tokens
        shortened to what fits under `clamp_max_tokens`). Reads only fixed sizes: safe from any thread."""
        if not prompt_ids:
            raise ValueError("empty prompt")
        step = decoding.max_step_rows + 2
        capacity = self.capacity
        where = "the model's context" if capacity == self.max_model_len else "the KV cache"
        if len(prompt_ids) + step > capacity:
            raise PromptTooLongError(f"prompt has {len(prompt_ids)} tokens; {where} holds {capacity} tokens")
        room = self.room(len(prompt_ids), decoding)
        if params.max_tokens > room:
            if not self.config.clamp_max_tokens:
                raise PromptTooLongError(
                    f"prompt ({len(prompt_ids)} tokens) + max_tokens ({params.max_tokens}) does not fit {where} "
                    f"({capacity} tokens, {step} kept free for a step's rows): at most max_tokens={room}")
            params = dataclasses.replace(params, max_tokens=max(1, room))
        widest = decoding.widest if isinstance(decoding, Adaptive) else decoding
        if widest.step_rows(1, widest.num_masks) > self.config.max_num_batched_tokens:
            raise ValueError(f"max_num_batched_tokens {self.config.max_num_batched_tokens} is below one "
                             f"{widest.label} step")
        return params

    def abort(self, seq: Sequence) -> None:
        """Stop a request (e.g. client gone) and free its kv blocks."""
        self.scheduler.abort(seq)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # ---- one step --------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[Sequence]:
        """Run one forward; returns the sequences that finished in it."""
        self._choose()
        step = self.scheduler.schedule()
        if not step:
            return []
        fresh = [s.seq for s in step if s.started and s.seq.params.uses_penalties]
        self.decoder.start([s.slot for s in fresh], [s.token_ids for s in fresh])
        mask_id = self.model.mask_token_id
        inputs = []
        for s in step:
            seq = s.seq
            uncomputed = seq.token_ids[seq.num_computed_tokens:]
            plan = (seq.decoding.chunk(uncomputed[: s.num_rows]) if s.chunk
                    else seq.decoding.plan(uncomputed, seq.drafts, mask_id, seq.alternatives, pad_to=s.num_rows))
            inputs.append(RunnerInput(seq.block_table, seq.num_computed_tokens, plan))
        logits, hidden = self.runner.run(inputs)
        full = [s for s in step if not s.chunk]
        items = [self._decode_item(s.seq) for s in full]
        results = self.decoder.decode(items, logits, hidden, self.runner.head) if full else []
        by_seq = dict(zip((s.seq.seq_id for s in full), results))
        kept, rec_slots, rec_tokens = [], [], []
        for s in step:
            seq = s.seq
            seq.stats.forwards += 1
            seq.stats.rows += s.num_rows
            res = by_seq.get(seq.seq_id)
            if res is None:
                kept.append(s.num_rows)
                continue
            kept.append(seq.num_uncomputed + res.kept_drafts)  # committed rows: uncomputed + accepted drafts
            self._commit(seq, res)
            if seq.params.uses_penalties and not seq.finish_reason:
                rec_slots.extend([seq.slot] * len(res.tokens))
                rec_tokens.extend(res.tokens)
        self.decoder.record(rec_slots, rec_tokens)
        return self.scheduler.postprocess(step, kept)

    def _choose(self) -> None:
        """`auto` requests that may run this step take the decoding predicted fastest at the coming batch size."""
        sched = self.scheduler
        batch = min(self.config.max_num_seqs, len(sched.running) + len(sched.waiting))
        room = self.config.max_num_seqs - len(sched.running)
        for seq in itertools.chain(sched.running, itertools.islice(sched.waiting, max(0, room))):
            if seq.adaptive is None:
                continue
            seq.decoding = seq.adaptive.choose(seq.choice, seq.stats, batch)
            del seq.drafts[seq.decoding.num_masks:]  # a verified prefix of the drafts is as exact as all of them
            del seq.alternatives[(seq.decoding.tree - 1) if seq.drafts else 0:]

    def _decode_item(self, seq: Sequence) -> DecodeItem:
        d = seq.decoding
        return DecodeItem(seq.seq_id, seq.slot, seq.params, d, seq.seed, seq.num_tokens, seq.drafts,
                          seq.params.max_tokens - seq.num_output_tokens,
                          d.num_branches(len(seq.drafts)) if d.num_masks else 0, list(seq.alternatives))

    @staticmethod
    def _commit(seq: Sequence, res: DecodeResult) -> None:
        stats = seq.stats
        k = len(seq.drafts)
        stats.choices[seq.decoding.label] = stats.choices.get(seq.decoding.label, 0) + 1
        if seq.decoding.name != "ar":
            stats.rounds["R" if res.rejected else ("V" if k else "C")] += 1
            stats.branched += int(res.branched)
            stats.tree_hits += int(res.tree_hit)
            for j in range(res.tested):
                stats.record_test(j, j < res.kept_drafts)
            stats.acceptance_sum += res.ratio_sum
        seq.emit(res.tokens, res.kinds, res.logprobs)
        seq.drafts = res.drafts
        seq.alternatives = res.alternatives

    @torch.inference_mode()
    def run_to_completion(self, seqs: list[Sequence]) -> None:
        while any(not s.finished for s in seqs):
            self.step()
