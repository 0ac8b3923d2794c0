"""The eval runner: decoding specs, the Wilson interval, and locating the first divergence of two outputs."""
from __future__ import annotations

from dataclasses import dataclass

import pytest

from idlm.decoding.decoder import TokenLogprob
from idlm.eval.runner import RunSpec, divergence, parse_runs, wilson_interval
from idlm.eval.tasks import EvalError


def test_parse_runs():
    runs = parse_runs("ar,risd,risd:stride=3,risd:fast_verify,risd:verify_alpha=0.8", stride=4)
    assert runs[0] == RunSpec("ar", "ar", None, {})
    assert runs[1] == RunSpec("risd", "risd", 4, {})
    assert runs[2] == RunSpec("risd:stride=3", "risd", 3, {})
    assert runs[3].options == {"fast_verify": True} and runs[4].options == {"verify_alpha": 0.8}
    with pytest.raises(EvalError, match="unknown decoding"):
        parse_runs("beam")
    with pytest.raises(EvalError, match="twice"):
        parse_runs("ar,ar")


def test_wilson_interval_matches_known_values():
    lo, hi = wilson_interval(50, 100)
    assert lo == pytest.approx(0.4038, abs=1e-4) and hi == pytest.approx(0.5962, abs=1e-4)
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(0, 10)[1] == pytest.approx(0.2775, abs=1e-4)
    assert wilson_interval(10, 10)[1] == 1.0


@dataclass
class Out:
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None


def test_divergence_near_tie_and_real_difference():
    same = Out([1, 2, 3], None)
    assert divergence(same, Out([1, 2, 3], None), 1e-3) is None
    tie_ref = Out([1, 2, 3], [TokenLogprob(-0.1, [(1, -0.1)])] * 2 + [TokenLogprob(-0.7, [(3, -0.7), (4, -0.7001)])])
    tie_run = Out([1, 2, 4], [TokenLogprob(-0.1, [(1, -0.1)])] * 2 + [TokenLogprob(-0.7, [(4, -0.7), (3, -0.7002)])])
    d = divergence(tie_ref, tie_run, 1e-3)
    assert d["position"] == 2 and d["near_tie"] and d["ref_gap"] == pytest.approx(1e-4)
    far_run = Out([1, 2, 4], [TokenLogprob(-0.1, [(1, -0.1)])] * 2 + [TokenLogprob(-2.0, [(3, -0.7), (4, -2.0)])])
    assert not divergence(tie_ref, far_run, 1e-3)["near_tie"]
    assert divergence(same, Out([1, 2], None), 1e-3) == {"position": 2, "kind": "length", "near_tie": False}
