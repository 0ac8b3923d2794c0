"""Adaptive decoding: the choice follows the costs, the batch and the running acceptance, AR probes ISD now and
then, and switching between lossless decodings changes speed only (greedy == AR, sampling exact)."""
from __future__ import annotations

import random

import pytest

from idlm import SamplingParams
from idlm.decoding.adaptive import Adaptive, ChoiceState
from idlm.decoding.policy import Decoding
from idlm.decoding.stats import RequestStats

from oracles import assert_sampling_is_exact

MASK = 99
SHIPPED = [0.378, 0.327, 0.265]


class RowCosts:
    """A forward of `batch` sequences costs batch^e * (1 + c * rows per sequence beyond the first)."""

    def __init__(self, c: float, e: float = 0.0, batch_c: float = 0.0):
        self.c, self.e, self.batch_c = c, e, batch_c

    def round_seconds(self, decoding, batch, mask):
        c = self.c + self.batch_c * (batch - 1)
        times = [batch ** self.e * (1 + c * (len(p.token_ids) - 1)) for p in decoding.layouts(mask).values()]
        return (times[0], times[0]) if len(times) == 1 else (times[1], times[0])  # (verify, cold)


def candidates(kind: str = "isd", lora: str = "none", stride: int = 4) -> list[Decoding]:
    return [Decoding()] + [Decoding(kind, n, lora, branches=b) for n in range(2, stride + 1)
                           for b in sorted({0, 1, n - 1})]


def stats_with(accepted: list[int], tested: list[int]) -> RequestStats:
    s = RequestStats(decoding="auto", stride=4)
    for j, (a, t) in enumerate(zip(accepted, tested)):
        for i in range(t):
            s.record_test(j, i < a)
    return s


def test_choice_follows_costs_batch_and_acceptance():
    fresh = RequestStats(decoding="auto", stride=4)
    # forwards cost the same at any row count: the most tokens per forward wins (stride 4, every branch)
    assert Adaptive(candidates(), RowCosts(0.0), SHIPPED, MASK).choose(ChoiceState(), fresh, 1).label == "isd4+b3"
    # rows cost 30% of an AR step each: at the shipped acceptance AR wins ...
    costly = Adaptive(candidates(), RowCosts(0.3), SHIPPED, MASK)
    assert costly.choose(ChoiceState(), fresh, 1).label == "ar"
    # ... but not for a request whose drafts have been right 39 times in 40
    sure = stats_with([39, 39, 39], [40, 40, 40])
    assert costly.acceptance(sure) == pytest.approx([(4 * p + 39) / 44 for p in SHIPPED])
    assert costly.choose(ChoiceState(), sure, 1).name == "isd"
    # rows that are cheap alone but costly in a big batch (compute-bound): ISD at batch 1, AR at batch 16
    load = Adaptive(candidates(), RowCosts(0.02, batch_c=0.05), SHIPPED, MASK)
    assert load.choose(ChoiceState(), fresh, 1).name == "isd"
    assert load.choose(ChoiceState(), fresh, 16).label == "ar"
    speed = load.speedups(load.acceptance(fresh), 16)
    assert speed[0] == 1.0 and max(speed[1:]) < 1.0


def test_ar_probes_isd_for_one_cold_and_one_verify_round():
    a = Adaptive(candidates(), RowCosts(0.1), [0.2], MASK, probe_every=5, probe_floor=0.5)
    state, stats = ChoiceState(), RequestStats(decoding="auto", stride=4)
    assert 0.5 <= max(a.speedups(a.acceptance(stats), 1)[1:]) < 1.0
    labels = [a.choose(state, stats, 1).label for _ in range(5)]
    assert labels == ["ar"] * 5
    probe = a.choose(state, stats, 1)
    assert probe.name == "isd"
    assert a.choose(state, stats, 1) is probe  # cold round done, its drafts not yet verified
    stats.record_test(0, False)  # the verify round ran (and failed)
    assert a.choose(state, stats, 1).label == "ar"
    far = Adaptive(candidates(), RowCosts(1.0), [0.2], MASK, probe_every=5, probe_floor=0.5)
    state = ChoiceState()
    assert {far.choose(state, stats, 1).label for _ in range(50)} == {"ar"}  # predicted far slower: no probes


def test_only_lossless_candidates_with_one_kv():
    with pytest.raises(ValueError, match="lossless"):
        Adaptive([Decoding(), Decoding("isd", 3, fast_verify=True)], RowCosts(0), SHIPPED, MASK)
    with pytest.raises(ValueError, match="lossless"):
        Adaptive([Decoding(), Decoding("isd", 3, verify_num_specs=1)], RowCosts(0), SHIPPED, MASK)
    with pytest.raises(ValueError, match="same KV"):
        Adaptive([Decoding(), Decoding("isd", 3, "all")], RowCosts(0), SHIPPED, MASK)
    with pytest.raises(ValueError, match="AR first"):
        Adaptive(candidates()[1:], RowCosts(0), SHIPPED, MASK)


class Shuffled(Adaptive):
    """Predicts random speeds every step (seeded): switches in every direction, whatever the stats say."""

    def speedups(self, acceptance, batch):
        return [self.rng.random() for _ in self.candidates]


def shuffled(seed: int, kind: str = "isd") -> Shuffled:
    a = Shuffled(candidates(kind), RowCosts(0.0), SHIPPED, MASK, probe_every=3, probe_floor=0.0)
    a.rng = random.Random(seed)
    return a


def test_forced_switches_change_nothing_under_greedy(tiny_engine):
    """Requests switching between AR and ISD strides 2-4 with and without branches at random every step,
    drafted by an oracle right 60% of the time, in one batch: the output is AR's token for token."""
    from test_isd import _ar_reference, _oracle

    eng = tiny_engine
    prompts = [list(range(1000 + 37 * i, 1011 + 37 * i)) for i in range(4)]
    params = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True)
    refs = [_ar_reference(eng, p, params).output_ids for p in prompts]
    policy = shuffled(0)
    seqs = [eng.add_request(p, params, policy) for p in prompts]
    eng.decoder.drafter = _oracle({s.seq_id: r for s, r in zip(seqs, refs)},
                                  {s.seq_id: len(p) for s, p in zip(seqs, prompts)},
                                  {s.seq_id: 0.4 for s in seqs})
    try:
        eng.run_to_completion(seqs)
    finally:
        eng.decoder.drafter = None
    for s, r in zip(seqs, refs):
        assert s.output_ids == r
        assert s.stats.decoding == "auto" and "ar" in s.stats.choices and len(s.stats.choices) >= 4
        assert sum(s.stats.choices.values()) == s.stats.forwards  # one choice per sampling step (no chunks)
        assert s.stats.rounds["V"] + s.stats.rounds["R"] > 0
    assert eng.blocks.num_free_blocks == eng.blocks.num_blocks


def test_forced_switches_keep_sampling_exact():
    policy = shuffled(1)
    seqs = assert_sampling_is_exact(lambda: policy, n=4000)
    seen = set()
    for s in seqs:
        seen.update(s.stats.choices)
    assert len(seen) >= 6
