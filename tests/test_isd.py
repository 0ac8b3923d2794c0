"""ISD / R-ISD against AR decoding of the same model, the accept/resample rule against exact distributions,
batching, stops inside accepted blocks, and KV accounting."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from idlm import LLM, SamplingParams
from idlm.decoding.decoder import DecodeItem, Decoder
from idlm.decoding.policy import Decoding

from conftest import CHAT_PROMPTS, requires_embedded
from test_lora import random_gated_adapter as save_random_gated_adapter
from oracles import assert_same_tokens, assert_sampling_is_exact

AR = Decoding()


def isd(stride: int, **options) -> Decoding:
    """ISD with a branch at every draft position unless `branches` says otherwise."""
    return Decoding("isd", stride, **{"branches": None, **options})


# ---- the accept / resample rule, through the batched decoder ------------------------------------------

def _verify_trials(p: torch.Tensor, q: torch.Tensor, trials: int, alpha: float = 1.0, seed: int = 0):
    """`trials` requests, each with one draft x ~ q (q stored as its proposal) and anchor p: what each commits."""
    v = p.shape[0]
    g = torch.Generator().manual_seed(seed)
    xs = torch.multinomial(q, trials, replacement=True, generator=g).tolist()
    dec = Decoder(v, trials)
    dec.q = q.expand(trials, 1, v).clone()
    params = SamplingParams(temperature=1.0)
    d = Decoding("isd", 2, verify_alpha=alpha)
    items = [DecodeItem(i, i, params, d, seed * 1_000_003 + i, 10, [x], 100) for i, x in enumerate(xs)]
    # rows per item: p_0 (the draft's anchor), p_1 (next token), q_0 (new draft)
    logits = torch.log(p.clamp_min(1e-30))[None].expand(3 * trials, v)
    res = dec.decode(items, logits)
    return xs, res


@pytest.mark.parametrize("case", range(3))
def test_accept_resample_reproduces_p(case):
    """x ~ q, then accept with min(1, p/q) or resample from max(0, p - q): the token at x's position is ~ p."""
    g = torch.Generator().manual_seed(100 + case)
    v = 6
    p = torch.softmax(torch.randn(v, generator=g) * 1.5, -1)
    q = torch.softmax(torch.randn(v, generator=g) * 1.5, -1)
    if case == 2:
        p[0] = 0.0  # a token p never produces, q often does
        p /= p.sum()
        q[0] += 1.0
        q /= q.sum()
    trials = 60_000
    xs, res = _verify_trials(p, q, trials, seed=case)
    first = np.array([r.tokens[0] for r in res])
    counts = np.bincount(first, minlength=v).astype(float)
    accepted = sum(not r.rejected for r in res)
    expected = p.double().numpy() * trials
    support = expected > 0
    assert counts[~support].sum() == 0
    exp = expected[support] / expected[support].sum() * counts[support].sum()
    assert chisquare(counts[support], exp).pvalue > 1e-3, (counts, expected)
    # acceptance rate = sum_x min(p, q); the statistic the decoder reports is its expectation
    assert abs(accepted / trials - float(torch.minimum(p, q).sum())) < 0.01
    assert all(r.tested == 1 for r in res)
    assert abs(sum(r.ratio_sum for r in res) / trials - float(torch.minimum(p, q).sum())) < 0.01


def test_lenient_alpha_accepts_more():
    g = torch.Generator().manual_seed(5)
    p = torch.softmax(torch.randn(8, generator=g), -1)
    q = torch.softmax(torch.randn(8, generator=g), -1)
    _, strict = _verify_trials(p, q, 4000, 1.0)
    _, lenient = _verify_trials(p, q, 4000, 0.5)
    assert sum(not r.rejected for r in lenient) > sum(not r.rejected for r in strict) + 200


