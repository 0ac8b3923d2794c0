"""Introspective Strided Decoding (ISD) and its lossless variant R-ISD.

Every step of a sequence feeds one block, causally, after its cached prefix:

    [c committed-but-uncached tokens | K drafts to verify | N-1 MASK]

- c = the whole prompt on the first step (prefill and cold start fused in one forward), else 1: the
  `pending` token (emitted last step) or, after a rejection, the correction token;
- K = N-1 drafts of the previous step (verify round) or 0 (cold round);
- logit shift: row i predicts the token at i+1. Rows c-1 .. c-2+K give the anchor p of each draft,
  row c-1+K the next clean token, the MASK rows the N-1 new drafts and their proposal q.

Drafts are accepted left to right with min(1, p(x) / (alpha q(x))); the first rejection emits a token
from normalize(max(0, p - q)) and drops the rest (next step is a cold start); full acceptance also
emits the clean token. p and q come from the same sampling pipeline with the request's parameters, and
in `exact` drafting x ~ q, so committed text is distributed exactly as AR sampling from the anchor model.

Only KV of committed tokens is ever kept: MASK rows and rejected drafts are rolled back every step.
R-ISD (`lora="gated"`): the adapter acts on the MASK rows only, so every kept KV entry and every p is the
base model's, and greedy output equals the base model's greedy AR output token for token.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from idlm.decoding.policy import StepPlan
from idlm.decoding.sampling import distribution, residual_distribution, sample
from idlm.engine.sequence import Sequence

LORA_MODES = ("none", "all", "gated")
DRAFTING_MODES = ("exact", "argmax")


@dataclass
class ISDState:
    """Per-sequence ISD state. `anchor` tokens are committed (emitted) but not in the KV cache yet."""

    anchor: list[int] = field(default_factory=list)
    drafts: list[int] = field(default_factory=list)
    q: torch.Tensor | None = None  # [K, V] proposal each draft was drawn from


def accept_or_resample(
    p: torch.Tensor, q: torch.Tensor, x: int, alpha: float, generator: torch.Generator
) -> tuple[bool, int | None]:
    """Speculative rule: accept x ~ q with min(1, p(x) / (alpha q(x))); else draw from normalize(max(0, p - q)).

    With alpha = 1 and x drawn from q, the token this returns (x if accepted, else the draw) is distributed as p.
    """
    qx = float(q[x])
    r = float(p[x]) / (alpha * qx) if qx > 0 else 0.0
    if r >= 1.0 or float(torch.rand((), generator=generator, device=p.device)) < r:
        return True, None
    return False, int(sample(residual_distribution(p, q)[None], generator)[0])


class ISDDecoding:
    """Stride-N ISD policy (N = tokens a verify round can commit)."""

    def __init__(
        self,
        stride: int,
        mask_token_id: int,
        lora: str = "none",
        drafting: str = "exact",
        verify_alpha: float = 1.0,
        fast_verify: bool = False,
        fast_verify_topk: int = 5,
        confidence_accept_threshold: float = 0.0,
        verify_num_specs: int | None = None,
    ):
        if not 2 <= stride <= 16:
            raise ValueError(f"stride must be between 2 and 16, got {stride}")
        if lora not in LORA_MODES:
            raise ValueError(f"lora must be one of {LORA_MODES}, got {lora!r}")
        if drafting not in DRAFTING_MODES:
            raise ValueError(f"drafting must be one of {DRAFTING_MODES}, got {drafting!r}")
        if fast_verify_topk < 1:
            raise ValueError("fast_verify_topk must be >= 1")
        if not 0.0 <= confidence_accept_threshold <= 1.0:
            raise ValueError("confidence_accept_threshold must be in [0, 1]")
        self.name = "risd" if lora == "gated" else "isd"
        self.stride = stride
        self.mask_token_id = mask_token_id
        self.lora = lora
        self.drafting = drafting
        self.verify_alpha = verify_alpha
        self.fast_verify = fast_verify
        self.fast_verify_topk = fast_verify_topk
        self.confidence_accept_threshold = confidence_accept_threshold
        k = stride - 1 if verify_num_specs is None else verify_num_specs
        self.verify_num_specs = max(0, min(stride - 1, k))

    # ---- plan ---------------------------------------------------------------------------------
    def _state(self, seq: Sequence) -> ISDState:
        if seq.decoding_state is None:
            seq.decoding_state = ISDState(anchor=seq.all_ids[seq.kv.num_tokens :])
        return seq.decoding_state

    def plan(self, seq: Sequence) -> StepPlan:
        st = self._state(seq)
        c, k, m = len(st.anchor), len(st.drafts), self.stride - 1
        tokens = st.anchor + st.drafts + [self.mask_token_id] * m
        gate = [0.0] * (c + k) + [1.0] * m if self.lora == "gated" else None
        return StepPlan(token_ids=tokens, logit_rows=list(range(c - 1, c + k + m)), lora_gate=gate)

    # ---- commit -------------------------------------------------------------------------------
    def commit(self, seq: Sequence, plan: StepPlan, logits: torch.Tensor) -> None:
        """logits rows: [p for each draft (K), clean (1), MASK drafts (N-1)]."""
        st = self._state(seq)
        c, k, m = len(st.anchor), len(st.drafts), self.stride - 1
        params = seq.params
        # anchors of the drafts and the clean row, each conditioned on the drafts before it
        extra = [st.drafts[:j] for j in range(k + 1)]
        p = distribution(logits[: k + 1], params, seq.penalties, extra)
        rejected_at, correction = self._verify(seq, st, logits[:k], p[:k])
        if rejected_at is not None:
            accepted = st.drafts[:rejected_at]
            seq.stats.rounds["R"] += 1
            seq.emit(accepted + [correction])
            if not seq.finished:
                seq.kv.truncate(len(plan.token_ids) - (c + rejected_at))
                seq.decoding_state = ISDState(anchor=[correction])
            return
        seq.stats.rounds["V" if k else "C"] += 1
        clean = int(sample(p[k : k + 1], seq.generator)[0])
        seq.emit(st.drafts + [clean])
        if seq.finished:
            return
        seq.kv.truncate(m)  # MASK rows never stay
        drafts, q = self.draft(seq, logits[k + 1 :])
        seq.decoding_state = ISDState(anchor=[clean], drafts=drafts, q=q)

    def draft(self, seq: Sequence, mask_logits: torch.Tensor) -> tuple[list[int], torch.Tensor]:
        """New drafts from the MASK rows and the proposal q each was drawn from."""
        q = distribution(mask_logits, seq.params, seq.penalties, [[]] * mask_logits.shape[0])
        if self.drafting == "argmax" or seq.params.greedy:
            return [int(x) for x in q.argmax(-1)], q
        return [int(x) for x in sample(q, seq.generator)], q

    def _verify(
        self, seq: Sequence, st: ISDState, rows: torch.Tensor, p: torch.Tensor
    ) -> tuple[int | None, int | None]:
        """Test drafts left to right; returns (first rejected index, correction token) or (None, None)."""
        budget = seq.params.max_tokens - len(seq.output_ids)  # drafts past it can never be emitted
        for j, x in enumerate(st.drafts):
            if j >= self.verify_num_specs or j >= budget:
                break  # drafts past verify_num_specs are accepted untested
            pj, qj = p[j], st.q[j]
            ratio = float(pj[x] / qj[x]) if qj[x] > 0 else 0.0
            if self.fast_verify:
                kth = torch.topk(rows[j], min(self.fast_verify_topk, rows.shape[-1])).values[-1]
                ok, fix = bool(rows[j, x] >= kth), int(pj.argmax())
            elif self.confidence_accept_threshold > 0:
                ok, fix = float(pj[x]) >= self.confidence_accept_threshold, int(pj.argmax())
            elif seq.params.greedy:
                ok, fix = x == int(pj.argmax()), int(pj.argmax())
            elif self.verify_alpha <= 0:
                ok, fix = True, None
            else:
                ok, fix = accept_or_resample(pj, qj, x, self.verify_alpha, seq.generator)
            seq.stats.record_test(j, ok, ratio)
            if not ok:
                return j, fix
        return None, None
