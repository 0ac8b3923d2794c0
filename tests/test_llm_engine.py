"""AR decoding through the engine: oracle equality with transformers, stats, KV accounting, batching."""
from __future__ import annotations

import pytest
import torch

from idlm import SamplingParams
from idlm.decoding.policy import Decoding
from idlm.engine.llm_engine import PromptTooLongError

from conftest import CHAT_PROMPTS, requires_embedded
from oracles import assert_same_tokens
from test_loading import save_tiny, tiny_tokenizer  # noqa: F401 (fixture)

AR = Decoding()


@requires_embedded
def test_greedy_ar_matches_transformers_generate(embedded_llm, hf_reference):
    params = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)
    convs = [[{"role": "user", "content": p}] for p in CHAT_PROMPTS[:5]]
    outs = embedded_llm.chat(convs, params, decoding="ar")
    for conv, out in zip(convs, outs):
        ids = embedded_llm.apply_chat_template(conv)
        with torch.no_grad():
            ref = hf_reference.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                        do_sample=False, max_new_tokens=64, min_new_tokens=64,
                                        pad_token_id=embedded_llm.tokenizer.eos_token_id)[0, len(ids):].tolist()
        assert len(out.token_ids) == 64
        assert_same_tokens(out.token_ids, ref, ids, embedded_llm.checkpoint.model, conv[0]["content"])


@requires_embedded
def test_logprobs_are_the_raw_log_softmax_of_transformers_logits(embedded_llm, hf_reference):
    """Each committed token's logprob (and its top 5) is log_softmax of the model's logits at its position, before
    temperature and penalties: checked against transformers on the same weights, under sampling with penalties."""
    params = SamplingParams(temperature=0.8, top_k=40, repetition_penalty=1.3, seed=3, max_tokens=24, ignore_eos=True,
                            logprobs=5)
    conv = [{"role": "user", "content": CHAT_PROMPTS[2]}]
    out = embedded_llm.chat(conv, params, decoding="ar")[0]
    ids = embedded_llm.apply_chat_template(conv)
    with torch.no_grad():
        ref = torch.log_softmax(hf_reference(torch.tensor([ids + out.token_ids])).logits[0].float(), -1)
    assert len(out.logprobs) == len(out.token_ids) == 24 and out.kinds == ["clean"] * 24
    for i, (tok, lp) in enumerate(zip(out.token_ids, out.logprobs)):
        row = ref[len(ids) + i - 1]
        assert lp.logprob == pytest.approx(row[tok].item(), abs=1e-3)
        top = row.topk(5)
        assert [t for t, _ in lp.top] == top.indices.tolist()
        assert [v for _, v in lp.top] == pytest.approx(top.values.tolist(), abs=1e-3)
    assert embedded_llm.chat(conv, SamplingParams(max_tokens=4))[0].logprobs is None


def test_as_completed_yields_every_request_once_and_closing_aborts_the_rest(tmp_path, tiny_tokenizer):  # noqa: F811
    from idlm import LLM

    save_tiny(tmp_path / "model", tiny_tokenizer)
    llm = LLM(str(tmp_path / "model"), kv_cache_tokens=2048, max_num_seqs=2)
    prompts = ["The quick brown fox", "What is 2 + 2?", "Write a haiku", "The sea"]
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in (12, 3, 8, 5)]
    alone = llm.generate(prompts, params)
    got = list(llm.as_completed(prompts, params))
    assert sorted(i for i, _ in got) == [0, 1, 2, 3] and [i for i, _ in got][0] == 1  # the shortest first
    assert all(out.token_ids == alone[i].token_ids for i, out in got)
    it = llm.as_completed(prompts, params)
    next(it)
    it.close()  # the requests still running or waiting are aborted, their blocks freed
    assert not llm.engine.has_unfinished()
    assert llm.engine.blocks.num_free_blocks == llm.engine.blocks.num_blocks


@requires_embedded
def test_ar_stats_and_eos_conventions(embedded_llm):
    out = embedded_llm.chat([{"role": "user", "content": "Say hi."}], SamplingParams(temperature=0, max_tokens=200))[0]
    s = out.stats
    assert s.forwards == s.generated_tokens == len(out.token_ids)  # prefill forward emits the first token
    assert s.tokens_per_forward == 1.0
    assert out.finish_reason == "stop"
    assert out.token_ids[-1] in embedded_llm.checkpoint.eos_token_ids  # EOS kept in token_ids ...
    assert "<|im_end|>" not in out.text  # ... but not in the text
    d = s.to_dict()
    assert set(d) >= {"prompt_tokens", "generated_tokens", "forwards", "tokens_per_forward", "seconds",
                      "tokens_per_second"}


