"""`idlm serve` on the embedded model with its shipped adapter: R-ISD through the server gives AR's tokens, greedy,
token for token, with AR's logprobs (up to many-row vs one-row rounding)."""
from __future__ import annotations

import pytest
from openai import OpenAI

from conftest import CHAT_PROMPTS, requires_embedded
from serve_helpers import Server


@pytest.fixture(scope="module")
def client():
    s = Server("--decoding", "ar", "--kv-cache-tokens", "8192")
    yield OpenAI(base_url=f"{s.url}/v1", api_key="unused", max_retries=0, timeout=300)
    assert s.stop() == 0, s.log


@requires_embedded
def test_risd_through_the_server_equals_ar_with_ar_logprobs(client):
    model = client.models.list().data[0].id
    kw = dict(model=model, max_tokens=48, temperature=0, logprobs=True, top_logprobs=2)
    for prompt in CHAT_PROMPTS[:4]:
        messages = [{"role": "user", "content": prompt}]
        ar = client.chat.completions.create(messages=messages, extra_body={"decoding": "ar", "ignore_eos": True}, **kw)
        for stride in (3, 4):
            risd = client.chat.completions.create(messages=messages, **kw, extra_body={
                "decoding": "risd", "stride": stride, "ignore_eos": True})
            a, r = ar.choices[0], risd.choices[0]
            assert r.message.content == a.message.content, prompt
            assert risd.model_extra["idlm"]["decoding"] == "risd" and risd.model_extra["idlm"]["stride"] == stride
            assert [t.token for t in r.logprobs.content] == [t.token for t in a.logprobs.content]
            assert "".join(t.token for t in a.logprobs.content) == a.message.content  # one text piece per token
            assert [t.logprob for t in r.logprobs.content] == pytest.approx([t.logprob for t in a.logprobs.content],
                                                                            abs=2e-3)
    streamed = "".join(ch.choices[0].delta.content or "" for ch in client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": CHAT_PROMPTS[0]}], max_tokens=48, temperature=0,
        stream=True, extra_body={"decoding": "risd", "ignore_eos": True}))
    plain = client.chat.completions.create(model=model, messages=[{"role": "user", "content": CHAT_PROMPTS[0]}],
                                           max_tokens=48, temperature=0, extra_body={"ignore_eos": True})
    assert streamed == plain.choices[0].message.content
    text = client.completions.create(model=model, prompt="The capital of France is", max_tokens=24, temperature=0,
                                     extra_body={"decoding": "risd", "ignore_eos": True}).choices[0].text
    assert text == client.completions.create(model=model, prompt="The capital of France is", max_tokens=24,
                                             temperature=0, extra_body={"ignore_eos": True}).choices[0].text
