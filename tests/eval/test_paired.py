"""Paired bootstrap of two runs' per-prompt acceptance records (eval/paired.py)."""
from __future__ import annotations

import pytest

from idlm.eval.paired import paired_bootstrap


def rec(generated: int, forwards: int, proposed: list[int], accepted: list[int]) -> dict:
    return {"generated_tokens": generated, "forwards": forwards, "proposed_by_position": proposed,
            "accepted_by_position": accepted}


def test_identical_runs_differ_by_nothing():
    runs = [rec(64, 50, [40, 10], [12, 3]), rec(64, 40, [30, 12], [20, 6]), rec(10, 10, [5], [0])]
    c = paired_bootstrap(runs, runs, resamples=500)
    assert c["tokens_per_forward"]["difference"] == 0 and c["tokens_per_forward"]["ci95"] == [0, 0]
    assert c["tokens_per_forward"]["candidate_better"] == 0
    assert [s["difference"] for s in c["acceptance_by_position"]] == [0, 0]


def test_figures_are_ratios_of_sums_and_a_uniform_gain_is_certain():
    base = [rec(60, 60, [10, 5], [2, 1]), rec(40, 20, [30, 0], [15, 0])]
    cand = [rec(60, 50, [10, 5], [5, 1]), rec(40, 16, [30, 0], [18, 0])]
    c = paired_bootstrap(base, cand, resamples=2000, seed=1)
    t = c["tokens_per_forward"]
    assert t["baseline"] == pytest.approx(100 / 80, abs=1e-4)  # not the mean of 1.0 and 2.0
    assert t["candidate"] == pytest.approx(100 / 66, abs=1e-4)
    assert t["ci95"][0] > 0 and t["candidate_better"] == 1.0  # better on every prompt: every resample agrees
    first, second = c["acceptance_by_position"]
    assert first["baseline"] == pytest.approx(17 / 40, abs=1e-4) and first["candidate"] == pytest.approx(23 / 40, abs=1e-4)
    assert second["baseline"] == second["candidate"] == pytest.approx(1 / 5, abs=1e-4)


def test_a_mixed_result_straddles_zero():
    base = [rec(10, 10, [4], [1]), rec(10, 5, [4], [3])] * 10
    cand = [rec(10, 5, [4], [3]), rec(10, 10, [4], [1])] * 10  # the same prompts, swapped luck
    c = paired_bootstrap(base, cand, resamples=4000)
    lo, hi = c["tokens_per_forward"]["ci95"]
    assert c["tokens_per_forward"]["difference"] == 0 and lo < 0 < hi
    assert 0.2 < c["tokens_per_forward"]["candidate_better"] < 0.8


def test_runs_over_different_prompts_are_refused():
    with pytest.raises(ValueError, match="same prompts"):
        paired_bootstrap([rec(1, 1, [], [])], [rec(1, 1, [], [])] * 2)