def test_batched_equals_one_at_a_time(tiny_engine):
    """Mixed prompt lengths and sampling settings: batch results == each request alone."""
    rng = torch.Generator().manual_seed(0)
    prompts = [torch.randint(100, 40000, (n,), generator=rng).tolist() for n in (3, 17, 40, 9)]
    params = [SamplingParams(temperature=0, max_tokens=20, ignore_eos=True),
              SamplingParams(temperature=0.8, top_k=50, seed=1, max_tokens=25, ignore_eos=True),
              SamplingParams(temperature=1.0, top_p=0.9, seed=2, max_tokens=7, ignore_eos=True),
              SamplingParams(temperature=0.7, repetition_penalty=1.3, presence_penalty=0.5, seed=3, max_tokens=30,
                             ignore_eos=True)]
    alone = []
    for p, sp in zip(prompts, params):
        seq = tiny_engine.add_request(p, sp, AR)
        tiny_engine.run_to_completion([seq])
        alone.append(seq.output_ids)
    seqs = [tiny_engine.add_request(p, sp, AR) for p, sp in zip(prompts, params)]
    tiny_engine.run_to_completion(seqs)
    assert [s.output_ids for s in seqs] == alone
    assert [len(a) for a in alone] == [20, 25, 7, 30]


def test_same_seed_same_output(tiny_engine):
    def run(seed):
        s = tiny_engine.add_request([5, 6, 7], SamplingParams(temperature=1.0, seed=seed, max_tokens=30,
                                                              ignore_eos=True), AR)
        tiny_engine.run_to_completion([s])
        return s.output_ids

    assert run(11) == run(11)
    assert run(11) != run(12)


def test_kv_blocks_return_after_every_ending(tiny_engine):
    kv = tiny_engine.blocks
    start = kv.num_free_blocks
    finished = tiny_engine.add_request(list(range(100, 130)), SamplingParams(temperature=0, max_tokens=9), AR)
    stopped = tiny_engine.add_request(list(range(200, 211)), SamplingParams(temperature=0, max_tokens=50,
                                                                           stop_token_ids=list(range(49152))),
                                      AR)
    aborted = tiny_engine.add_request(list(range(300, 340)), SamplingParams(temperature=0, max_tokens=500,
                                                                           ignore_eos=True), AR)
    tiny_engine.step()
    tiny_engine.step()
    assert kv.num_free_blocks < start
    tiny_engine.abort(aborted)
    tiny_engine.run_to_completion([finished, stopped])
    assert (finished.finish_reason, stopped.finish_reason, aborted.finish_reason) == ("length", "stop", "abort")
    assert len(stopped.output_ids) == 1
    assert kv.num_free_blocks == start
    assert not tiny_engine.has_unfinished()


def test_prompt_too_long_is_a_clear_error(tiny_engine):
    with pytest.raises(PromptTooLongError, match="context"):
        tiny_engine.add_request(list(range(5000)), SamplingParams(), AR)


def test_max_tokens_past_the_context_is_refused_or_clamped_on_request(tiny_engine):
    params = SamplingParams(temperature=0, max_tokens=100, ignore_eos=True)
    with pytest.raises(PromptTooLongError, match="max_tokens=26"):
        tiny_engine.add_request(list(range(10, 2030)), params, AR)
    tiny_engine.config.clamp_max_tokens = True
    seq = tiny_engine.add_request(list(range(10, 2030)), params, AR)
    tiny_engine.run_to_completion([seq])
    assert seq.finish_reason == "length" and seq.num_output_tokens == 26 and seq.num_tokens <= 2048


@requires_embedded
def test_stream_yields_deltas_and_closing_early_aborts(embedded_llm):
    kv = embedded_llm.engine.blocks
    free = kv.num_free_blocks
    msgs = [{"role": "user", "content": "Count from one to twenty in words."}]
    params = SamplingParams(temperature=0, max_tokens=24)
    pieces, final = [], None
    for delta, out in embedded_llm.stream_chat(msgs, params, decoding="ar"):
        pieces.append(delta)
        final = out or final
    assert final is not None and "".join(pieces) == final.text
    assert final.text == embedded_llm.chat(msgs, params, decoding="ar")[0].text
    stream = embedded_llm.stream_chat(msgs, SamplingParams(temperature=0, max_tokens=200), decoding="ar")
    next(stream)
    assert kv.num_free_blocks < free
    stream.close()  # client gone: the request is aborted and its blocks freed
    assert kv.num_free_blocks == free
    assert not embedded_llm.engine.has_unfinished()


