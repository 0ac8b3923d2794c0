"""One step of decoding for a whole batch: sample, verify drafts, draft anew, with a fixed number of tensor ops.

Each request of a step brings its logit rows, laid out as `StepPlan` asks (decoding/policy.py):

    [p_0 .. p_{K-1} | p_K | q_0 .. q_{M-1}]     K drafts to verify, M = N - 1 MASK rows (AR: K = M = 0)

p_j is the target distribution of draft j (conditioned on the drafts before it), p_K that of the next token,
q_m the proposal of new draft m. Drafts are tested left to right with min(1, p(x) / (alpha q(x))); the first
rejection at s takes the correction from normalize(max(0, p_s - q_s)) and drops the new drafts (the next step
starts cold); full acceptance takes the next token from p_K and keeps the new drafts. p and q come from one
pipeline (`sampling.distribution`) with the request's parameters, and `exact` drafting draws x ~ q, so the
committed text is distributed exactly as AR sampling from the anchor model. Under greedy decoding p and q are
one-hots and the rule reduces to "accept while the draft is the argmax".

Every row of every request runs through the same ops; Python only lays out indices and the counter-based
random keys (one per draw, from (seed, position, stream)), and one `.tolist()` brings the step's results back.
Per-request tensors live here in per-slot buffers: the penalty history and the proposals q of pending drafts.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from idlm.decoding.policy import Decoding
from idlm.decoding.sampling import (RowSampling, SamplingParams, distribution, residual_distribution, row_key, sample,
                                   uniforms)

ACCEPT, NEXT, DRAFT = 1, 2, 3  # random streams


@dataclass
class DecodeItem:
    """One request's share of a step (plain values; the engine builds it from a sequence)."""

    request_id: int
    slot: int
    params: SamplingParams
    decoding: Decoding
    seed: int
    position: int  # index in the token list that the first new token takes
    drafts: list[int]
    budget: int  # tokens the request may still emit
    num_branches: int = 0  # branch rows fed this step (each N - 1 MASK rows, hidden states given apart)

    @property
    def num_rows(self) -> int:
        """Logit rows: p of each draft, the next token, q of each MASK row (branches are given apart)."""
        return len(self.drafts) + 1 + self.decoding.num_masks


@dataclass
class DecodeResult:
    tokens: list[int]  # committed in order: the accepted drafts, then the next token or the correction
    rejected: bool  # a draft was rejected (the last token is its correction)
    drafts: list[int]  # new drafts (empty after a rejection and for AR)
    tested: int  # drafts actually tested
    ratio_sum: float  # sum over tested drafts of min(1, p(x) / q(x))
    branched: bool = False  # after a rejection, the new drafts came from the branch at the rejected draft


