"""AR decoding through the engine: oracle equality with transformers, stats, KV accounting, batching."""
from __future__ import annotations

import pytest
import torch

from idlm import SamplingParams
from idlm.decoding.ar import ARDecoding
from idlm.engine.llm_engine import PromptTooLongError

from conftest import CHAT_PROMPTS, requires_embedded
from oracles import assert_same_tokens


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
        seq = tiny_engine.add_request(p, sp, ARDecoding())
        tiny_engine.run_to_completion([seq])
        alone.append(seq.output_ids)
    seqs = [tiny_engine.add_request(p, sp, ARDecoding()) for p, sp in zip(prompts, params)]
    tiny_engine.run_to_completion(seqs)
    assert [s.output_ids for s in seqs] == alone
    assert [len(a) for a in alone] == [20, 25, 7, 30]


def test_same_seed_same_output(tiny_engine):
    def run(seed):
        s = tiny_engine.add_request([5, 6, 7], SamplingParams(temperature=1.0, seed=seed, max_tokens=30,
                                                              ignore_eos=True), ARDecoding())
        tiny_engine.run_to_completion([s])
        return s.output_ids

    assert run(11) == run(11)
    assert run(11) != run(12)


def test_kv_blocks_return_after_every_ending(tiny_engine):
    kv = tiny_engine.kv
    start = kv.num_free_blocks
    finished = tiny_engine.add_request(list(range(100, 130)), SamplingParams(temperature=0, max_tokens=9), ARDecoding())
    stopped = tiny_engine.add_request(list(range(200, 211)), SamplingParams(temperature=0, max_tokens=50,
                                                                           stop_token_ids=list(range(49152))),
                                      ARDecoding())
    aborted = tiny_engine.add_request(list(range(300, 340)), SamplingParams(temperature=0, max_tokens=500,
                                                                           ignore_eos=True), ARDecoding())
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
        tiny_engine.add_request(list(range(5000)), SamplingParams(), ARDecoding())


def test_max_tokens_clamped_to_context(tiny_engine):
    seq = tiny_engine.add_request(list(range(10, 2040)), SamplingParams(temperature=0, max_tokens=100,
                                                                        ignore_eos=True), ARDecoding())
    tiny_engine.run_to_completion([seq])
    assert seq.finish_reason == "length" and seq.num_tokens <= 2048


@requires_embedded
def test_stream_yields_deltas_and_closing_early_aborts(embedded_llm):
    kv = embedded_llm.engine.kv
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
