"""The serving loop: deltas add up to the offline output, closing a stream aborts within a step and frees its KV
blocks, a failing request (fault-injection hook) or a failing step fails only what it must, the loop keeps going."""
from __future__ import annotations

import asyncio
import time

import pytest

from idlm import LLM, SamplingParams
from idlm.engine.async_llm import AsyncLLM
from test_loading import save_tiny, tiny_tokenizer  # noqa: F401 (fixture)

PROMPTS = ["The quick brown fox", "What is 2 + 2? Answer briefly.", "Write a haiku about the sea."]


@pytest.fixture(scope="module")
def llm(tmp_path_factory, tiny_tokenizer):  # noqa: F811
    path = tmp_path_factory.mktemp("tiny") / "model"
    save_tiny(path, tiny_tokenizer)
    return LLM(str(path), kv_cache_tokens=2048, max_num_seqs=4)


@pytest.fixture()
def engine(llm):
    """The serving loop on the module's model (started here: the offline API must not run beside it)."""
    e = AsyncLLM(llm.engine)
    e.start()
    yield e
    e.shutdown()
    assert llm.engine.blocks.num_free_blocks == llm.engine.blocks.num_blocks  # nothing leaked


async def collect(engine, rid, ids, params, decoding):
    deltas = [d async for d in engine.generate(rid, ids, params, decoding)]
    return deltas


def wait_until(predicate, timeout=10.0):
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.01)


@pytest.mark.parametrize("decoding,stride", [("ar", None), ("isd", 3)])
def test_deltas_add_up_to_the_offline_output(llm, decoding, stride):
    params = [SamplingParams(temperature=0, max_tokens=20, ignore_eos=True),
              SamplingParams(temperature=1.0, seed=5, max_tokens=20, stop=["e"], logprobs=1),
              SamplingParams(temperature=0.7, seed=9, max_tokens=20)]
    ids = [llm.encode(p) for p in PROMPTS]
    d = llm.make_decoding(decoding, stride)
    offline = llm.generate(ids, params, decoding=decoding, stride=stride)
    engine = AsyncLLM(llm.engine)
    engine.start()

    async def main():
        return await asyncio.gather(*(collect(engine, f"r{i}", x, p, d) for i, (x, p) in enumerate(zip(ids, params))))

    try:
        results = asyncio.run(main())
    finally:
        engine.shutdown()
    for deltas, ref, p in zip(results, offline, params):
        assert deltas[0].token_ids == [] and deltas[0].finish_reason is None  # the acknowledgement
        assert [t for x in deltas for t in x.token_ids] == ref.token_ids
        assert "".join(x.text for x in deltas) == ref.text
        assert [k for x in deltas for k in x.kinds] == ref.kinds
        assert deltas[-1].finish_reason == ref.finish_reason and deltas[-1].stats.forwards == ref.stats.forwards
        assert all(x.finish_reason is None for x in deltas[:-1])
        if p.logprobs is not None:
            assert [lp.logprob for x in deltas for lp in x.logprobs or []] == [lp.logprob for lp in ref.logprobs]
        if decoding == "ar":
            assert set(ref.kinds) == {"clean"}


def test_closing_the_stream_aborts_within_a_step(llm, engine):
    ids = llm.encode(PROMPTS[0])
    blocks = llm.engine.blocks

    async def main():
        stream = engine.generate("long", ids, SamplingParams(temperature=0, max_tokens=1500, ignore_eos=True),
                                 llm.make_decoding("ar"))
        got = 0
        async for d in stream:
            got += len(d.token_ids)
            if got >= 5:
                break
        await stream.aclose()

    asyncio.run(main())
    wait_until(lambda: not llm.engine.has_unfinished())
    wait_until(lambda: blocks.num_free_blocks == blocks.num_blocks)


def test_a_failing_request_fails_alone_and_the_loop_keeps_serving(llm, engine):
    bad = llm.encode("a request that breaks")

    def fault(rid: str, prompt_ids: list[int]) -> None:
        if prompt_ids == bad:
            raise RuntimeError("injected")

    engine.fault = fault
    good = [llm.encode(p) for p in PROMPTS]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    d = llm.make_decoding("ar")

    async def main():
        return await asyncio.gather(*(collect(engine, f"g{i}", x, params, d) for i, x in enumerate(good)),
                                    collect(engine, "bad", bad, params, d))

    *oks, failed = asyncio.run(main())
    assert failed[-1].finish_reason == "error" and "injected" in failed[-1].error
    assert all(o[-1].finish_reason == "length" and sum(len(x.token_ids) for x in o) == 12 for o in oks)
    engine.fault = None
    again = asyncio.run(collect(engine, "again", bad, params, d))
    assert again[-1].finish_reason == "length"


def test_a_failing_step_fails_its_requests_and_the_next_ones_run(llm, engine, monkeypatch):
    real = llm.engine.step
    calls = {"n": 0}

    def flaky():
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("step broke")
        return real()

    monkeypatch.setattr(llm.engine, "step", flaky)
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    d = llm.make_decoding("ar")
    ids = llm.encode(PROMPTS[1])
    failed = asyncio.run(collect(engine, "x", ids, params, d))
    assert failed[-1].finish_reason == "error" and "step broke" in failed[-1].error
    ok = asyncio.run(collect(engine, "y", ids, params, d))
    assert ok[-1].finish_reason == "length"


def test_drain_aborts_what_runs_past_the_timeout_and_refuses_new_requests(llm, engine):
    ids = llm.encode(PROMPTS[2])
    d = llm.make_decoding("ar")

    async def main():
        stream = engine.generate("slow", ids, SamplingParams(temperature=0, max_tokens=1500, ignore_eos=True), d)
        await stream.__anext__()
        engine.drain(0.05)
        deltas = [x async for x in stream]
        with pytest.raises(RuntimeError, match="not accepting"):
            await engine.generate("late", ids, SamplingParams(max_tokens=2), d).__anext__()
        return deltas

    deltas = asyncio.run(main())
    assert deltas[-1].finish_reason == "abort"
    assert sum(len(x.token_ids) for x in deltas) < 1500
