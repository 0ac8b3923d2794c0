"""ISD / R-ISD against AR decoding of the same model, the accept/resample rule against exact distributions,
batching, stops inside accepted blocks, and KV accounting."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from idlm import LLM, SamplingParams
from idlm.decoding.ar import ARDecoding
from idlm.decoding.isd import ISDDecoding, accept_or_resample
from idlm.decoding.sampling import make_generator
from idlm.models.lora import AdapterConfig, add_lora, save_adapter

from conftest import CHAT_PROMPTS, requires_embedded
from oracles import assert_same_tokens


# ---- the accept / resample rule ----------------------------------------------------------------------

@pytest.mark.parametrize("case", range(3))
def test_accept_resample_reproduces_p(case):
    """x ~ q, then accept with min(1, p/q) or resample from max(0, p - q): the output is distributed as p."""
    g = torch.Generator().manual_seed(100 + case)
    v = 6
    p = torch.softmax(torch.randn(v, generator=g) * 1.5, -1)
    q = torch.softmax(torch.randn(v, generator=g) * 1.5, -1)
    if case == 2:
        p[0] = 0.0  # a token p never produces, q often does
        p /= p.sum()
        q[0] += 1.0
        q /= q.sum()
    gen = make_generator(7 + case)
    trials = 100_000
    xs = torch.multinomial(q, trials, replacement=True, generator=g).tolist()
    counts = np.zeros(v)
    accepted = 0
    for x in xs:
        ok, fix = accept_or_resample(p, q, x, 1.0, gen)
        counts[x if ok else fix] += 1
        accepted += ok
    expected = p.double().numpy() * trials
    support = expected > 0
    assert counts[~support].sum() == 0
    exp = expected[support] / expected[support].sum() * counts[support].sum()
    stat = chisquare(counts[support], exp)
    assert stat.pvalue > 1e-3, (counts, expected)
    # acceptance rate = sum_x min(p, q)
    assert abs(accepted / trials - float(torch.minimum(p, q).sum())) < 0.01


# ---- oracle drafter: MASK rows replaced by the true AR continuation ---------------------------------

class OracleISD(ISDDecoding):
    """Drafts the true AR continuation (greedy reference) instead of the model's MASK rows."""

    def __init__(self, reference: dict[int, list[int]], stride: int, mask_token_id: int, corrupt: float = 0.0,
                 seed: int = 0):
        super().__init__(stride, mask_token_id)
        self.reference = reference  # seq_id -> full AR output
        self.corrupt = corrupt
        self.rng = random.Random(seed)

    def draft(self, seq, mask_logits):
        ref = self.reference[seq.seq_id]
        n = len(seq.output_ids)
        drafts = []
        for m in range(mask_logits.shape[0]):
            t = ref[n + m] if n + m < len(ref) else 0
            if self.corrupt and self.rng.random() < self.corrupt:
                t = (t + 1) % mask_logits.shape[-1]
            drafts.append(t)
        q = torch.zeros_like(mask_logits, dtype=torch.float32)
        q[torch.arange(len(drafts)), torch.tensor(drafts)] = 1.0
        return drafts, q


def _ar_reference(engine, prompt, params):
    seq = engine.add_request(prompt, params, ARDecoding())
    engine.run_to_completion([seq])
    return seq


def _oracle_run(engine, prompt, params, ref_ids, stride, corrupt=0.0, seed=0):
    seq = engine.add_request(prompt, params, ARDecoding())  # placeholder policy, replaced below
    policy = OracleISD({seq.seq_id: ref_ids}, stride, engine.model.mask_token_id, corrupt, seed)
    engine._policies[seq.seq_id] = policy
    seq.stats.decoding, seq.stats.stride = policy.name, stride
    engine.run_to_completion([seq])
    return seq


@pytest.mark.parametrize("stride", [2, 4, 7])
def test_oracle_drafter_accepts_everything(tiny_engine, stride):
    prompt = list(range(1000, 1013))
    params = SamplingParams(temperature=0, max_tokens=60, ignore_eos=True)
    ref = _ar_reference(tiny_engine, prompt, params).output_ids
    seq = _oracle_run(tiny_engine, prompt, params, ref, stride)
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
    free = tiny_engine.kv.num_free_blocks
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
                got = _oracle_run(tiny_engine, prompt, params, ref_ids, stride)
                assert got.output_ids == expected.output_ids, (name, stride)
                assert got.text == expected.text, (name, stride)
                assert got.finish_reason == expected.finish_reason, (name, stride)
    finally:
        tiny_engine.eos_token_ids = [tokenizer.eos_token_id]
    assert tiny_engine.kv.num_free_blocks == free