# ---- the engine core: memory pressure, continuous batching, prefix caching, chunked prefill ----------

def _tiny_llm(tokenizer, gated: bool | None = True, **engine):
    """The tiny random model behind `LLM`, with a random adapter (gated, plain, or none)."""
    from idlm import LLM
    from idlm.models.lora import AdapterConfig, add_lora

    from conftest import tiny_model

    model = tiny_model()
    cfg = None
    if gated is not None:
        cfg = AdapterConfig(r=4, lora_alpha=8, gated=gated, draft_len=3, trained_stride=4)
        torch.manual_seed(1)
        for mod in add_lora(model, cfg):
            torch.nn.init.normal_(mod.lora_B, std=0.3)
        model.requires_grad_(False)
    return LLM.from_model(model, tokenizer, [tokenizer.eos_token_id], adapter=cfg, **engine)


def _prompts(n, lo=20, hi=60, seed=0):
    rng = torch.Generator().manual_seed(seed)
    return [torch.randint(100, 40000, (int(torch.randint(lo, hi, (1,), generator=rng)),), generator=rng).tolist()
            for _ in range(n)]


def test_memory_pressure_preempts_and_every_request_finishes_unchanged(tokenizer):
    """8 requests x 300 new tokens through a 1,024-token pool: preemption by recompute, outputs as alone."""
    prompts = _prompts(8)
    roomy = _tiny_llm(tokenizer, kv_cache_tokens=16384)
    tight = _tiny_llm(tokenizer, kv_cache_tokens=1024)
    blocks = tight.engine.blocks
    start = blocks.num_free_blocks
    greedy = SamplingParams(temperature=0, max_tokens=300, ignore_eos=True)
    sampled = [SamplingParams(temperature=0.9, top_p=0.95, seed=i, max_tokens=300, ignore_eos=True) for i in range(8)]
    for decoding, params in (("ar", greedy), ("risd", greedy), ("risd", sampled)):
        alone = [roomy.generate([p], params if isinstance(params, SamplingParams) else params[i], decoding=decoding)[0]
                 for i, p in enumerate(prompts)]
        together = tight.generate(prompts, params, decoding=decoding)
        assert [o.token_ids for o in together] == [o.token_ids for o in alone], decoding
        assert all(len(o.token_ids) == 300 for o in together)
        assert sum(o.stats.preemptions for o in together) > 0
        assert blocks.num_free_blocks == start
    # greedy R-ISD commits exactly the AR tokens, preempted or not
    ar = tight.generate(prompts, greedy, decoding="ar")
    assert [o.token_ids for o in ar] == [o.token_ids for o in tight.generate(prompts, greedy, decoding="risd")]


@requires_embedded
def test_memory_pressure_on_the_embedded_model(embedded_llm):
    """The report that started the engine core: 8 chat requests of 300 tokens, a 1,024-token KV pool."""
    from idlm import LLM

    llm = LLM("smollm2-135m", dtype="float32", device="cpu", kv_cache_tokens=1024)  # the shipped gated adapter
    convs = [[{"role": "user", "content": p}] for p in CHAT_PROMPTS[:8]]
    params = SamplingParams(temperature=0, max_tokens=300, ignore_eos=True)
    alone = [embedded_llm.chat(c, params, decoding="ar")[0] for c in convs]
    for decoding in ("ar", "risd"):
        outs = llm.chat(convs, params, decoding=decoding)
        assert sum(o.stats.preemptions for o in outs) > 0
        for conv, o, a in zip(convs, outs, alone):
            assert len(o.token_ids) == 300
            assert_same_tokens(o.token_ids, a.token_ids, llm.apply_chat_template(conv), llm.model, decoding)
    assert llm.engine.blocks.num_free_blocks == llm.engine.blocks.num_blocks