def test_decode_ops_do_not_grow_with_batch_or_drafts(tiny_engine):
    """One step's sampling and verification runs a fixed number of tensor ops (counted at the aten dispatch),
    whatever the batch size and the number of drafts."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.n += not func.is_view  # views are metadata (broadcasting a single row adds one)
            return func(*args, **(kwargs or {}))

    v = 300

    def ops(batch: int, stride: int, greedy: bool) -> int:
        dec = Decoder(v, batch)
        params = SamplingParams(temperature=0 if greedy else 0.8, top_k=50, top_p=0.9, repetition_penalty=1.2,
                                max_tokens=100)
        d = isd(stride)
        dec.start(list(range(batch)), [[1, 2, 3]] * batch)
        items = [DecodeItem(i, i, params, d, i, 5, list(range(7, 6 + stride)), 100) for i in range(batch)]
        dec.q = torch.full((batch, stride - 1, v), 1.0 / v)
        logits = torch.randn(sum(it.num_rows for it in items), v)
        with Count() as c:
            dec.decode(items, logits)
        return c.n

    for greedy in (True, False):
        counts = {ops(b, n, greedy) for b in (1, 3, 16) for n in (2, 4, 8)}
        assert len(counts) == 1, (greedy, counts)


# ---- oracle drafter: MASK rows replaced by the true AR continuation ---------------------------------

def _oracle(reference: dict[int, list[int]], prompt_len: dict[int, int], corrupt: dict[int, float] | None = None,
            seed: int = 0):
    """A drafter proposing the true AR continuation (corrupted with the given per-request probability)."""
    rng = random.Random(seed)
    corrupt = corrupt or {}

    def drafter(item: DecodeItem, first: int, n: int) -> list[int]:
        ref = reference[item.request_id]
        out = []
        for m in range(n):
            pos = first - prompt_len[item.request_id] + m
            t = ref[pos] if pos < len(ref) else 0
            if rng.random() < corrupt.get(item.request_id, 0.0):
                t = (t + 1) % 49152
            out.append(t)
        return out

    return drafter


def _ar_reference(engine, prompt, params):
    seq = engine.add_request(prompt, params, AR)
    engine.run_to_completion([seq])
    return seq


def _oracle_runs(engine, prompts, params, refs, strides, corrupt=(), seed=0, **options):
    """Requests drafted by the oracle, all in one batch; returns the sequences."""
    seqs = [engine.add_request(p, sp, isd(n, **options)) for p, sp, n in zip(prompts, params, strides)]
    engine.decoder.drafter = _oracle({s.seq_id: r for s, r in zip(seqs, refs)},
                                     {s.seq_id: len(p) for s, p in zip(seqs, prompts)},
                                     {s.seq_id: c for s, c in zip(seqs, corrupt)}, seed)
    try:
        engine.run_to_completion(seqs)
    finally:
        engine.decoder.drafter = None
    return seqs


@pytest.mark.parametrize("stride", [2, 4, 7])
def test_oracle_drafter_accepts_everything(tiny_engine, stride):
    prompt = list(range(1000, 1013))
    params = SamplingParams(temperature=0, max_tokens=60, ignore_eos=True)
    ref = _ar_reference(tiny_engine, prompt, params).output_ids
    seq = _oracle_runs(tiny_engine, [prompt], [params], [ref], [stride])[0]
    assert seq.output_ids == ref
    s = seq.stats
    assert s.acceptance_by_position == [1.0] * (stride - 1)
    assert s.rounds["R"] == 0 and s.rounds["C"] == 1  # only the first (prefill) cold start
    # the prefill forward commits 1 token, every verify round exactly N (the last may be cut by max_tokens)
    assert s.forwards == 1 + s.rounds["V"]
    assert s.rounds["V"] == -(-(60 - 1) // stride)
    assert s.introspective_acceptance == 1.0


def test_oracle_stops_inside_accepted_blocks(tiny_engine, tokenizer):
    """EOS, stop ids, stop strings and max_tokens landing inside an accepted block end exactly as in AR."""
    prompt = list(range(2000, 2011))
    free = tiny_engine.blocks.num_free_blocks
    base = SamplingParams(temperature=0, max_tokens=80, ignore_eos=True)
    ref = _ar_reference(tiny_engine, prompt, base)
    ref_ids = ref.output_ids
    text = ref.text
    cases = {
        "max_tokens": SamplingParams(temperature=0, max_tokens=23, ignore_eos=True),
        "stop_token": SamplingParams(temperature=0, max_tokens=80, stop_token_ids=[ref_ids[30]]),
        "stop_string": SamplingParams(temperature=0, max_tokens=80, ignore_eos=True, stop=[text[len(text) // 2:][:6]]),
    }
    tiny_engine.eos_token_ids = [ref_ids[41]]  # EOS via the model's eos ids
    cases["eos"] = SamplingParams(temperature=0, max_tokens=80)
    try:
        for name, params in cases.items():
            expected = _ar_reference(tiny_engine, prompt, params)
            for stride in (3, 5):
                got = _oracle_runs(tiny_engine, [prompt], [params], [ref_ids], [stride])[0]
                assert got.output_ids == expected.output_ids, (name, stride)
                assert got.text == expected.text, (name, stride)
                assert got.finish_reason == expected.finish_reason, (name, stride)
    finally:
        tiny_engine.eos_token_ids = [tokenizer.eos_token_id]
    assert tiny_engine.blocks.num_free_blocks == free


def test_batched_oracle_isd_equals_each_alone(tiny_engine):
    """Sequences with different acceptance (corrupted oracles) and strides batched == alone == AR."""
    prompts = [list(range(3000, 3000 + n)) for n in (5, 12, 30)]
    greedy = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    refs = [_ar_reference(tiny_engine, p, greedy).output_ids for p in prompts]
    strides, corrupt = [3, 4, 6], [0.0, 0.3, 0.6]
    alone = [_oracle_runs(tiny_engine, [p], [greedy], [r], [n], [c], seed=i)[0].output_ids
             for i, (p, r, n, c) in enumerate(zip(prompts, refs, strides, corrupt))]
    seqs = _oracle_runs(tiny_engine, prompts, [greedy] * 3, refs, strides, corrupt)
    assert [s.output_ids for s in seqs] == alone == refs
    rates = [s.stats.introspective_acceptance for s in seqs]
    assert rates[0] == 1.0 and rates[2] < rates[1] < 1.0


def test_batched_model_isd_with_sampling_equals_alone(tiny_engine):
    """The model's own drafts under seeded sampling (exact drafting): batch == alone, token for token."""
    prompts = [list(range(4000, 4000 + n)) for n in (4, 9, 21)]
    params = [SamplingParams(temperature=0.9, seed=s, max_tokens=30, ignore_eos=True, top_k=40,
                             repetition_penalty=1.1 if s == 2 else 1.0) for s in (1, 2, 3)]
    strides = [2, 4, 8]
    alone = []
    for p, sp, n in zip(prompts, params, strides):
        seq = tiny_engine.add_request(p, sp, isd(n))
        tiny_engine.run_to_completion([seq])
        alone.append(seq.output_ids)
    seqs = [tiny_engine.add_request(p, sp, isd(n)) for p, sp, n in zip(prompts, params, strides)]
    tiny_engine.run_to_completion(seqs)
    assert [s.output_ids for s in seqs] == alone


