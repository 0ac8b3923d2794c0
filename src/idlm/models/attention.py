"""Attention backends: how a layer's new q/k/v rows attend.

- `DenseAttention`: [B, L] sequences, an explicit boolean mask (or plain causal), no cache. Training.
- `KVRecorder` / `PrefixAttention`: a causal pass that keeps each layer's k/v, then rows that attend to
  that fixed prefix (explicit mask) and to each other. Training of gated adapters (two-pass objective).
- `PagedAttention`: rows of several sequences flattened to [T]; k/v are written into the paged pool at
  their slots, then each sequence's queries attend to its cached prefix and to the earlier new rows of
  the same step (key position <= query position). Serving (AR and ISD blocks alike). Every step attends by our
  kernel where it is loaded (models/attention.cpp, `idlm_panel::attention`, loaded with the panel kernels), which
  reads each sequence's keys and values in place through its block table: no gathered copy, no folded mask, and a
  row's bits independent of the rows beside it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.nn.functional as F


class AttentionBackend(Protocol):
    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q: [..., H, D], k/v: [..., Hkv, D] -> [..., H, D]."""


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
          folded_mask: torch.Tensor | None = None) -> torch.Tensor:
    """q: [B, H, Q, D], k/v: [B, Hkv, S, D]; grouped-query heads share kv heads (never materialized H times).

    With a mask, the G query heads of a kv head are folded into the query axis ([B, Hkv, G*Q, D]) so one
    kv head serves them all; measured on CPU (32 sequences x 900 keys) 16x faster than repeating k/v.
    `folded_mask`: `_fold(mask, G, q.dtype)`, when the caller makes it once and reuses it over layers.
    """
    b, h, qn, d = q.shape
    groups = h // k.shape[1]
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=groups > 1)
    if groups == 1:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    folded = q.reshape(b, k.shape[1], groups * qn, d)
    folded_mask = _fold(mask, groups, q.dtype) if folded_mask is None else folded_mask
    out = F.scaled_dot_product_attention(folded, k, v, attn_mask=folded_mask)
    return out.reshape(b, h, qn, d)


def _attention_by_sums(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, folded_mask: torch.Tensor) -> torch.Tensor:
    """`_sdpa` with a mask, written as multiply-and-sum for a compiled graph of a decode step (a few query rows):
    the compiler fuses the block gather of the keys and values into its own loops (no gathered copy) and runs the
    scores, softmax and weighted sum as a few loops of its own, where the library's kernel cost some 33 us a layer
    for one row, most of it fixed. Same folding of grouped-query heads."""
    b, h, qn, d = q.shape
    hkv = k.shape[1]
    folded = q.reshape(b, hkv, h // hkv * qn, d)
    scores = (folded.unsqueeze(-2) * k.unsqueeze(-3)).sum(-1) * d ** -0.5 + folded_mask
    weights = scores.softmax(-1)
    return (weights.unsqueeze(-1) * v.unsqueeze(-3)).sum(-2).reshape(b, h, qn, d)


def _fold(mask: torch.Tensor, groups: int, dtype: torch.dtype) -> torch.Tensor:
    """bool [B, 1, Q, S] -> additive [B, 1, G*Q, S] (0 or -inf, in the queries' dtype): the mask of query
    heads folded into the query axis (see `_sdpa`). Additive, because SDPA turns a bool mask into this on
    every call (measured: 7 rows x 300 keys, 115 vs 90 us a layer on CPU)."""
    folded = mask.repeat(1, 1, groups, 1)
    return torch.zeros(folded.shape, dtype=dtype, device=mask.device).masked_fill_(~folded, float("-inf"))


@dataclass
class DenseAttention:
    """Whole sequences without a cache. mask: bool [B or 1, 1, L, L] (True = may attend) or None = causal."""

    mask: torch.Tensor | None = None

    def attend(self, layer_idx: int, q, k, v):  # noqa: ARG002
        out = _sdpa(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), self.mask)
        return out.transpose(1, 2)


@dataclass
class KVRecorder:
    """Plain causal attention over [B, L] sequences that keeps every layer's k/v ([B, L, Hkv, D])."""

    kv: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)

    def attend(self, layer_idx: int, q, k, v):
        if layer_idx != len(self.kv):
            raise RuntimeError("KVRecorder expects layers in order, once each")
        self.kv.append((k, v))
        return _sdpa(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), None).transpose(1, 2)