def test_batched_isd_equals_each_alone(tiny_engine):
    """Sequences with different acceptance (corrupted oracles), strides and samplers batched == alone."""
    prompts = [list(range(3000, 3000 + n)) for n in (5, 12, 30)]
    greedy = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    refs = [_ar_reference(tiny_engine, p, greedy).output_ids for p in prompts]
    specs = [(3, 0.0, greedy), (4, 0.3, greedy), (6, 0.6, greedy)]
    alone = [_oracle_run(tiny_engine, p, sp, r, n, c, seed=i).output_ids
             for i, (p, r, (n, c, sp)) in enumerate(zip(prompts, refs, specs))]
    seqs = []
    for i, (p, r, (n, c, sp)) in enumerate(zip(prompts, refs, specs)):
        seq = tiny_engine.add_request(p, sp, ARDecoding())
        tiny_engine._policies[seq.seq_id] = OracleISD({seq.seq_id: r}, n, tiny_engine.model.mask_token_id, c, seed=i)
        seqs.append(seq)
    tiny_engine.run_to_completion(seqs)
    assert [s.output_ids for s in seqs] == alone == refs
    rates = [s.stats.introspective_acceptance for s in seqs]
    assert rates[0] == 1.0 and rates[2] < rates[1] < 1.0


def test_batched_model_isd_with_sampling_equals_alone(tiny_engine):
    """The model's own drafts under seeded sampling (exact drafting): batch == alone, token for token."""
    prompts = [list(range(4000, 4000 + n)) for n in (4, 9, 21)]
    params = [SamplingParams(temperature=0.9, seed=s, max_tokens=30, ignore_eos=True, top_k=40) for s in (1, 2, 3)]
    strides = [2, 4, 8]
    mask = tiny_engine.model.mask_token_id
    alone = []
    for p, sp, n in zip(prompts, params, strides):
        seq = tiny_engine.add_request(p, sp, ISDDecoding(n, mask))
        tiny_engine.run_to_completion([seq])
        alone.append(seq.output_ids)
    seqs = [tiny_engine.add_request(p, sp, ISDDecoding(n, mask)) for p, sp, n in zip(prompts, params, strides)]
    tiny_engine.run_to_completion(seqs)
    assert [s.output_ids for s in seqs] == alone


def test_no_kv_leak_after_200_requests(tiny_engine):
    rng = random.Random(0)
    kv = tiny_engine.kv
    start = kv.num_free_blocks
    mask = tiny_engine.model.mask_token_id
    live = []
    for i in range(200):
        prompt = [rng.randrange(100, 40000) for _ in range(rng.randint(1, 40))]
        params = SamplingParams(temperature=rng.choice([0.0, 1.0]), seed=i, max_tokens=rng.randint(1, 25),
                                stop=[rng.choice(["e", "the", "a"])] if rng.random() < 0.3 else [],
                                stop_token_ids=[rng.randrange(100, 40000) for _ in range(200)])
        policy = ARDecoding() if rng.random() < 0.2 else ISDDecoding(rng.randint(2, 8), mask,
                                                                     drafting=rng.choice(["exact", "argmax"]))
        live.append(tiny_engine.add_request(prompt, params, policy))
        if len(live) >= 8 or i == 199:
            for _ in range(rng.randint(0, 3)):
                tiny_engine.step()
            if rng.random() < 0.3:
                tiny_engine.abort(live[rng.randrange(len(live))])
            tiny_engine.run_to_completion(live)
            live = []
    assert not tiny_engine.has_unfinished()
    assert kv.num_free_blocks == start


def test_isd_rejects_bad_options():
    with pytest.raises(ValueError, match="stride"):
        ISDDecoding(1, 0)
    with pytest.raises(ValueError, match="stride"):
        ISDDecoding(17, 0)
    with pytest.raises(ValueError, match="drafting"):
        ISDDecoding(4, 0, drafting="beam")


# ---- R-ISD on the embedded model: lossless ----------------------------------------------------------

@pytest.fixture(scope="module")
def random_gated_adapter(tmp_path_factory, embedded_llm):
    """A gated adapter with random nonzero A and B (drafts are garbage, outputs must not change)."""
    from idlm.loading import load_checkpoint

    model = load_checkpoint("smollm2-135m", torch.float32, "cpu").model
    cfg = AdapterConfig(r=8, lora_alpha=16, gated=True, block_size=3, trained_stride=4)
    torch.manual_seed(0)
    for mod in add_lora(model, cfg):
        torch.nn.init.normal_(mod.lora_B, std=0.05)
    path = tmp_path_factory.mktemp("adapter") / "random-gated"
    save_adapter(model, cfg, path)
    return path


@requires_embedded
def test_risd_greedy_equals_ar_greedy(embedded_llm, random_gated_adapter):
    llm = LLM("smollm2-135m", adapter=str(random_gated_adapter), dtype="float32", device="cpu")
    assert llm.default_decoding == "risd" and llm.default_stride == 4
    convs = [[{"role": "user", "content": p}] for p in CHAT_PROMPTS[:10]]
    params = SamplingParams(temperature=0, max_tokens=128, ignore_eos=True)
    ar = embedded_llm.chat(convs, params, decoding="ar")
    model = embedded_llm.checkpoint.model
    for stride in (2, 3, 4, 8):
        outs = llm.chat(convs, params, decoding="risd", stride=stride)
        for conv, a, r in zip(convs, ar, outs):
            assert r.stats.decoding == "risd" and r.stats.stride == stride
            assert_same_tokens(r.token_ids, a.token_ids, embedded_llm.apply_chat_template(conv), model,
                               f"stride {stride}: {conv[0]['content']}")
    assert llm.engine.kv.num_free_blocks == llm.engine.kv.allocator.num_blocks