def test_no_kv_leak_after_200_requests(tiny_engine):
    rng = random.Random(0)
    blocks = tiny_engine.blocks
    start = blocks.num_free_blocks
    live = []
    for i in range(200):
        prompt = [rng.randrange(100, 40000) for _ in range(rng.randint(1, 40))]
        params = SamplingParams(temperature=rng.choice([0.0, 1.0]), seed=i, max_tokens=rng.randint(1, 25),
                                stop=[rng.choice(["e", "the", "a"])] if rng.random() < 0.3 else [],
                                stop_token_ids=[rng.randrange(100, 40000) for _ in range(200)])
        decoding = AR if rng.random() < 0.2 else isd(rng.randint(2, 8), drafting=rng.choice(["exact", "argmax"]))
        live.append(tiny_engine.add_request(prompt, params, decoding))
        if len(live) >= 8 or i == 199:
            for _ in range(rng.randint(0, 3)):
                tiny_engine.step()
            if rng.random() < 0.3:
                tiny_engine.abort(live[rng.randrange(len(live))])
            tiny_engine.run_to_completion(live)
            live = []
    assert not tiny_engine.has_unfinished()
    assert blocks.num_free_blocks == start


def test_isd_rejects_bad_options():
    with pytest.raises(ValueError, match="stride"):
        isd(1)
    with pytest.raises(ValueError, match="stride"):
        isd(17)
    with pytest.raises(ValueError, match="drafting"):
        isd(4, drafting="beam")
    with pytest.raises(ValueError, match="gated"):
        Decoding("isd", 4, "gated")


