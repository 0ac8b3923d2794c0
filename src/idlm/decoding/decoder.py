"""One step of decoding for a whole batch: sample, verify drafts, draft anew, with a fixed number of tensor ops.

Each request of a step brings its logit rows, laid out as `StepPlan` asks (decoding/policy.py):

    [p_0 .. p_{K-1} | p_K | q_0 .. q_{M-1}]     K drafts to verify, M = N - 1 MASK rows (AR: K = M = 0)

p_j is the target distribution of draft j (conditioned on the drafts before it), p_K that of the next token,
q_m the proposal of new draft m. Drafts are tested left to right with min(1, p(x) / (alpha q(x))); the first
rejection at s takes the correction from normalize(max(0, p_s - q_s)) and drops the new drafts (the next step
starts cold, unless a branch drafted after that position); full acceptance takes the next token from p_K and
keeps the new drafts.

Alternatives (`tree` > 1): more candidates x_2..x_k for the first draft's position, drawn from q without
replacement (greedy: the next best of q). When the first draft x_1 is rejected they are tested in turn, each
against the residual of the one before: p_{i+1} = normalize(max(0, p_i - q_i)), q_{i+1} = q_i with x_i
removed and renormalised, accept x_i with min(1, p_i(x_i) / q_i(x_i)); if all are rejected the correction
comes from p_{k+1}. An accepted x_i commits x_i and a token from p after x_i (its own row); the next step
starts cold. p and q come from one
pipeline (`sampling.distribution`) with the request's parameters, and `exact` drafting draws x ~ q, so the
committed text is distributed exactly as AR sampling from the anchor model. Under greedy decoding p and q are
one-hots and the rule reduces to "accept while the draft is the argmax".

Every row of every request runs through the same ops; Python only lays out indices and the counter-based
random keys (one per draw, from (seed, position, stream)), and one `.tolist()` brings the step's results back.
Per-request tensors live here in per-slot buffers: the penalty history and the proposals q of pending drafts.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor

from idlm.decoding.policy import Decoding
from idlm.decoding.sampling import (RowSampling, SamplingParams, distribution, residual_distribution, row_key, sample,
                                   uniforms)
from idlm.models import panel

ACCEPT, NEXT, DRAFT, TREE, ALTERNATIVE = 1, 2, 3, 4, 5  # random streams


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
    num_branches: int = 0  # branches fed this step (each N - 1 MASK rows, hidden states given apart)
    alternatives: list[int] = field(default_factory=list)  # other candidates for drafts[0] (rows given apart)

    @property
    def num_rows(self) -> int:
        """Logit rows: p of each draft, the next token, q of each MASK row (alternatives, branches given apart)."""
        return len(self.drafts) + 1 + self.decoding.num_masks

    @property
    def num_tested(self) -> int:
        """Drafts this step tests: at most the decoding's verified count and the tokens the budget allows (the
        rest pass untested)."""
        return min(len(self.drafts), self.decoding.num_verified, max(self.budget, 0))

    @property
    def num_hidden(self) -> int:
        """Rows given as hidden states: the alternatives, then the branches."""
        return (len(self.alternatives) if self.drafts else 0) + self.num_branches * self.decoding.num_masks


# How a committed token came to be: an accepted draft (or tree alternative), a token drawn from the anchor's
# next-token distribution (AR, prefill, after full acceptance), or the correction drawn after a rejection.
DRAFTED, CLEAN, CORRECTION = "draft", "clean", "correction"


@dataclass
class TokenLogprob:
    """A committed token's log-probability under the anchor's raw distribution, and its most likely tokens."""

    logprob: float
    top: list[tuple[int, float]]


@dataclass
class DecodeResult:
    tokens: list[int]  # committed in order: the accepted drafts, then the next token or the correction
    rejected: bool  # a draft was rejected (the last token is its correction)
    drafts: list[int]  # new drafts (empty after a rejection and for AR)
    tested: int  # drafts actually tested
    ratio_sum: float  # sum over tested drafts of min(1, p(x) / q(x))
    branched: bool = False  # after a rejection, the new drafts came from the branch at the rejected draft
    alternatives: list[int] = field(default_factory=list)  # other candidates for the new drafts[0]
    tree_hit: bool = False  # the first draft was rejected and an alternative accepted (tokens: it, then next)
    kinds: list[str] = field(default_factory=list)  # DRAFTED / CLEAN / CORRECTION, one per token
    logprobs: list[TokenLogprob] | None = None  # one per token when the request asks (params.logprobs)

    @property
    def kept_drafts(self) -> int:
        """Fed drafts whose KV stays: the accepted ones (an accepted alternative's row is not in that run)."""
        return 0 if self.tree_hit else len(self.tokens) - 1


DRAFTS = 6  # first column of the new drafts in a step's packed results


@dataclass
class Tree:
    """The items of a step with alternatives to test: index, alternatives (padded), valid, first hidden row, keys."""

    items: list[int]
    tokens: list[list[int]]
    valid: list[list[bool]]
    base: list[int]
    keys: list[list[int]]


def draw_alternatives(q: Tensor, raw: Tensor, first: Tensor, greedy: Tensor, keys: Tensor, width: int):
    """`width` more candidates besides each row's first draft: drawn from q without the draft, without
    replacement (the leaders of one exponential race), or for greedy rows the next best of the raw logits.
    Returns (tokens [R, width], valid [R, width]); a candidate outside q's support is not valid."""
    e = -torch.log(uniforms(keys, q.shape[-1]))
    score = torch.where(greedy[:, None], torch.softmax(raw, -1), q / e).scatter(-1, first[:, None], 0.0)
    top = score.topk(width, dim=-1)
    return top.indices, top.values > 0


def _result(it: DecodeItem, acc: int, token: int, ratio_sum: float, new: list[int], alternatives: list[int] = (),
            from_branch: bool = False, tree_next: int | None = None) -> DecodeResult:
    """One request's step result from its accepted-draft count `acc`, the token after them (next token or
    correction), and the new drafts, which it keeps only after full acceptance or from a branch. tree_next:
    the token after an accepted alternative (`token`), which ends the step cold."""
    k = len(it.drafts)
    rejected = acc < k
    keep = tree_next is None and (not rejected or from_branch)
    if tree_next is not None:
        tokens, kinds = [token, tree_next], [DRAFTED, CLEAN]
    else:
        tokens, kinds = it.drafts[:acc] + [token], [DRAFTED] * acc + [CORRECTION if rejected else CLEAN]
    return DecodeResult(tokens, rejected, list(new) if keep else [], acc + 1 if rejected else it.num_tested, ratio_sum,
                        from_branch, list(alternatives) if keep and new else [], tree_next is not None, kinds)


def _argmax_only(it: DecodeItem) -> bool:
    """Whether a greedy request's step needs nothing but argmaxes (see Decoder._decode_argmax)."""
    return not it.decoding.fast_verify and not it.num_branches and it.decoding.tree <= 1


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

    def decode(self, items: list[DecodeItem], logits: Tensor, hidden: Tensor | None = None,
               head: Callable[[Tensor], Tensor] | None = None) -> list[DecodeResult]:
        """logits: [sum of item.num_rows, V], the items' rows in order. hidden: the hidden states of the items'
        alternative and branch rows (item.num_hidden each, in order); `head` turns the used ones into logits."""
        dev = logits.device
        b = len(items)
        kmax = max(len(it.drafts) for it in items)
        mmax = max(it.decoding.num_masks for it in items)
        wmax = max(it.decoding.tree for it in items) - 1 if mmax else 0  # alternatives to draft
        penalized = any(it.params.uses_penalties for it in items)
        greedy_step = all(it.params.greedy for it in items)
        need = sum(it.num_rows for it in items)
        if need != logits.shape[0]:
            raise ValueError(f"{logits.shape[0]} logit rows for items that need {need}")
        if greedy_step and not penalized and self.drafter is None and all(_argmax_only(it) for it in items):
            return self._decode_argmax(items, logits)
        # ---- layout (Python, integers) ------------------------------------------------------------
        row_params: list[SamplingParams] = []
        row_slot: list[int] = []
        extra_rows: list[int] = []  # penalty history a p row adds: the drafts before it
        extra_toks: list[int] = []
        p_index = []  # [B, kmax + 1] logit row of p_j (padded with p_K)
        main_index = []  # [B, mmax] logit row of each new draft's q (padded with row 0)
        draft_tok, valid, tested, key_accept, next_keys, key_draft, key_alt = [], [], [], [], [], [], []
        alpha, fast, topk, conf, fix_argmax, argmax_draft, greedy, k_of, m_of = [], [], [], [], [], [], [], [], []
        branched, branch_base, key_branch = [], [], []  # items with branches: index, first hidden row, keys
        tree = Tree([], [], [], [], [])  # items with alternatives to test
        amax = max((len(it.alternatives) for it in items if it.drafts), default=0)
        first_row: list[int] = []  # each item's first logit row (p_0)
        base = hbase = 0
        for i, it in enumerate(items):
            k, m, d = len(it.drafts), it.decoding.num_masks, it.decoding
            first_row.append(base)
            stochastic = not it.params.greedy
            row_params += [it.params] * (k + 1 + m)
            row_slot += [it.slot] * (k + 1 + m)
            if it.params.uses_penalties:
                for j in range(1, k + 1):
                    extra_rows += [base + j] * j
                    extra_toks += it.drafts[:j]
            p_index.append([base + j for j in range(k)] + [base + k] * (kmax + 1 - k))
            main_index.append([base + k + 1 + j for j in range(m)] + [0] * (mmax - m))
            n_test = it.num_tested
            draft_tok.append(it.drafts + [0] * (kmax - k))
            valid.append([j < k for j in range(kmax)])
            tested.append([j < n_test for j in range(kmax)])

            def keys(first: int, n: int, stream: int, width: int) -> list[int]:
                return [row_key(it.seed, it.position + first + j, stream) if stochastic and j < n else 0
                        for j in range(width)]

            key_accept.append(keys(0, n_test, ACCEPT, kmax))
            next_keys.append(keys(0, k + 1, NEXT, kmax + 1))
            key_draft.append(keys(k + 1, m, DRAFT, mmax))
            key_alt.append(keys(k + 1, 1, ALTERNATIVE, 1)[0])
            greedy.append(not stochastic)
            alpha.append(1.0 if not stochastic else d.verify_alpha)
            fast.append(d.fast_verify)
            topk.append(min(d.fast_verify_topk, self.vocab_size))
            conf.append(d.confidence_accept_threshold if not d.fast_verify else 0.0)
            fix_argmax.append(d.fast_verify or d.confidence_accept_threshold > 0)
            argmax_draft.append(d.drafting == "argmax")
            k_of.append(k)
            m_of.append(m)
            a = len(it.alternatives) if k else 0
            if a:
                tree.items.append(i)
                tree.tokens.append(it.alternatives + [0] * (amax - a))
                tree.valid.append([j < a for j in range(amax)])
                tree.base.append(hbase)
                tree.keys.append(keys(1, a, TREE, amax))
            if it.num_branches:
                branched.append(i)
                branch_base.append(hbase + a)
                key_branch.append([keys(j + 1, m, DRAFT, mmax) + keys(j + 1, 1, ALTERNATIVE, 1)
                                   for j in range(it.num_branches)] + [[0] * (mmax + 1)] * (kmax - it.num_branches))
            hbase += a + it.num_branches * m
            base += k + 1 + m

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
        greedy_t = t(greedy, torch.bool)
        hit = torch.zeros(b, dtype=torch.bool, device=dev)  # an alternative was accepted
        hit_token = hit_next = torch.zeros(b, dtype=torch.long, device=dev)  # it, and the token after it
        after_logits = None  # [len(tree.items), V] the raw logits hit_next was drawn from

        # ---- verify the drafts ---------------------------------------------------------------------
        if kmax:
            x = t(draft_tok)  # [B, K]
            p_rows = probs[p_idx[:, :kmax]]  # [B, K, V]
            px = p_rows.gather(-1, x[..., None]).squeeze(-1)
            onehot_x = torch.zeros_like(p_rows).scatter_(-1, x[..., None], 1.0)
            if self.q is not None and not greedy_step:
                self._ensure_q(kmax)  # greedy requests' rows are never stored or read
                q_rows = self.q[t([it.slot for it in items])[:, None], torch.arange(kmax, device=dev)[None, :]]
                q_rows = torch.where(greedy_t[:, None, None], onehot_x, q_rows)
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
            if tree.items:
                first_rejected = rejected & (s == 0) & tested_t[:, 0]
                correction, hit, hit_token, hit_next, after_logits = self._tree(
                    items, tree, p_rows, q_rows, x, first_rejected, correction, key_next, greedy_t, hidden, head, draw)
            clean = probs[p_idx.gather(1, k_t[:, None]).squeeze(1)]
            token = draw(torch.where(rejected[:, None], correction, clean), key_next.gather(1, s[:, None]).squeeze(1))
            token = torch.where(hit, hit_token, token)
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
        alternatives = torch.zeros(b, wmax, dtype=torch.long, device=dev)
        alternative_ok = torch.zeros(b, wmax, dtype=torch.bool, device=dev)
        if mmax:
            main_t = t(main_index)
            q_new = probs[main_t]  # [B, M, V]
            drafts = draw(q_new.reshape(b * mmax, -1), t(key_draft).reshape(-1)).reshape(b, mmax)
            raw_first, alt_keys = logits[main_t[:, 0]].float(), t(key_alt)
            if branched:
                q_new, drafts, use_branch, raw_first, alt_keys = self._branch_drafts(
                    items, branched, branch_base, key_branch, s, rejected & ~hit, q_new, drafts, raw_first, alt_keys,
                    hidden, head, draw)
            drafts = torch.where(t(argmax_draft, torch.bool)[:, None], q_new.argmax(-1), drafts)
            if wmax:
                alternatives, alternative_ok = draw_alternatives(q_new[:, 0], raw_first, drafts[:, 0], greedy_t,
                                                                 alt_keys, wmax)
            store = [(it.slot, j, i) for i, it in enumerate(items) if not it.params.greedy
                     for j in range(it.decoding.num_masks)]
            if store:  # after verification read the old proposals
                slots, js, src = zip(*store)
                self._store_q(t(slots), t(js), q_new[t(src), t(js)], mmax)

        packed = torch.cat([s[:, None].double(), token[:, None].double(), ratio_sum[:, None].double(),
                            use_branch[:, None].double(), hit[:, None].double(), hit_next[:, None].double(),
                            drafts.double(), alternatives.double(), alternative_ok.double()], dim=1).tolist()
        if self.drafter is not None:
            self._external_drafts(items, packed, mmax, wmax)
        out = []
        for it, row in zip(items, packed):
            m = it.decoding.num_masks
            alts, oks = row[DRAFTS + mmax : DRAFTS + mmax + wmax], row[DRAFTS + mmax + wmax :]
            out.append(_result(it, int(row[0]), int(row[1]), row[2], [int(v) for v in row[DRAFTS : DRAFTS + m]],
                               [int(alts[j]) for j in range(it.decoding.tree - 1) if oks[j]], bool(row[3]),
                               int(row[5]) if row[4] else None))
        if any(it.params.logprobs is not None for it in items):
            self._logprobs(items, out, first_row, logits, tree, after_logits)
        return out

    def _decode_argmax(self, items: list[DecodeItem], logits: Tensor) -> list[DecodeResult]:
        """`decode` for a greedy step with nothing but drafts to verify and MASK rows to draft (no penalties,
        alternatives, branches or top-k acceptance): p and q are one-hots, so a draft is accepted while it is
        its row's argmax, the next token or correction is the argmax of the row after the accepted run, and
        the new drafts are their rows' argmaxes. One argmax over all rows; the rest is integers."""
        top = panel.argmax(logits).tolist()
        out, first_row, base = [], [], 0
        for it in items:
            k, m = len(it.drafts), it.decoding.num_masks
            n_test = it.num_tested
            acc = 0  # untested drafts (beyond num_verified or the budget) pass, as in `decode`
            while acc < k and (acc >= n_test or it.drafts[acc] == top[base + acc]):
                acc += 1
            out.append(_result(it, acc, top[base + acc], float(min(acc, n_test)), top[base + k + 1 : base + k + 1 + m]))
            first_row.append(base)
            base += k + 1 + m
        if any(it.params.logprobs is not None for it in items):
            self._logprobs(items, out, first_row, logits, Tree([], [], [], [], []), None)
        return out

    @staticmethod
    def _logprobs(items: list[DecodeItem], out: list[DecodeResult], first_row: list[int], logits: Tensor,
                  tree: Tree, after_logits: Tensor | None) -> None:
        """Each committed token's log-softmax under the raw logits of the row that verified or drew it (a draft
        accepted at j: p_j; the last token: p at its position; after an accepted alternative: that row's p)."""
        rows: list[Tensor] = []
        toks: list[int] = []
        owners: list[int] = []
        width = 0
        for i, (it, res) in enumerate(zip(items, out)):
            if it.params.logprobs is None:
                continue
            width = max(width, it.params.logprobs)
            if res.tree_hit:
                rows += [logits[first_row[i]], after_logits[tree.items.index(i)]]
            else:
                rows.append(logits[first_row[i] : first_row[i] + len(res.tokens)])
            toks += res.tokens
            owners += [i] * len(res.tokens)
        lp = torch.log_softmax(torch.cat([r.reshape(-1, logits.shape[-1]) for r in rows]).float(), -1)
        chosen = lp.gather(-1, torch.tensor(toks, dtype=torch.long, device=lp.device)[:, None]).squeeze(-1)
        top = lp.topk(width, dim=-1) if width else None
        chosen_l = chosen.tolist()
        top_v, top_i = (top.values.tolist(), top.indices.tolist()) if top is not None else ([], [])
        for n, i in enumerate(owners):
            res, k = out[i], items[i].params.logprobs
            if res.logprobs is None:
                res.logprobs = []
            res.logprobs.append(TokenLogprob(chosen_l[n], list(zip(top_i[n][:k], top_v[n][:k])) if k else []))

    def _tree(self, items, tree, p_rows, q_rows, x, first_rejected, correction, key_next, greedy_t, hidden, head,
              draw):
        """The alternatives of items whose first draft was rejected, tested in turn against the residuals (see
        the module doc). Returns the corrections (p_{k+1} where all were rejected), which items accepted one,
        that alternative, the token after it (from its own row's p) and that row's raw logits."""
        dev = p_rows.device
        ti = torch.tensor(tree.items, dtype=torch.long, device=dev)
        alts = torch.tensor(tree.tokens, dtype=torch.long, device=dev)  # [T, A]
        live_t = torch.tensor(tree.valid, dtype=torch.bool, device=dev) & first_rejected[ti, None]
        u = uniforms(torch.tensor(tree.keys, dtype=torch.long, device=dev).reshape(-1), 1).reshape(alts.shape)
        p, q, prev = p_rows[ti, 0], q_rows[ti, 0], x[ti, 0]
        target, greedy = p.argmax(-1), greedy_t[ti]
        hit = torch.zeros(len(tree.items), dtype=torch.bool, device=dev)
        pick = torch.zeros(len(tree.items), dtype=torch.long, device=dev)
        for a in range(alts.shape[1]):
            live = live_t[:, a] & ~hit
            xa = alts[:, a]
            p_next = residual_distribution(p, q)
            q_next = q.scatter(-1, prev[:, None], 0.0)
            q_next = q_next / q_next.sum(-1, keepdim=True).clamp_min(1e-30)
            px, qx = p_next.gather(-1, xa[:, None]).squeeze(-1), q_next.gather(-1, xa[:, None]).squeeze(-1)
            accept = live & torch.where(greedy, xa == target, (qx > 0) & (u[:, a] * qx < px))
            pick = torch.where(accept, a, pick)
            hit = hit | accept
            p = torch.where(live[:, None], p_next, p)
            q = torch.where(live[:, None], q_next, q)
            prev = torch.where(live, xa, prev)
        final = torch.where(first_rejected[ti, None], residual_distribution(p, q), correction[ti])
        correction = correction.index_copy(0, ti, final)
        # the token after the accepted alternative, from p at its row (penalties: its history plus it)
        chosen = alts.gather(1, pick[:, None]).squeeze(1)
        rows = torch.tensor(tree.base, dtype=torch.long, device=dev) + pick
        params = [items[i].params for i in tree.items]
        hist = (None, None)
        if any(pr.uses_penalties for pr in params):
            seen, counts = self._history([items[i].slot for i in tree.items], [], [], dev)
            n = torch.arange(len(tree.items), device=dev)
            counts.index_put_((n, chosen), torch.ones(len(tree.items), device=dev), accumulate=True)
            seen[n, chosen] = True
            hist = (seen, counts)
        after_logits = head(hidden[rows])
        after = draw(distribution(after_logits, RowSampling(params, dev, *hist)), key_next[ti, 1])
        b = x.shape[0]
        zeros = torch.zeros(b, dtype=torch.long, device=dev)
        return (correction, torch.zeros(b, dtype=torch.bool, device=dev).index_copy(0, ti, hit),
                zeros.index_copy(0, ti, chosen), zeros.index_copy(0, ti, after), after_logits)

    def _branch_drafts(self, items, branched, branch_base, key_branch, s, rejected, q_new, drafts, raw_first,
                       alt_keys, hidden, head, draw):
        """For items rejected at draft j < num_branches: q, drafts, the first row's logits and the alternatives'
        key from branch j's rows (head on those only)."""
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
        raw_b = head(hidden[rows.reshape(-1)]).float()
        q_b = distribution(raw_b, RowSampling(params, dev, *hist))
        keys = torch.tensor(key_branch, dtype=torch.long, device=dev)[torch.arange(len(branched), device=dev), j]
        d_b = draw(q_b, keys[:, :mmax].reshape(-1)).reshape(len(branched), mmax)
        use = torch.zeros_like(rejected)
        use[bi] = rejected[bi] & (s[bi] < nb)
        u = use[bi]
        q_new = q_new.index_copy(0, bi, torch.where(u[:, None, None], q_b.reshape(len(branched), mmax, -1), q_new[bi]))
        drafts = drafts.index_copy(0, bi, torch.where(u[:, None], d_b, drafts[bi]))
        raw_first = raw_first.index_copy(0, bi, torch.where(u[:, None], raw_b.reshape(len(branched), mmax, -1)[:, 0],
                                                            raw_first[bi]))
        alt_keys = alt_keys.index_copy(0, bi, torch.where(u, keys[:, mmax], alt_keys[bi]))
        return q_new, drafts, use, raw_first, alt_keys

    def _external_drafts(self, items: list[DecodeItem], packed: list[list[float]], mmax: int, wmax: int) -> None:
        """Replace the model's new drafts by the drafter's (drafter(item, first_position, n) -> n tokens for
        positions first_position ...); their proposal is a one-hot (a deterministic draft, no alternatives)."""
        slots, js, toks = [], [], []
        for it, row in zip(items, packed):
            m, k, acc = it.decoding.num_masks, len(it.drafts), int(row[0])
            if not m or (acc < k and not row[3]) or row[4]:
                continue
            first = it.position + (k + 1 if acc == k else acc + 1)
            row[DRAFTS : DRAFTS + m] = self.drafter(it, first, m)
            row[DRAFTS + mmax + wmax :] = [0.0] * wmax
            if not it.params.greedy:
                slots += [it.slot] * m
                js += range(m)
                toks += row[DRAFTS : DRAFTS + m]
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
