"""bench/placement.py: the probe, and runs grouped by the placement their probes agree on."""
from __future__ import annotations

from idlm.bench.decode import _by_placement
from idlm.bench.placement import placements, probe


def test_probe_times_a_product_in_microseconds():
    assert 0 < probe(calls=5, samples=3) < 1e6


def test_two_placements_split_at_the_widest_gap_and_a_run_across_it_is_mixed():
    probes = [(91.0, 92.0), (101.0, 100.5), (91.5, 101.2), (92.3, 91.1), (102.0, 101.8)]
    assert placements(probes) == ["fast", "slow", "mixed", "fast", "slow"]


def test_one_placement_when_no_gap_is_wide_enough_or_only_a_stray_probe_stands_apart():
    assert placements([(91.0, 92.0), (93.0, 92.5), (91.2, 94.0)]) == ["one"] * 3
    steady = [(91.0 + i * 0.1, 91.5) for i in range(10)] + [(91.3, 140.0)]  # one stray probe of 22
    assert placements(steady) == ["one"] * 11


def test_ratios_by_placement_pair_only_repeats_where_the_row_and_ar_saw_the_same_placement():
    def run(tps, ms, label):
        return {"tok_per_s": tps, "ms_per_step": ms, "placement": label}

    rows = [run(10, 20, "fast"), run(8, 25, "slow"), run(9, 22, "fast"), run(7, 30, "mixed")]
    ar = [run(20, 10, "fast"), run(20, 10, "fast"), run(18, 11, "fast"), run(19, 10, "slow")]
    out = _by_placement(rows, ar)
    assert set(out) == {"fast", "slow"}  # mixed runs count nowhere
    assert out["fast"] == {"runs": 2, "tok_per_s": 9.5, "ms_per_step": 21.0, "pairs_with_ar": 2,
                           "speedup_vs_idlm_ar": 0.5, "step_cost_vs_ar": 2.0}
    assert out["slow"] == {"runs": 1, "tok_per_s": 8.0, "ms_per_step": 25.0}  # its AR run saw the fast placement
