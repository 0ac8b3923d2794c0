"""The round model against the measured rounds of the shipped adapter and against simulated rounds."""
from __future__ import annotations

import random

import pytest

from idlm.decoding.round_model import estimate


def test_reproduces_the_measured_default_layout():
    """Acceptance [0.39, 0.36, 0.35] at stride 4, no branches: TPF 1.297 with 48.7% cold forwards (measured)."""
    e = estimate([0.39, 0.36, 0.35], 4)
    assert e.tokens_per_forward == pytest.approx(1.297, abs=5e-4)
    assert e.cold_share == pytest.approx(0.487, abs=5e-4)
    assert e.rows_per_forward == pytest.approx(0.513 * 7 + 0.487 * 4, abs=5e-3)
    full = estimate([0.39, 0.36, 0.35], 4, branches=None)  # a branch at every draft: never cold
    assert full.cold_share == 0 and full.tokens_per_forward == pytest.approx(1.5795, abs=1e-4)
    assert full.rows_per_forward == 16


@pytest.mark.parametrize("acceptance, stride, branches", [([0.39, 0.36, 0.35], 4, 1), ([0.8], 3, 0),
                                                            ([0.6, 0.5, 0.4, 0.3, 0.3, 0.2, 0.2], 8, 2)])
def test_matches_simulated_rounds(acceptance, stride, branches):
    rng = random.Random(0)
    k = stride - 1
    a = [acceptance[min(j, len(acceptance) - 1)] for j in range(k)]
    tokens = forwards = cold = 0
    have_drafts = False
    for _ in range(200_000):
        forwards += 1
        if not have_drafts:
            tokens, cold, have_drafts = tokens + 1, cold + 1, True
            continue
        s = 0
        while s < k and rng.random() < a[s]:
            s += 1
        tokens += s + 1
        have_drafts = s == k or s < branches
    e = estimate(acceptance, stride, branches)
    assert e.tokens_per_forward == pytest.approx(tokens / forwards, rel=0.01)
    assert e.cold_share == pytest.approx(cold / forwards, abs=0.005)


def test_ar_and_bad_input():
    assert estimate([0.5], 1).tokens_per_forward == 1.0
    with pytest.raises(ValueError):
        estimate([1.5], 4)