@dataclass
class PrefixAttention:
    """[B, Q] rows attending to a fixed per-layer prefix (from a KVRecorder pass) and to themselves.

    mask: bool [B, 1, Q, S + Q] over [prefix keys | these rows' keys] (True = may attend).
    """

    prefix: list[tuple[torch.Tensor, torch.Tensor]]
    mask: torch.Tensor

    def attend(self, layer_idx: int, q, k, v):
        pk, pv = self.prefix[layer_idx]
        keys = torch.cat([pk.to(k.dtype), k], dim=1).transpose(1, 2)
        vals = torch.cat([pv.to(v.dtype), v], dim=1).transpose(1, 2)
        return _sdpa(q.transpose(1, 2), keys, vals, self.mask).transpose(1, 2)


# Sequences whose step feeds at most this many rows (AR, ISD blocks) attend together, padded to the longest of
# them; each longer one (a prefill chunk) attends alone, so a prefill never pads every decode row to its length.
SHORT_QUERY = 32
# Where our kernel is not loaded (other devices, no compiler), compiled graphs of steps whose sequences feed at most
# this many rows each attend by multiply-and-sum; longer ones by the library's kernel. Measured in one process, steps
# alternating (embedded model, AVX-512 EPYC, before our kernel): AR 0.86-0.92x the time with the library's kernel
# (int8), 0.92-0.99x (fp32); an fp32 R-ISD step of 4-7 rows 1.08x, so not them.
SUMS_QUERY = 1
# How steps attend, named for what measures step costs (engine/llm.py's cost key): a new rule is new costs.
METHODS = f"our kernel where it fits, else sdpa (sums <= {SUMS_QUERY} rows in graphs)"


def kernel_fits(pool: torch.Tensor) -> bool:
    """Our attention kernel is loaded (with the panel kernels) and takes this pool: float32 on the CPU, head dims of
    whole 16-float vectors. Then every step attends by it, decode rows and prefill chunks alike: a row's bits do not
    depend on the rows beside it, so a position attends alike whether its step feeds it alone (AR), among a verify
    step's rows or in a prefill chunk of any length, whatever the prefix cache held (with the panel products, greedy
    R-ISD int8 / w8a8 gave their AR's tokens on 8 / 8 held-out prompts, one request at a time: 2 / 1 of 8 while
    1-row steps and prefill took the library's kernel). Eager AR steps ran 1.1-1.4x faster than by the library's
    kernel, prefill chunks of 100-1,500 tokens 0.97-0.99x the time (docs/benchmarks.md, 2026-12-07)."""
    return (pool.device.type == "cpu" and pool.dtype == torch.float32 and pool.shape[-1] % 16 == 0
            and hasattr(torch.ops.idlm_panel, "attention"))