def test_continuous_batching_staggered_arrivals_mixed_strides(tokenizer):
    """Requests join while others are mid-generation (mixed lengths, AR and strides 2/4/8, greedy and
    seeded sampling, penalties): each produces its solo output."""
    llm = _tiny_llm(tokenizer, gated=None, max_num_batched_tokens=96)
    eng = llm.engine
    prompts = _prompts(10, 3, 120, seed=3)
    specs = [("ar", None, {}), ("isd", 2, {}), ("isd", 4, {"branches": None}), ("isd", 8, {"branches": 2})]
    params = [SamplingParams(temperature=0 if i % 3 == 0 else 0.8, seed=i, top_k=0 if i % 2 else 40,
                             presence_penalty=0.3 if i % 4 == 1 else 0.0, max_tokens=20 + 3 * i, ignore_eos=True)
              for i in range(10)]
    decodings = [llm.make_decoding(specs[i % 4][0], specs[i % 4][1], **specs[i % 4][2]) for i in range(10)]
    alone = [llm.generate([p], sp, decoding=d)[0].token_ids for p, sp, d in zip(prompts, params, decodings)]
    seqs, arrivals = [], {0: [0, 1], 2: [2, 3, 4], 5: [5], 6: [6, 7], 11: [8, 9]}
    step = 0
    while step <= 11 or eng.has_unfinished():
        for i in arrivals.get(step, []):
            seqs.append((i, eng.add_request(prompts[i], params[i], decodings[i])))
        eng.step()
        step += 1
    assert {i: s.output_ids for i, s in seqs} == dict(enumerate(alone))
    assert eng.blocks.num_free_blocks == eng.blocks.num_blocks