class Decoder:
    """Batched sampling and verification; owns the per-slot tensors of the requests it serves."""

    def __init__(self, vocab_size: int, num_slots: int, device: torch.device | str = "cpu"):
        self.vocab_size = vocab_size
        self.num_slots = num_slots
        self.device = device
        self.seen: Tensor | None = None  # [S, V] token in prompt or output (repetition penalty)
        self.counts: Tensor | None = None  # [S, V] times generated (presence / frequency penalties)
        self.q: Tensor | None = None  # [S, D, V] proposal of each pending draft (non-greedy requests)
        # Test hook: drafter(item, first_position, n) -> n drafts replacing the model's (q: their one-hot).
        self.drafter: Callable[[DecodeItem, int, int], list[int]] | None = None

    # ---- per-slot history ----------------------------------------------------------------------
    def start(self, slots: list[int], prompts: list[list[int]]) -> None:
        """Reset the penalty history of newly admitted requests that use penalties (prompt tokens: seen)."""
        if not slots:
            return
        if self.seen is None:
            self.seen = torch.zeros(self.num_slots, self.vocab_size, dtype=torch.bool, device=self.device)
            self.counts = torch.zeros(self.num_slots, self.vocab_size, dtype=torch.float32, device=self.device)
        idx = torch.tensor(slots, dtype=torch.long, device=self.device)
        self.seen.index_fill_(0, idx, False)
        self.counts.index_fill_(0, idx, 0.0)
        rows = [s for s, p in zip(slots, prompts) for _ in p]
        cols = [t for p in prompts for t in p]
        if rows:
            self.seen[self._index(rows), self._index(cols)] = True

    def record(self, slots: list[int], tokens: list[int]) -> None:
        """Committed tokens (one slot per token) of requests that use penalties."""
        if not slots:
            return
        rows, cols = self._index(slots), self._index(tokens)
        self.counts.index_put_((rows, cols), torch.ones(len(slots), device=self.device), accumulate=True)
        self.seen[rows, cols] = True

    def _index(self, values: list[int]) -> Tensor:
        return torch.tensor(values, dtype=torch.long, device=self.device)

    # ---- one step ------------------------------------------------------------------------------
    def _history(self, row_slot: list[int], extra_rows: list[int], extra_toks: list[int], dev) -> tuple:
        """(seen, counts) [R, V] of each row: its slot's history plus the drafts the row conditions on."""
        idx = torch.tensor(row_slot, dtype=torch.long, device=dev)
        seen, counts = self.seen.index_select(0, idx), self.counts.index_select(0, idx)
        if extra_rows:
            r = torch.tensor(extra_rows, dtype=torch.long, device=dev)
            c = torch.tensor(extra_toks, dtype=torch.long, device=dev)
            counts.index_put_((r, c), torch.ones(len(extra_rows), device=dev), accumulate=True)
            seen[r, c] = True
        return seen, counts

    def decode(self, items: list[DecodeItem], logits: Tensor, branch_hidden: Tensor | None = None,
               head: Callable[[Tensor], Tensor] | None = None) -> list[DecodeResult]:
        """logits: [sum of item.num_rows, V], the items' rows in order. branch_hidden: the hidden states of the
        items' branch rows (item.num_branches * N-1 each, in order); `head` turns the chosen ones into logits."""
        dev = logits.device
        b = len(items)
        kmax = max(len(it.drafts) for it in items)
        mmax = max(it.decoding.num_masks for it in items)
        penalized = any(it.params.uses_penalties for it in items)
        greedy_step = all(it.params.greedy for it in items)
        # ---- layout (Python, integers) ------------------------------------------------------------
        row_params: list[SamplingParams] = []
        row_slot: list[int] = []
        extra_rows: list[int] = []  # penalty history a p row adds: the drafts before it
        extra_toks: list[int] = []
        p_index = []  # [B, kmax + 1] logit row of p_j (padded with p_K)
        main_index = []  # [B, mmax] logit row of each new draft's q (padded with row 0)
        draft_tok, valid, tested, key_accept, next_keys, key_draft = [], [], [], [], [], []
        alpha, fast, topk, conf, fix_argmax, argmax_draft, greedy, k_of, m_of = [], [], [], [], [], [], [], [], []
        branched, branch_base, key_branch = [], [], []  # items with branches: index, first hidden row, keys
        base = hbase = 0
        for i, it in enumerate(items):
            k, m, d = len(it.drafts), it.decoding.num_masks, it.decoding
            stochastic = not it.params.greedy
            row_params += [it.params] * (k + 1 + m)
            row_slot += [it.slot] * (k + 1 + m)
            if it.params.uses_penalties:
                for j in range(1, k + 1):
                    extra_rows += [base + j] * j
                    extra_toks += it.drafts[:j]
            p_index.append([base + j for j in range(k)] + [base + k] * (kmax + 1 - k))
            main_index.append([base + k + 1 + j for j in range(m)] + [0] * (mmax - m))
            n_test = min(k, d.num_verified, max(it.budget, 0))
            draft_tok.append(it.drafts + [0] * (kmax - k))
            valid.append([j < k for j in range(kmax)])
            tested.append([j < n_test for j in range(kmax)])

            def keys(first: int, n: int, stream: int, width: int) -> list[int]:
                return [row_key(it.seed, it.position + first + j, stream) if stochastic and j < n else 0
                        for j in range(width)]

            key_accept.append(keys(0, n_test, ACCEPT, kmax))
            next_keys.append(keys(0, k + 1, NEXT, kmax + 1))
            key_draft.append(keys(k + 1, m, DRAFT, mmax))
            greedy.append(not stochastic)
            alpha.append(1.0 if not stochastic else d.verify_alpha)
            fast.append(d.fast_verify)
            topk.append(min(d.fast_verify_topk, self.vocab_size))
            conf.append(d.confidence_accept_threshold if not d.fast_verify else 0.0)
            fix_argmax.append(d.fast_verify or d.confidence_accept_threshold > 0)
            argmax_draft.append(d.drafting == "argmax")
            k_of.append(k)
            m_of.append(m)
            if it.num_branches:
                branched.append(i)
                branch_base.append(hbase)
                key_branch.append([keys(j + 1, m, DRAFT, mmax) for j in range(it.num_branches)]
                                  + [[0] * mmax] * (kmax - it.num_branches))
                hbase += it.num_branches * m
            base += k + 1 + m
        if base != logits.shape[0]:
            raise ValueError(f"{logits.shape[0]} logit rows for items that need {base}")

        def t(values, dtype=torch.long):
            return torch.tensor(values, dtype=dtype, device=dev)

        def draw(dist: Tensor, keys: Tensor) -> Tensor:
            return dist.argmax(-1) if greedy_step else sample(dist, keys)

        # ---- distributions of every row --------------------------------------------------------
        seen, counts = self._history(row_slot, extra_rows, extra_toks, dev) if penalized else (None, None)
        probs = distribution(logits, RowSampling(row_params, dev, seen, counts))
        p_idx = t(p_index)  # [B, kmax + 1]
        key_next = t(next_keys)  # [B, kmax + 1] key of the next-token draw at each possible position
        arange_b = torch.arange(b, device=dev)
        k_t = t(k_of)

        # ---- verify the drafts ---------------------------------------------------------------------
        if kmax:
            x = t(draft_tok)  # [B, K]
            p_rows = probs[p_idx[:, :kmax]]  # [B, K, V]
            px = p_rows.gather(-1, x[..., None]).squeeze(-1)
            onehot_x = torch.zeros_like(p_rows).scatter_(-1, x[..., None], 1.0)
            if self.q is not None and not greedy_step:
                self._ensure_q(kmax)  # greedy requests' rows are never stored or read
                q_rows = self.q[t([it.slot for it in items])[:, None], torch.arange(kmax, device=dev)[None, :]]
                q_rows = torch.where(t(greedy, torch.bool)[:, None, None], onehot_x, q_rows)
            else:
                q_rows = onehot_x  # greedy: q is the one-hot of the draft
            qx = q_rows.gather(-1, x[..., None]).squeeze(-1)
            ratio = torch.where(qx > 0, px / qx.clamp_min(1e-30), torch.zeros_like(px))
            alpha_t = t(alpha, torch.float32)[:, None]
            r = torch.where(qx > 0, px / (alpha_t.clamp_min(1e-30) * qx.clamp_min(1e-30)), torch.zeros_like(px))
            u = uniforms(t(key_accept).reshape(-1), 1).reshape(b, kmax)
            accept = (r >= 1) | (u < r) | (alpha_t <= 0)
            if any(fast):
                raw_rows = logits[p_idx[:, :kmax]].float()
                kth = torch.topk(raw_rows, max(topk), dim=-1).values.gather(
                    -1, (t(topk) - 1)[:, None, None].expand(b, kmax, 1))
                accept = torch.where(t(fast, torch.bool)[:, None], (raw_rows.gather(-1, x[..., None]) >= kth)
                                     .squeeze(-1), accept)
            if any(c > 0 for c in conf):
                conf_t = t(conf, torch.float32)[:, None]
                accept = torch.where(conf_t > 0, px >= conf_t, accept)
            tested_t = t(tested, torch.bool)
            ok = (accept | ~tested_t) & t(valid, torch.bool)
            s = ok.long().cumprod(-1).sum(-1)  # leading accepted drafts
            rejected = s < k_t
            s_row = s.clamp(max=kmax - 1)
            p_s, q_s = p_rows[arange_b, s_row], q_rows[arange_b, s_row]
            argmax_fix = torch.zeros_like(p_s).scatter_(-1, p_s.argmax(-1, keepdim=True), 1.0)
            correction = torch.where(t(fix_argmax, torch.bool)[:, None], argmax_fix, residual_distribution(p_s, q_s))
            clean = probs[p_idx.gather(1, k_t[:, None]).squeeze(1)]
            token = draw(torch.where(rejected[:, None], correction, clean), key_next.gather(1, s[:, None]).squeeze(1))
            counted = tested_t & (torch.arange(kmax, device=dev)[None, :] <= s[:, None])
            ratio_sum = (ratio.clamp(max=1.0) * counted).sum(-1)
        else:
            s = torch.zeros(b, dtype=torch.long, device=dev)
            rejected = torch.zeros(b, dtype=torch.bool, device=dev)
            token = draw(probs[p_idx[:, -1]], key_next[:, 0])
            ratio_sum = torch.zeros(b, device=dev)

        # ---- new drafts: the main MASK rows, or after a rejection the branch at the rejected draft ------
        drafts = torch.zeros(b, mmax, dtype=torch.long, device=dev)
        use_branch = torch.zeros(b, dtype=torch.bool, device=dev)
        if mmax:
            q_new = probs[t(main_index)]  # [B, M, V]
            drafts = draw(q_new.reshape(b * mmax, -1), t(key_draft).reshape(-1)).reshape(b, mmax)
            if branched:
                q_new, drafts, use_branch = self._branch_drafts(
                    items, branched, branch_base, key_branch, s, rejected, q_new, drafts, branch_hidden, head, draw)
            drafts = torch.where(t(argmax_draft, torch.bool)[:, None], q_new.argmax(-1), drafts)
            store = [(it.slot, j, i) for i, it in enumerate(items) if not it.params.greedy
                     for j in range(it.decoding.num_masks)]
            if store:  # after verification read the old proposals
                slots, js, src = zip(*store)
                self._store_q(t(slots), t(js), q_new[t(src), t(js)], mmax)

        packed = torch.cat([s[:, None].double(), token[:, None].double(), ratio_sum[:, None].double(),
                            use_branch[:, None].double(), drafts.double()], dim=1).tolist()
        if self.drafter is not None:
            self._external_drafts(items, packed)
        out = []
        for it, row in zip(items, packed):
            k = len(it.drafts)
            acc, tok, from_branch = int(row[0]), int(row[1]), bool(row[3])
            rejected_py = acc < k
            n_test = min(k, it.decoding.num_verified, max(it.budget, 0))
            new = [int(v) for v in row[4 : 4 + it.decoding.num_masks]] if (not rejected_py or from_branch) else []
            out.append(DecodeResult(it.drafts[:acc] + [tok], rejected_py, new, acc + 1 if rejected_py else n_test,
                                    row[2], from_branch))
        return out

    def _branch_drafts(self, items, branched, branch_base, key_branch, s, rejected, q_new, drafts, branch_hidden,
                       head, draw):
        """For items rejected at draft j < num_branches: q and drafts from branch j's rows (head on those only)."""
        dev = q_new.device
        mmax = q_new.shape[1]
        bi = torch.tensor(branched, dtype=torch.long, device=dev)
        nb = torch.tensor([items[i].num_branches for i in branched], dtype=torch.long, device=dev)
        m = torch.tensor([items[i].decoding.num_masks for i in branched], dtype=torch.long, device=dev)
        j = s[bi].clamp(max=nb - 1)
        within = torch.arange(mmax, device=dev)[None, :]
        rows = torch.tensor(branch_base, device=dev)[:, None] + j[:, None] * m[:, None] + within.clamp(max=m[:, None] - 1)
        params = [items[i].params for i in branched for _ in range(mmax)]
        slots = [items[i].slot for i in branched for _ in range(mmax)]
        hist = self._history(slots, [], [], dev) if any(p.uses_penalties for p in params) else (None, None)
        q_b = distribution(head(branch_hidden[rows.reshape(-1)]), RowSampling(params, dev, *hist))
        keys = torch.tensor(key_branch, dtype=torch.long, device=dev)  # [B', K, M]
        d_b = draw(q_b, keys[torch.arange(len(branched), device=dev), j].reshape(-1)).reshape(len(branched), mmax)
        use = torch.zeros_like(rejected)
        use[bi] = rejected[bi] & (s[bi] < nb)
        q_new = q_new.index_copy(0, bi, torch.where(use[bi][:, None, None], q_b.reshape(len(branched), mmax, -1),
                                                    q_new[bi]))
        drafts = drafts.index_copy(0, bi, torch.where(use[bi][:, None], d_b, drafts[bi]))
        return q_new, drafts, use

    def _external_drafts(self, items: list[DecodeItem], packed: list[list[float]]) -> None:
        """Replace the model's new drafts by the drafter's (drafter(item, first_position, n) -> n tokens for
        positions first_position ...); their proposal is a one-hot (a deterministic draft)."""
        slots, js, toks = [], [], []
        for it, row in zip(items, packed):
            m, k, acc = it.decoding.num_masks, len(it.drafts), int(row[0])
            if not m or (acc < k and not row[3]):
                continue
            first = it.position + (k + 1 if acc == k else acc + 1)
            row[4 : 4 + m] = self.drafter(it, first, m)
            if not it.params.greedy:
                slots += [it.slot] * m
                js += range(m)
                toks += row[4 : 4 + m]
        if slots:
            q = torch.zeros(len(slots), self.vocab_size, device=self.device)
            q[torch.arange(len(slots)), torch.tensor([int(x) for x in toks], dtype=torch.long)] = 1.0
            self._store_q(self._index(slots), self._index(js), q, max(js) + 1)

    def _store_q(self, slots: Tensor, js: Tensor, q: Tensor, depth: int) -> None:
        self._ensure_q(depth)
        self.q[slots, js] = q

    def _ensure_q(self, depth: int) -> None:
        if self.q is None or self.q.shape[1] < depth:
            old = self.q
            self.q = torch.zeros(self.num_slots, depth, self.vocab_size, dtype=torch.float32, device=self.device)
            if old is not None:
                self.q[:, : old.shape[1]] = old