@dataclass
class _Group:
    """Sequences of a step that attend in one padded batch.

    rows: [R] their rows in the step's flattened [T] (None: the whole step, in order).
    block_tables: [B, nb] block ids of each sequence (padded with a valid id; masked out).
    q_index: [B, Qmax] index of each sequence's rows in the group's rows + a zero row (R), or None when B == 1.
    out_index: [R] positions of the real rows in the flattened [B * Qmax] output, or None when B == 1.
    mask: [B, 1, Qmax, S] bool: which cached and new keys each row sees (S: nb * block_size, or the
        group of one sequence: `length`).
    length: the keys of a group of one sequence (its cached and new ones), to which its keys are cut, gathered or
        not, so that how its blocks lie in the pool changes no bit of its attention (the library's kernel sums
        differently over a longer, masked tail); None for a group of several, padded to whole blocks.
    span: the first block when the group is one sequence whose blocks are consecutive in the pool (the usual
        case for a lone request: blocks are handed out in order and rolled-back ones are taken back first): its
        keys are then a view of the pool, not a gathered copy.
    folded: the mask folded for grouped-query heads, made by the first layer and reused by the others.
    method: "sdpa" (the library's kernel), "sums" (`_attention_by_sums`: compiled graphs of steps of at most
        SUMS_QUERY rows per sequence, where our kernel is not loaded) or "kernel" (our kernel over the pool, wherever
        `kernel_fits`).
    """

    rows: torch.Tensor | None
    block_tables: torch.Tensor
    q_index: torch.Tensor | None
    out_index: torch.Tensor | None
    mask: torch.Tensor
    length: int | None = None
    span: int | None = None
    folded: torch.Tensor | None = None
    method: str = "sdpa"

    def _keys(self, pool: torch.Tensor) -> torch.Tensor:
        """[B, Hkv, S, D] keys (or values) of the group's sequences."""
        _, bs, hkv, d = pool.shape
        b, nb = self.block_tables.shape
        if self.span is not None:
            blocks = pool[self.span : self.span + nb]
        else:  # index_select copies whole blocks (measured 8 vs 12 us for 16 blocks as `pool[block_tables]`)
            blocks = pool.index_select(0, self.block_tables.view(-1))
        keys = blocks.view(b, nb * bs, hkv, d)
        return (keys if self.length is None else keys[:, : self.length]).transpose(1, 2)

    def attend(self, kp: torch.Tensor, vp: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        hkv = kp.shape[2]
        qb = q.unsqueeze(0) if self.q_index is None else torch.cat([q, q.new_zeros(1, *q.shape[1:])])[self.q_index]
        if self.method == "kernel":
            out = torch.ops.idlm_panel.attention(qb, kp, vp, self.block_tables, self.mask)
            return out[0] if self.out_index is None else out.reshape(-1, *out.shape[2:])[self.out_index]
        keys, vals = self._keys(kp), self._keys(vp)
        groups = q.shape[1] // hkv
        if (groups > 1 or self.method == "sums") and self.folded is None:
            self.folded = _fold(self.mask, groups, q.dtype)
        if self.method == "sums":
            out = _attention_by_sums(qb.transpose(1, 2), keys, vals, self.folded).transpose(1, 2)
        else:
            out = _sdpa(qb.transpose(1, 2), keys, vals, self.mask, self.folded).transpose(1, 2)  # [B, Qmax, H, D]
        return out[0] if self.out_index is None else out.reshape(-1, *out.shape[2:])[self.out_index]


@dataclass
class PagedAttention:
    """One batched step over the paged KV pool (see engine.kv_cache.KVCache).

    k_pool/v_pool: per layer [num_blocks, block_size, Hkv, D].
    slot_mapping: [T] flat slot (block * block_size + offset) where each new row's k/v is written.
    groups: the step's sequences by query length (see SHORT_QUERY), each attended as one padded batch.
    """

    k_pool: list[torch.Tensor]
    v_pool: list[torch.Tensor]
    slot_mapping: torch.Tensor
    groups: list[_Group]

    def attend(self, layer_idx: int, q, k, v):
        kp, vp = self.k_pool[layer_idx], self.v_pool[layer_idx]
        hkv, d = kp.shape[2:]
        kp.view(-1, hkv, d).index_copy_(0, self.slot_mapping, k.to(kp.dtype))
        vp.view(-1, hkv, d).index_copy_(0, self.slot_mapping, v.to(vp.dtype))
        if len(self.groups) == 1:
            return self.groups[0].attend(kp, vp, q)
        out = q.new_empty(q.shape)
        for g in self.groups:
            out.index_copy_(0, g.rows, g.attend(kp, vp, q.index_select(0, g.rows)).to(out.dtype))
        return out

    def graph_inputs(self) -> tuple | None:
        """The step's tensors for a compiled graph to trace its attention from (`from_graph_inputs`), when its
        sequences attend as one group (every step but those with a prefill chunk beside other sequences); None
        otherwise. The keys are gathered by whole blocks, a span's too (its bounds are plain ints, which a graph
        would take as constants), with the mask widened to them; a table of one block gets a second, masked out:
        graphs specialize sizes of 1, and short sequences would otherwise have graphs of their own. The last
        input, a string (a constant of the graph), is the group's method, or "sums" where the library's kernel
        would serve a step whose sequences feed at most SUMS_QUERY rows each."""
        if len(self.groups) != 1:
            return None
        g = self.groups[0]
        tables = g.block_tables if g.block_tables.shape[1] > 1 else g.block_tables.repeat(1, 2)
        keys = tables.shape[1] * self.k_pool[0].shape[1]
        mask = g.mask if g.mask.shape[-1] == keys else F.pad(g.mask, (0, keys - g.mask.shape[-1]))
        method = "sums" if mask.shape[2] <= SUMS_QUERY and g.method == "sdpa" else g.method
        return self.k_pool, self.v_pool, self.slot_mapping, tables, g.q_index, g.out_index, mask, method

    @classmethod
    def from_graph_inputs(cls, k_pool: list[torch.Tensor], v_pool: list[torch.Tensor], slot_mapping: torch.Tensor,
                          block_tables: torch.Tensor, q_index: torch.Tensor | None, out_index: torch.Tensor | None,
                          mask: torch.Tensor, method: str = "sdpa") -> "PagedAttention":
        return cls(k_pool, v_pool, slot_mapping, [_Group(None, block_tables, q_index, out_index, mask,
                                                         method=method)])

    @classmethod
    def build(
        cls,
        k_pool: list[torch.Tensor],
        v_pool: list[torch.Tensor],
        block_size: int,
        block_tables: list[list[int]],
        start_positions: list[int],
        query_lens: list[int],
        device: torch.device,
        lead: list[list[int] | None] | None = None,
        run_start: list[list[int] | None] | None = None,
    ) -> "PagedAttention":
        """Metadata for sequences whose new rows take KV slots start .. start + qlen - 1 (in that order).

        By default row r attends causally: the cached prefix and rows 0..r. With `lead[i]` / `run_start[i]`
        for sequence i (a tree of branches), its row r sees the prefix, rows [0, lead[r]) and rows
        [run_start[r], r] (causal: lead = run_start = r).
        """
        first = [0]
        slots = []
        for table, start, n in zip(block_tables, start_positions, query_lens):
            kv = torch.arange(start, start + n)
            tt = torch.tensor(table, dtype=torch.long)
            slots.append(tt[kv // block_size] * block_size + kv % block_size)
            first.append(first[-1] + n)
        short = [i for i, n in enumerate(query_lens) if n <= SHORT_QUERY]
        members = ([short] if short else []) + [[i] for i, n in enumerate(query_lens) if n > SHORT_QUERY]
        whole = len(members) == 1
        kernel = kernel_fits(k_pool[0])

        def group(seqs: list[int]) -> _Group:
            b = len(seqs)
            lens = [query_lens[i] for i in seqs]
            qmax = max(lens)
            nb = max(len(block_tables[i]) for i in seqs)
            tables = torch.tensor([block_tables[i] + [block_tables[i][0]] * (nb - len(block_tables[i])) for i in seqs],
                                  dtype=torch.long)
            total = sum(lens)
            q_index, out_index, rows = [], [], []
            # padding rows see key 0 only (no NaN)
            upto = torch.zeros((b, qmax), dtype=torch.long)  # keys < upto: prefix and the rows before `lead`
            run_lo = torch.zeros((b, qmax), dtype=torch.long)  # keys in [run_lo, self]: the row's own run
            own = torch.zeros((b, qmax), dtype=torch.long)
            row = 0
            for j, i in enumerate(seqs):
                start, n = start_positions[i], query_lens[i]
                kv = torch.arange(start, start + n)
                rows.extend(range(first[i], first[i] + n))
                q_index.append(list(range(row, row + n)) + [total] * (qmax - n))
                out_index.extend(range(j * qmax, j * qmax + n))
                tree = lead is not None and lead[i] is not None
                upto[j, :n] = start + torch.tensor(lead[i]) if tree else kv
                run_lo[j, :n] = start + torch.tensor(run_start[i]) if tree else kv
                own[j, :n] = kv
                row += n
            single = b == 1
            table = block_tables[seqs[0]]
            length = start_positions[seqs[0]] + lens[0] if single else None
            span = table[0] if single and table == list(range(table[0], table[0] + nb)) else None
            keys = torch.arange(length or nb * block_size)[None, None, :]
            mask = (keys < upto[..., None]) | ((keys >= run_lo[..., None]) & (keys <= own[..., None]))
            return _Group(
                rows=None if whole else torch.tensor(rows, dtype=torch.long, device=device),
                block_tables=tables.to(device),
                q_index=None if single else torch.tensor(q_index, dtype=torch.long, device=device),
                out_index=None if single else torch.tensor(out_index, dtype=torch.long, device=device),
                mask=mask.unsqueeze(1).to(device),
                length=length,
                span=span,
                method="kernel" if kernel else "sdpa",
            )

        return cls(k_pool=k_pool, v_pool=v_pool, slot_mapping=torch.cat(slots).to(device),
                   groups=[group(m) for m in members])