# ---- R-ISD on the embedded model: lossless ----------------------------------------------------------
@requires_embedded
def test_risd_logprobs_and_commit_kinds_match_ar(embedded_llm):
    """With the shipped adapter (drafts often accepted): every committed token of R-ISD, accepted draft, clean token
    or correction, and the tree's alternatives, carries the logprob AR gives it (rows of a many-row forward
    differ from 1-row ones only by rounding)."""
    llm = LLM("smollm2-135m", dtype="float32", device="cpu")
    convs = [[{"role": "user", "content": p}] for p in CHAT_PROMPTS[:4]]
    params = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True, logprobs=2)
    ar = embedded_llm.chat(convs, params, decoding="ar")
    for stride, tree in ((4, 1), (3, 3)):
        outs = llm.chat(convs, params, decoding="risd", stride=stride, tree=tree)
        for a, r in zip(ar, outs):
            n = next((i for i, (x, y) in enumerate(zip(a.token_ids, r.token_ids)) if x != y), len(a.token_ids))
            assert n >= 8 and len(r.logprobs) == len(r.kinds) == len(r.token_ids)  # up to a near-tie divergence
            assert [x.logprob for x in r.logprobs[:n]] == pytest.approx([x.logprob for x in a.logprobs[:n]], abs=2e-3)
            assert [x.top for x in r.logprobs[:n]] == [[(t, pytest.approx(v, abs=2e-3)) for t, v in x.top]
                                                        for x in a.logprobs[:n]]
            assert set(r.kinds) <= {"draft", "clean", "correction"}
            assert r.kinds.count("correction") <= r.stats.rounds["R"]
        kinds = [k for r in outs for k in r.kinds]
        assert kinds.count("draft") > 0 and kinds.count("correction") > 0



@pytest.fixture(scope="module")
def random_gated_adapter(tmp_path_factory, embedded_llm):
    """A gated adapter with random nonzero A and B on the embedded model (drafts are garbage, outputs must not
    change)."""
    return save_random_gated_adapter("smollm2-135m", tmp_path_factory.mktemp("adapter") / "random-gated", r=8)


@requires_embedded
def test_risd_greedy_equals_ar_greedy(embedded_llm, random_gated_adapter):
    llm = LLM("smollm2-135m", adapter=str(random_gated_adapter), dtype="float32", device="cpu")
    assert llm.default_decoding == "auto" and llm.default_stride == 4
    convs = [[{"role": "user", "content": p}] for p in CHAT_PROMPTS[:10]]
    params = SamplingParams(temperature=0, max_tokens=128, ignore_eos=True)
    ar = embedded_llm.chat(convs, params, decoding="ar")
    model = embedded_llm.model
    for stride, branches, tree in ((2, None, 1), (3, None, 1), (4, None, 1), (8, None, 1), (4, 0, 1), (3, None, 3)):
        outs = llm.chat(convs, params, decoding="risd", stride=stride, branches=branches, tree=tree)
        for conv, a, r in zip(convs, ar, outs):
            assert r.stats.decoding == "risd" and r.stats.stride == stride
            assert_same_tokens(r.token_ids, a.token_ids, embedded_llm.apply_chat_template(conv), model,
                               f"stride {stride}, branches {branches}, tree {tree}: {conv[0]['content']}")
        assert (branches == 0) == (sum(r.stats.branched for r in outs) == 0)
    for conv, a, r in zip(convs, ar, llm.chat(convs, params)):  # the default, auto
        assert r.stats.decoding == "auto" and sum(r.stats.choices.values()) == r.stats.forwards
        assert_same_tokens(r.token_ids, a.token_ids, embedded_llm.apply_chat_template(conv), model, "auto")
    assert llm.engine.blocks.num_free_blocks == llm.engine.blocks.num_blocks


