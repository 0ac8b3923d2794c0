"""The round model: from acceptance by draft position to tokens per forward, cold share and rows per forward.

ISD rounds form a Markov chain. A verify round tests K = N - 1 drafts left to right; with a_j the acceptance
of draft j given the drafts before it were accepted, it accepts exactly s drafts with probability
P(s) = a_1...a_s (1 - a_{s+1}) (P(K) = a_1...a_K) and commits s + 1 tokens. After full acceptance, or a
rejection at a draft position that has a branch (s < B), the next round verifies again; otherwise it
starts cold: a cold round commits one token and drafts anew. So with p_cold = sum over B <= s < K of P(s),
the chain spends 1 / (1 + p_cold) of its rounds verifying, and

    TPF = (E[s + 1] + p_cold) / (1 + p_cold),   E[s + 1] = 1 + sum_j a_1...a_j.

Rows per round: verify 1 + K + M (1 + B) (anchor, drafts, main MASK block, branches), cold 1 + M, M = N - 1.
With the shipped adapter's acceptance [0.39, 0.36, 0.35] at N = 4 and no branches: TPF 1.297 with 48.7%
cold forwards, as measured; with a branch at every draft: TPF 1.58 and no cold rounds.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RoundEstimate:
    tokens_per_forward: float
    cold_share: float  # share of forwards that are cold rounds
    rows_per_forward: float
    verify_tokens: float  # E[tokens committed by a verify round]

    def speedup(self, verify_seconds: float, cold_seconds: float, ar_seconds: float) -> float:
        """Tokens per second over AR's, given the seconds of a verify round, a cold round and an AR step."""
        per_forward = (1 - self.cold_share) * verify_seconds + self.cold_share * cold_seconds
        return self.tokens_per_forward * ar_seconds / per_forward


def estimate(acceptance: list[float], stride: int, branches: int | None = 0) -> RoundEstimate:
    """Steady-state rounds of ISD at `stride` with conditional acceptance by draft position (missing positions
    repeat the last value); `branches` = B (None: one per draft position)."""
    k = stride - 1
    if k < 1:
        return RoundEstimate(1.0, 0.0, 1.0, 1.0)
    if not acceptance or any(not 0.0 <= a <= 1.0 for a in acceptance):
        raise ValueError(f"acceptance must be probabilities by draft position, got {acceptance!r}")
    a = [acceptance[min(j, len(acceptance) - 1)] for j in range(k)]
    b = k if branches is None else min(branches, k)
    reach = [1.0]  # reach[j] = P(s >= j) = a_1 ... a_j
    for aj in a:
        reach.append(reach[-1] * aj)
    p = [reach[j] * (1 - a[j]) for j in range(k)] + [reach[k]]  # P(s = j)
    p_cold = sum(p[b:k])
    verify_tokens = sum(reach)
    verify_share = 1.0 / (1.0 + p_cold)
    cold_share = p_cold / (1.0 + p_cold)
    rows_verify, rows_cold = 1 + k + k * (1 + b), 1 + k
    return RoundEstimate(
        tokens_per_forward=verify_share * verify_tokens + cold_share,
        cold_share=cold_share,
        rows_per_forward=verify_share * rows_verify + cold_share * rows_cold,
        verify_tokens=verify_tokens,
    )
