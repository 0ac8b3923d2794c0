"""Paired bootstrap over prompts: does one adapter accept more than another on the same prompts?

Both runs decode the same prompts; a prompt is the unit that is resampled (its tokens are not independent).
Each resample draws n prompt indices with replacement and recomputes, for both runs on those same prompts,
TPF = sum(generated) / sum(forwards) and the acceptance at draft position j = sum(accepted_j) / sum(tested_j)
(ratios of sums, as the aggregate figures are). Reported: both runs' figures on all prompts, the difference
(candidate - baseline), its 95% percentile interval and the share of resamples where the candidate is better.
"""
from __future__ import annotations

from typing import Any

import numpy as np


def per_prompt_columns(records: list[dict[str, Any]], positions: int) -> dict[str, np.ndarray]:
    def padded(name: str) -> np.ndarray:  # [prompts, positions]: positions a prompt never reached count 0
        return np.array([list(r[name]) + [0] * (positions - len(r[name])) for r in records], dtype=np.float64)

    return {
        "generated": np.array([r["generated_tokens"] for r in records], dtype=np.float64),
        "forwards": np.array([r["forwards"] for r in records], dtype=np.float64),
        "accepted": padded("accepted_by_position"),
        "tested": padded("proposed_by_position"),
    }


def ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    return np.divide(num, den, out=np.zeros_like(num), where=den > 0)


def _summary(base: float, cand: float, diffs: np.ndarray) -> dict[str, Any]:
    lo, hi = np.percentile(diffs, [2.5, 97.5])
    return {"baseline": round(base, 4), "candidate": round(cand, 4), "difference": round(cand - base, 4),
            "ci95": [round(float(lo), 4), round(float(hi), 4)],
            "candidate_better": round(float(np.mean(diffs > 0)), 4)}


def paired_bootstrap(baseline: list[dict[str, Any]], candidate: list[dict[str, Any]], resamples: int = 10000,
                     seed: int = 0) -> dict[str, Any]:
    """Compare two runs' per-prompt records (same prompts, same order): TPF and acceptance by draft position."""
    if len(baseline) != len(candidate) or not baseline:
        raise ValueError(f"paired bootstrap needs the same prompts in both runs ({len(baseline)} vs {len(candidate)})")
    positions = max(len(r["proposed_by_position"]) for r in baseline + candidate)
    a, b = per_prompt_columns(baseline, positions), per_prompt_columns(candidate, positions)
    idx = np.random.default_rng(seed).integers(0, len(baseline), size=(resamples, len(baseline)))

    def tpf(c: dict[str, np.ndarray], rows: Any) -> np.ndarray:
        return ratio(c["generated"][rows].sum(-1), c["forwards"][rows].sum(-1))

    def acceptance(c: dict[str, np.ndarray], rows: Any) -> np.ndarray:
        return ratio(c["accepted"][rows].sum(-2), c["tested"][rows].sum(-2))

    every = np.arange(len(baseline))
    tpf_diffs = tpf(b, idx) - tpf(a, idx)
    acc_diffs = acceptance(b, idx) - acceptance(a, idx)  # [resamples, positions]
    acc_a, acc_b = acceptance(a, every), acceptance(b, every)
    return {
        "prompts": len(baseline),
        "resamples": resamples,
        "tokens_per_forward": _summary(float(tpf(a, every)), float(tpf(b, every)), tpf_diffs),
        "acceptance_by_position": [_summary(float(acc_a[j]), float(acc_b[j]), acc_diffs[:, j])
                                   for j in range(positions)],
    }