# ---- branches: drafts ready after every rejection ------------------------------------------------

@pytest.mark.parametrize("wrong_at", [0, 1, 2])
def test_oracle_wrong_at_one_draft_never_starts_cold(tiny_engine, wrong_at):
    """An oracle wrong exactly at draft `wrong_at` of every step: each verify round commits wrong_at + 1 tokens
    and, with branches, is followed by another verify round (only the first step is cold); without branches
    every rejection is followed by a cold round."""
    prompt = list(range(5000, 5011))
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    ref = _ar_reference(tiny_engine, prompt, params).output_ids

    def run(**options):
        seq = tiny_engine.add_request(prompt, params, isd(4, **options))
        truth = _oracle({seq.seq_id: ref}, {seq.seq_id: len(prompt)})

        def drafter(item, first, n):
            out = truth(item, first, n)
            out[wrong_at] = (out[wrong_at] + 1) % 49152
            return out

        tiny_engine.decoder.drafter = drafter
        try:
            tiny_engine.run_to_completion([seq])
        finally:
            tiny_engine.decoder.drafter = None
        return seq

    seq = run()
    assert seq.output_ids == ref
    s = seq.stats
    # (the last round may test fewer drafts than it holds: those past max_tokens are never tested)
    assert s.rounds["C"] == 1 and s.rounds["V"] <= 1 and s.branched == s.rounds["R"] > 0
    assert s.forwards == 1 + -(-(40 - 1) // (wrong_at + 1))
    cold = run(branches=0).stats
    assert cold.rounds["C"] >= cold.rounds["R"] > 0 and cold.branched == 0
    assert cold.forwards > s.forwards if wrong_at else cold.forwards == s.forwards  # 1 token a forward either way


def test_sampled_isd_with_branches_is_distribution_exact():
    """Seeded sampling through ISD stride 3 with branches (model drafts, many rejections) commits 3-token
    continuations distributed exactly as AR sampling."""
    seqs = assert_sampling_is_exact(lambda: isd(3))
    assert sum(s.stats.branched for s in seqs) > len(seqs) // 4  # the branches were used


# ---- the first-position tree: alternatives verified by the exact multi-candidate rule ---------------

def _tree_trials(p: torch.Tensor, q: torch.Tensor, k: int, trials: int, seed: int = 0):
    """`trials` requests, each with a first draft x1 and alternatives x2..xk drawn from q without replacement
    (q stored as the draft's proposal) and anchor p; the alternatives' own rows are given as logits."""
    v = p.shape[0]
    g = torch.Generator().manual_seed(seed)
    cands = torch.multinomial(q.expand(trials, v), k, replacement=False, generator=g).tolist()
    dec = Decoder(v, trials)
    dec.q = q.expand(trials, 1, v).clone()
    params = SamplingParams(temperature=1.0)
    d = Decoding("isd", 2, tree=k)
    items = [DecodeItem(i, i, params, d, seed * 1_000_003 + i, 10, c[:1], 100, 0, c[1:]) for i, c in enumerate(cands)]
    logits = torch.log(p.clamp_min(1e-30))[None].expand(3 * trials, v)  # p_0, p_1, q_0 of each request
    after = torch.full((v,), -30.0)
    after[v - 1] = 0.0  # the token after an accepted alternative: always v - 1
    hidden = after[None].expand((k - 1) * trials, v)
    return cands, dec.decode(items, logits, hidden, head=lambda h: h)


@pytest.mark.parametrize("far", [False, True])
def test_tree_rule_reproduces_p(far):
    """Three candidates for one position, tested in turn against the residuals: the committed token is ~ p,
    also when q is far from p (most candidates outside p's support, the residuals doing the work)."""
    g = torch.Generator().manual_seed(7)
    v = 8
    p = torch.softmax(torch.randn(v, generator=g), -1)
    q = torch.softmax(torch.randn(v, generator=g), -1)
    if far:
        p = torch.tensor([0.5, 0.3, 0.15, 0.05, 0.0, 0.0, 0.0, 0.0])
        q = torch.tensor([0.01, 0.02, 0.01, 0.06, 0.3, 0.3, 0.2, 0.1])
    trials = 40_000
    cands, res = _tree_trials(p, q, 3, trials, seed=int(far))
    first = np.array([r.tokens[0] for r in res])
    counts = np.bincount(first, minlength=v).astype(float)
    expected = p.double().numpy() * trials
    support = expected > 0
    assert counts[~support].sum() == 0
    assert chisquare(counts[support], expected[support] / expected[support].sum() * trials).pvalue > 1e-3, counts
    hits = [r for r in res if r.tree_hit]
    assert len(hits) > trials // 50
    for c, r in zip(cands, res):
        if r.tree_hit:
            assert r.tokens[0] in c[1:] and r.tokens[1] == v - 1 and r.kept_drafts == 0 and r.drafts == []
        elif r.rejected:
            assert r.tokens[0] not in c and len(r.tokens) == 1  # p_{k+1} is zero on every rejected candidate
    # the rule with one candidate is the plain rule: acceptance of x1 stays sum min(p, q)
    first_ok = sum(not r.rejected for r in res) / trials
    assert abs(first_ok - float(torch.minimum(p, q).sum())) < 0.015


def _small_vocab_engine(v: int = 12):
    from idlm.engine.llm_engine import EngineConfig, LLMEngine
    from idlm.eval.acceptance import IdTokenizer

    from conftest import tiny_model

    return LLMEngine(tiny_model(vocab_size=v, seed=4), IdTokenizer(), [],
                     EngineConfig(kv_cache_tokens=16384, kv_block_size=8, max_num_seqs=16))


def test_greedy_tree_equals_ar():
    """On a 12-token vocabulary the model's second and third guesses are often right: greedy ISD with a tree
    of 3 (alone and with branches, strides 2 to 8, batched) commits AR's tokens."""
    eng = _small_vocab_engine()
    rng = random.Random(0)
    prompts = [[rng.randrange(12) for _ in range(5 + i)] for i in range(6)]
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    ar = [_ar_reference(eng, p, params).output_ids for p in prompts]
    for stride, branches in ((2, 0), (4, 0), (4, None), (8, 1)):
        seqs = [eng.add_request(p, params, isd(stride, branches=branches, tree=3)) for p in prompts]
        eng.run_to_completion(seqs)
        assert [s.output_ids for s in seqs] == ar, (stride, branches)
        assert sum(s.stats.tree_hits for s in seqs) > 0
        assert all(s.stats.to_dict()["tree_hits"] == s.stats.tree_hits for s in seqs)
    assert eng.blocks.num_free_blocks == eng.blocks.num_blocks


def test_sampled_isd_with_a_tree_is_distribution_exact():
    seqs = assert_sampling_is_exact(lambda: isd(3, branches=0, tree=3))
    assert sum(s.stats.tree_hits for s in seqs) > len(seqs) // 20


def test_tree_needs_exact_verification():
    with pytest.raises(ValueError, match="exact verification"):
        Decoding("isd", 4, tree=3, fast_verify=True)
    with pytest.raises(ValueError, match="needs drafts"):
        Decoding("ar", 1, tree=2)
    with pytest.raises(ValueError, match="between 1 and"):
        Decoding("isd", 4, tree=0)
    assert Decoding("risd", 4, "gated", branches=None, tree=3).label == "risd4+b3+t3"