def test_prefix_caching_reuses_a_shared_system_prompt(tokenizer):
    """Two requests share a 200-token prefix: with 16-token blocks the second reuses 192 tokens (12 blocks)
    and computes only the rest; both equal their solo runs. KV written with the adapter on every row (isd
    with a plain adapter) is never served to a request that needs base KV."""
    llm = _tiny_llm(tokenizer, gated=False, kv_block_size=16)
    solo = _tiny_llm(tokenizer, gated=False, kv_block_size=16, enable_prefix_caching=False)
    system = _prompts(1, 200, 201, seed=5)[0]
    users = _prompts(2, 10, 30, seed=6)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    runner = llm.engine.runner
    first = llm.generate([system + users[0]], params, decoding="ar")[0]
    rows = runner.num_rows
    second = llm.generate([system + users[1]], params, decoding="ar")[0]
    assert first.stats.cached_tokens == 0 and second.stats.cached_tokens == 192
    assert runner.num_rows - rows == len(system + users[1]) - 192 + 11  # prefill rows, then 11 AR steps
    for out, user in ((first, users[0]), (second, users[1])):
        assert out.token_ids == solo.generate([system + user], params, decoding="ar")[0].token_ids
    # AR with a plain adapter runs it on every row (salt 1); risd keeps base KV (salt 0): no sharing
    gated_view = llm.generate([system + users[1]], params, decoding="risd")[0]
    assert gated_view.stats.cached_tokens == 0
    assert gated_view.token_ids == solo.generate([system + users[1]], params, decoding="risd")[0].token_ids
    again = llm.generate([system + users[1]], params, decoding="risd")[0]
    assert again.stats.cached_tokens == 16 * ((len(system + users[1]) - 1) // 16)  # its own base-KV blocks


def test_chunked_prefill_equals_unchunked(tokenizer):
    """A prompt longer than the step's token budget runs in chunks beside decodes: same tokens, and the
    logits within 1e-4 (relative) of one unchunked forward (kernels on 1 and many rows round differently)."""
    prompt = _prompts(1, 300, 301, seed=8)[0]
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    logits = {}
    outs = {}
    for budget in (64, 2048):
        llm = _tiny_llm(tokenizer, max_num_batched_tokens=budget)
        seen = []
        decode = llm.engine.decoder.decode
        llm.engine.decoder.decode = lambda items, lg, *rest, _d=decode: (seen.append(lg.clone()), _d(items, lg, *rest))[1]
        outs[budget] = llm.generate([prompt], params, decoding="risd")[0]
        logits[budget] = seen[0]
    assert outs[64].stats.forwards > outs[2048].stats.forwards  # 300 rows in chunks of at most 64
    assert outs[64].token_ids == outs[2048].token_ids
    err = (logits[64] - logits[2048]).abs().max() / logits[2048].abs().max()
    assert err < 1e-4, err


def test_a_thousand_mixed_requests_leak_nothing_and_reproduce(tokenizer):
    import random

    rng = random.Random(0)
    llm = _tiny_llm(tokenizer, kv_cache_tokens=768, max_num_seqs=32, max_num_batched_tokens=256)
    eng = llm.engine
    start = eng.blocks.num_free_blocks
    reqs, live = [], []
    for i in range(1000):
        prompt = [rng.randrange(100, 40000) for _ in range(rng.randint(1, 80))]
        params = SamplingParams(temperature=rng.choice([0.0, 0.7, 1.0]), seed=i, max_tokens=rng.choice([1, 2, 9, 30]),
                                top_p=rng.choice([1.0, 0.9]), stop=[rng.choice(["e", "th"])] if rng.random() < 0.2 else [],
                                ignore_eos=True)
        name, stride, branches = rng.choice([("ar", None, 0), ("risd", 2, 0), ("risd", 4, None), ("risd", 8, 0),
                                             ("risd", 8, 3), ("isd", 3, 0)])
        decoding = llm.make_decoding(name, stride, **({} if name == "ar" else {"branches": branches}))
        seq = eng.add_request(prompt, params, decoding)
        live.append(seq)
        reqs.append((prompt, params, decoding, seq))
        if rng.random() < 0.25:  # bursts of arrivals between steps fill the pool
            for _ in range(rng.randint(1, 3)):
                eng.step()
        if rng.random() < 0.05:
            eng.abort(live[rng.randrange(len(live))])
        live = [s for s in live if not s.finished]
    while eng.has_unfinished():
        eng.step()
    assert eng.blocks.num_free_blocks == start and sorted(eng.scheduler.free_slots) == list(range(32))
    assert sum(s.finish_reason == "abort" for *_, s in reqs) > 10
    assert sum(s.stats.preemptions for *_, s in reqs) > 0
    done = [(p, sp, d, s) for p, sp, d, s in reqs if s.finish_reason != "abort"]
    for p, sp, d, s in rng.sample(done, 40):  # seeded outputs reproduce alone
        assert llm.generate([p], sp, decoding=d)[0].token_ids == s.output_ids


@pytest.mark.parametrize("gated", [True, None])
def test_stationary_padding_changes_no_output(tokenizer, gated):
    """The stationary-batch mode: every ISD decode step feeds its layout's widest row count (cold rounds padded,
    branches and the tree included); greedy and seeded outputs equal the unpadded engine's, batched and alone."""
    plain = _tiny_llm(tokenizer, gated=gated, max_num_batched_tokens=256)
    padded = _tiny_llm(tokenizer, gated=gated, max_num_batched_tokens=256, stationary=True)
    name = "risd" if gated else "isd"
    specs = [("ar", None, {}), (name, 2, {}), (name, 4, {}), (name, 4, {"branches": None}), (name, 3, {"tree": 3})]
    prompts = _prompts(10, 3, 60, seed=5)
    params = [SamplingParams(temperature=0 if i % 2 == 0 else 0.8, seed=i, max_tokens=24, ignore_eos=True)
              for i in range(10)]

    def decodings(llm):
        return [llm.make_decoding(specs[i % 5][0], specs[i % 5][1], **specs[i % 5][2]) for i in range(10)]

    fed: list[tuple[int, int, int]] = []  # (rows fed, widest rows, natural rows) of every ISD decode step
    schedule = padded.engine.scheduler.schedule

    def spy():
        step = schedule()
        for s in step:
            d, seq = s.seq.decoding, s.seq
            if d.num_masks and not s.chunk:
                natural = d.step_rows(seq.num_uncomputed, len(seq.drafts), len(seq.alternatives))
                fed.append((s.num_rows, d.stationary_rows, natural))
        return step

    padded.engine.scheduler.schedule = spy
    want = [o.token_ids for o in plain.generate(prompts, params, decoding=decodings(plain))]
    assert [o.token_ids for o in padded.generate(prompts, params, decoding=decodings(padded))] == want
    assert fed and all(rows == max(widest, natural) for rows, widest, natural in fed)
    assert any(natural < widest for _, widest, natural in fed)  # cold rounds were padded
    alone = [padded.generate([p], sp, decoding=d)[0].token_ids
             for p, sp, d in zip(prompts[:5], params[:5], decodings(padded)[:5])]
    assert alone == want[:5]
    eng = padded.engine
    assert eng.blocks.num_free_blocks == eng.blocks.num_blocks
