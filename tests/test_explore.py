"""The explorer: the step fit recovers known costs, and `idlm explore --quick` runs end to end on a tiny model,
writing its JSON, markdown and plots."""
from __future__ import annotations

import argparse
import json

import pytest

from idlm.decoding.policy import Decoding
from idlm.engine.cost_model import CostModel, StepFit


def test_step_fit_recovers_known_costs():
    """Synthetic step times from known coefficients (with 1% multiplicative noise) over the layouts the cost
    model measures: the fit gets every coefficient back and predicts an unmeasured layout."""
    import random

    truth = StepFit(fixed=0.030, per_seq=0.0004, per_row=0.0025, per_gated=0.0008, per_logit=0.0006)
    rng = random.Random(0)
    seconds = {}
    for d in [Decoding()] + [Decoding("risd", n, "gated", branches=b) for n in (2, 3, 4) for b in (0, None)]:
        for plan in d.layouts(99).values():
            name = CostModel.layout_name(plan)
            rows, gated, logits = len(plan.token_ids), sum(plan.lora_gate), plan.num_logits
            seconds[name] = {b: truth.seconds(b, rows, gated, logits) * (1 + rng.uniform(-0.01, 0.01))
                             for b in (1, 4, 16, 64)}
    fit = CostModel({}, seconds).fit()
    for name in ("fixed", "per_seq", "per_row", "per_gated", "per_logit"):
        assert getattr(fit, name) == pytest.approx(getattr(truth, name), rel=0.15, abs=2e-5), name
    assert fit.boundary_rows == pytest.approx(12.0, rel=0.1)
    unmeasured = Decoding("risd", 8, "gated", branches=None).layouts(99)["verify"]
    cm = CostModel({}, seconds)
    expected = truth.seconds(8, len(unmeasured.token_ids), sum(unmeasured.lora_gate), unmeasured.num_logits)
    assert cm.time(unmeasured, 8) == pytest.approx(expected, rel=0.03)
    with pytest.raises(ValueError, match="at least 5"):
        StepFit.fit([(1, 1, 0, 1, 0.01)])


def test_explore_quick_on_a_tiny_model(tokenizer, tmp_path):
    from idlm import LLM
    from idlm.bench.explore import run_explore

    from conftest import tiny_model

    llm = LLM.from_model(tiny_model(), tokenizer, [tokenizer.eos_token_id], kv_cache_tokens=8192, max_num_seqs=16)
    args = argparse.Namespace(strides="2,4", batches="1,2,4", measure_batches="1,4", max_rows=64, repeats=1,
                              quick=True, validate=True, acceptance="0.5,0.4,0.3", out=str(tmp_path),
                              validate_prompts=2, validate_repeats=1, max_tokens=6)
    result = run_explore(args, llm=llm)
    written = json.loads(next(tmp_path.glob("explore-*.json")).read_text())
    assert written["acceptance"] == [0.5, 0.4, 0.3] and written["machine"]["cpu_capability"]
    labels = {p["decoding"] for p in result["predictions"]}
    assert labels == {"isd2", "isd2+b1", "isd4", "isd4+b3"}
    e4 = next(p for p in result["predictions"] if p["decoding"] == "isd4" and p["batch"] == 1)
    assert e4["tokens_per_forward"] == pytest.approx((1.76 + 0.94) / 1.94, abs=1e-3)  # round model, by hand
    assert all(p["speedup"] > 0 for p in result["predictions"])
    assert len(result["regime"]["relative_step_time"]) == len(result["regime"]["rows_per_sequence"])
    assert {p.name.rsplit("-", 1)[-1] for p in tmp_path.glob("explore-*.png")} == {"speedup.png", "regime.png"}
    assert "| isd4+b3 |" in next(tmp_path.glob("explore-*.md")).read_text()
    # validation: measured ratios for strides 3 and 4 at batch 1, 4, 16 (stride 3 is not in the quick grid)
    v = result["validation"]
    assert {(x["stride"], x["branches"], x["batch"]) for x in v} == {
        (n, b, batch) for n in (3, 4) for b in (0, "all") for batch in (1, 4, 16)}
    assert all(x["measured"] > 0 and "predicted_at_run_acceptance" in x for x in v)
    assert all("error" in x for x in v if x["stride"] == 4 and x["batch"] in (1, 4))
