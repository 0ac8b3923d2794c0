"""`idlm serve` on a tiny model, driven by the real `openai` client and by raw HTTP: OpenAI semantics, every bad
request kind, disconnects (KV blocks freed, seen through /metrics), the queue bound, 64 concurrent streams equal to
the same requests alone, SIGTERM draining."""
from __future__ import annotations

import concurrent.futures
import http.client
import json
import signal
import socket
import subprocess
import sys
import time

import pytest
from openai import OpenAI

from serve_helpers import Server, tiny_model, tiny_tokenizer  # noqa: F401 (fixtures)

SERVED = "tiny"


@pytest.fixture(scope="module")
def server(tiny_model):  # noqa: F811
    model, adapter = tiny_model
    s = Server("--model", str(model), "--adapter", str(adapter), "--decoding", "ar", "--served-model-name", SERVED,
               "--kv-cache-tokens", "8192", "--max-model-len", "512", compile=True)  # serve's default: compiled
    assert "compiled step graphs" in s.log
    yield s
    assert s.stop() == 0, s.log


@pytest.fixture(scope="module")
def client(server):
    return OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)


def request(url: str, method: str, path: str, body=None, headers=None, raw: bytes | None = None):
    """(status, headers, parsed JSON or text) of one plain HTTP request."""
    host = url.removeprefix("http://")
    conn = http.client.HTTPConnection(host, timeout=120)
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
    r = conn.getresponse()
    text = r.read().decode()
    conn.close()
    try:
        return r.status, dict(r.getheaders()), json.loads(text)
    except json.JSONDecodeError:
        return r.status, dict(r.getheaders()), text


class Stream:
    """A raw streaming request whose connection the test can drop at any moment."""

    def __init__(self, url: str, path: str, body: dict):
        self.conn = http.client.HTTPConnection(url.removeprefix("http://"), timeout=120)
        self.conn.request("POST", path, body=json.dumps({**body, "stream": True}),
                          headers={"Content-Type": "application/json"})

    def open(self) -> "Stream":
        self.response = self.conn.getresponse()
        assert self.response.status == 200, self.response.read()
        return self

    def events(self):
        for line in self.response:
            line = line.decode().strip()
            if line.startswith("data: "):
                yield line[6:]

    def close(self) -> None:
        self.conn.sock.close() if self.conn.sock else None
        self.conn.close()


def chat(content: str, **kw) -> dict:
    return {"model": SERVED, "messages": [{"role": "user", "content": content}], **kw}


# ---- OpenAI semantics through the openai client ---------------------------------------------------------------
def test_chat_and_completions(client, server):
    models = client.models.list().data
    assert [m.id for m in models] == [SERVED]
    r = client.chat.completions.create(model=SERVED, messages=[{"role": "user", "content": "The quick brown fox"}],
                                       max_tokens=12, temperature=0)
    c = r.choices[0]
    assert r.object == "chat.completion" and r.model == SERVED and c.index == 0 and c.message.role == "assistant"
    assert c.finish_reason in ("stop", "length") and isinstance(c.message.content, str)
    assert r.usage.completion_tokens >= 1 and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.model_extra["idlm"]["forwards"] >= 1 and r.model_extra["idlm"]["decoding"] == "ar"
    # content as a list of text parts gives the same prompt
    parts = client.chat.completions.create(model=SERVED, max_tokens=12, temperature=0, messages=[
        {"role": "user", "content": [{"type": "text", "text": "The quick "}, {"type": "text", "text": "brown fox"}]}])
    assert parts.choices[0].message.content == c.message.content
    t = client.completions.create(model=SERVED, prompt="The quick brown fox", max_tokens=10, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert t.object == "text_completion" and t.choices[0].finish_reason == "length"
    assert t.usage.completion_tokens == 10
    batch = client.completions.create(model=SERVED, prompt=["The quick", "What is 2 + 2?"], max_tokens=5,
                                      temperature=0, n=2, extra_body={"ignore_eos": True})
    assert [ch.index for ch in batch.choices] == [0, 1, 2, 3]
    assert batch.choices[0].text == batch.choices[1].text  # greedy: both choices agree
    ids = client.completions.create(model=SERVED, prompt=[5, 6, 7, 8], max_tokens=3, temperature=0)
    assert ids.usage.prompt_tokens == 4


def test_streaming_matches_non_streaming(client):
    kw = dict(model=SERVED, messages=[{"role": "user", "content": "Write a haiku about the sea."}], max_tokens=24,
              temperature=0, extra_body={"ignore_eos": True})
    full = client.chat.completions.create(**kw).choices[0].message.content
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == full
    finals = [ch for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].choices[0].finish_reason == "length"
    assert finals[0].model_extra["idlm"]["stats"]["generated_tokens"] == 24
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 24
    text = client.completions.create(model=SERVED, prompt="The quick", max_tokens=8, temperature=0, stream=True)
    assert len([ch.choices[0].text for ch in text]) >= 2


def test_stop_strings(client):
    base = client.completions.create(model=SERVED, prompt="The quick brown", max_tokens=30, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text
    stop = base[len(base) // 2: len(base) // 2 + 2]
    assert stop.strip(), base
    r = client.completions.create(model=SERVED, prompt="The quick brown", max_tokens=30, temperature=0, stop=[stop],
                                  extra_body={"ignore_eos": True}).choices[0]
    assert r.finish_reason == "stop" and stop not in r.text and base.startswith(r.text)
    streamed = client.completions.create(model=SERVED, prompt="The quick brown", max_tokens=30, temperature=0,
                                         stop=stop, stream=True, extra_body={"ignore_eos": True})
    assert "".join(ch.choices[0].text for ch in streamed) == r.text


def test_n_choices_seeded_and_streamed(client):
    kw = dict(model=SERVED, messages=[{"role": "user", "content": "The quick brown fox"}], max_tokens=16, n=3,
              temperature=1.0, seed=7)
    a = client.chat.completions.create(**kw)
    b = client.chat.completions.create(**kw)
    texts = [c.message.content for c in a.choices]
    assert [c.index for c in a.choices] == [0, 1, 2] and texts == [c.message.content for c in b.choices]
    assert len(set(texts)) > 1  # choice i draws with seed + i
    one = client.chat.completions.create(**{**kw, "n": 1, "seed": 8}).choices[0].message.content
    assert one == texts[1]
    streamed = {0: "", 1: "", 2: ""}
    for ch in client.chat.completions.create(stream=True, **kw):
        for c in ch.choices:
            streamed[c.index] += c.delta.content or ""
    assert [streamed[i] for i in range(3)] == texts
    per_choice = [c["generated_tokens"] for c in a.model_extra["idlm"]["choices"]]
    assert a.usage.completion_tokens == sum(per_choice) and a.model_extra["idlm"]["generated_tokens"] == sum(per_choice)


def test_logprobs_formats(client):
    r = client.chat.completions.create(model=SERVED, messages=[{"role": "user", "content": "The quick"}],
                                       max_tokens=6, temperature=0, logprobs=True, top_logprobs=3,
                                       extra_body={"ignore_eos": True})
    content = r.choices[0].logprobs.content
    assert len(content) == 6 == r.usage.completion_tokens  # token texts: checked on a real tokenizer (embedded)
    for t in content:
        assert t.logprob <= 0 and len(t.top_logprobs) == 3 and t.bytes == list(t.token.encode())
        assert t.top_logprobs[0].logprob == pytest.approx(t.logprob, abs=1e-6)  # greedy: the token is the top one
    c = client.completions.create(model=SERVED, prompt="The quick", max_tokens=5, temperature=0, logprobs=2,
                                  extra_body={"ignore_eos": True}).choices[0]
    lp = c.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 5
    assert lp.text_offset[0] == 0 and all(len(t) <= 2 for t in lp.top_logprobs)


# ---- bad input --------------------------------------------------------------------------------------------------
BAD = [
    ("/v1/chat/completions", None, b"{not json", 400, None),
    ("/v1/chat/completions", [1, 2], None, 400, None),
    ("/v1/chat/completions", {"model": SERVED}, None, 400, "messages"),
    ("/v1/chat/completions", chat("x", temperature=5), None, 400, "temperature"),
    ("/v1/chat/completions", chat("x", max_tokens=0), None, 400, "max_tokens"),
    ("/v1/chat/completions", chat("x", n=0), None, 400, "n"),
    ("/v1/chat/completions", chat("x", top_p=0), None, 400, "top_p"),
    ("/v1/chat/completions", chat("x", tools=[{"type": "function", "function": {"name": "f"}}]), None, 400, "tools"),
    ("/v1/chat/completions", chat("x", response_format={"type": "json_object"}), None, 400, "response_format"),
    ("/v1/chat/completions", chat("x", logit_bias={"5": 10}), None, 400, "logit_bias"),
    ("/v1/chat/completions", chat("x", frobnicate=1), None, 400, "frobnicate"),
    ("/v1/chat/completions", chat("x", top_logprobs=2), None, 400, "top_logprobs"),
    ("/v1/chat/completions", chat("x", decoding="beam"), None, 400, "decoding"),
    ("/v1/chat/completions", chat("x", stop=["a", "b", "c", "d", "e"]), None, 400, "stop"),
    ("/v1/chat/completions", chat("x", max_tokens=100000), None, 400, "max_tokens"),
    ("/v1/chat/completions", {"model": SERVED, "messages": [{"role": "tool", "content": "x"}]}, None, 400, "messages"),
    ("/v1/chat/completions", {"model": SERVED, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:"}}]}]}, None, 400, "messages"),
    ("/v1/chat/completions", chat("x", model="gpt-4"), None, 404, "model"),
    ("/v1/completions", {"model": SERVED, "prompt": "x", "echo": True}, None, 400, "echo"),
    ("/v1/completions", {"model": SERVED, "prompt": "x", "best_of": 3}, None, 400, "best_of"),
    ("/v1/completions", {"model": SERVED, "prompt": [1, 99999]}, None, 400, "prompt"),
    ("/v1/completions", {"model": SERVED, "prompt": []}, None, 400, "prompt"),
    ("/v1/completions", {"model": SERVED, "prompt": "x " * 600}, None, 400, "prompt"),
]


@pytest.mark.parametrize("path,body,raw,status,param", BAD, ids=[f"{i}-{b[3]}" for i, b in enumerate(BAD)])
def test_bad_request_gets_an_error_object(server, path, body, raw, status, param):
    code, _, resp = request(server.url, "POST", path, body, raw=raw)
    assert code == status, resp
    err = resp["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param:
        assert err["param"] == param, err
    ok, _, good = request(server.url, "POST", "/v1/chat/completions", chat("still there?", max_tokens=2))
    assert ok == 200 and good["choices"][0]["message"]["content"] is not None


def test_unknown_route_and_health(server):
    code, _, resp = request(server.url, "GET", "/v1/nothing")
    assert code == 404 and resp["error"]["type"] == "not_found_error"
    code, _, resp = request(server.url, "GET", "/v1/chat/completions")
    assert code == 405 and "error" in resp
    code, _, resp = request(server.url, "GET", "/health")
    assert code == 200 and resp == {"status": "ok"}
    code, _, page = request(server.url, "GET", "/")
    assert code == 200 and "<title>idlm</title>" in page


def test_api_key(tiny_model):  # noqa: F811
    model, _ = tiny_model
    s = Server("--model", str(model), "--adapter", "none", "--api-key", "sesame", "--kv-cache-tokens", "2048")
    try:
        code, _, resp = request(s.url, "POST", "/v1/chat/completions", chat("x", max_tokens=2, model=None))
        assert code == 401 and resp["error"]["code"] == "invalid_api_key"
        code, _, _ = request(s.url, "GET", "/v1/models")
        assert code == 401
        code, _, resp = request(s.url, "POST", "/v1/chat/completions", chat("x", max_tokens=2, model=None),
                                headers={"Authorization": "Bearer sesame"})
        assert code == 200, resp
        good = OpenAI(base_url=f"{s.url}/v1", api_key="sesame", max_retries=0)
        assert good.completions.create(model=good.models.list().data[0].id, prompt="x", max_tokens=2).choices
    finally:
        assert s.stop() == 0, s.log


# ---- disconnects, the queue bound ----------------------------------------------------------------------------
def test_disconnects_free_kv_blocks_and_the_queue_is_bounded(tiny_model):  # noqa: F811
    model, _ = tiny_model
    s = Server("--model", str(model), "--adapter", "none", "--served-model-name", SERVED, "--max-num-seqs", "1",
               "--max-queue", "1",
               "--kv-cache-tokens", "4096", "--max-model-len", "4096")
    try:
        start = s.metrics()
        free = start["idlm_kv_blocks_free"]
        long = {"max_tokens": 3000, "ignore_eos": True, "temperature": 0}
        running = Stream(s.url, "/v1/chat/completions", chat("The quick brown fox", **long)).open()
        events = running.events()
        next(events), next(events)  # role chunk, first tokens
        assert s.metrics()["idlm_kv_blocks_free"] < free
        queued = Stream(s.url, "/v1/chat/completions", chat("What is 2 + 2?", **long))
        m = s.wait_for(lambda m: m["idlm_queue_depth"] == 1)
        assert m["idlm_queue_depth"] == 1 and m["idlm_running_requests"] == 1
        code, headers, resp = request(s.url, "POST", "/v1/completions", {"prompt": "x", "max_tokens": 2})
        assert code == 503 and headers.get("retry-after") == "1" and resp["error"]["code"] == "queue_full"
        queued.close()  # gone while queued (nothing was ever written to it)
        m = s.wait_for(lambda m: m["idlm_queue_depth"] == 0)
        assert m["idlm_queue_depth"] == 0
        # a non-streaming request that leaves while queued
        conn = http.client.HTTPConnection(s.url.removeprefix("http://"), timeout=30)
        conn.request("POST", "/v1/completions", body=json.dumps({"prompt": "x", **long}),
                     headers={"Content-Type": "application/json"})
        assert s.wait_for(lambda m: m["idlm_queue_depth"] == 1)["idlm_queue_depth"] == 1
        conn.sock.close()
        assert s.wait_for(lambda m: m["idlm_queue_depth"] == 0)["idlm_queue_depth"] == 0
        running.close()  # gone mid-stream
        m = s.wait_for(lambda m: m["idlm_running_requests"] == 0 and m["idlm_kv_blocks_free"] == free)
        assert m["idlm_kv_blocks_free"] == free and m["idlm_running_requests"] == 0
        assert m['idlm_requests_total{finish_reason="none",status="aborted"}'] == 3
        assert m['idlm_requests_total{finish_reason="none",status="rejected"}'] == 1
        code, _, _ = request(s.url, "POST", "/v1/completions", {"prompt": "x", "max_tokens": 2})
        assert code == 200
    finally:
        assert s.stop() == 0, s.log


# ---- concurrency: batched == alone ----------------------------------------------------------------------------
def test_64_concurrent_streams_equal_the_same_requests_alone(server, client):
    prompts = [f"{w} {i}" for i, w in enumerate(["The quick brown fox", "What is 2 + 2?", "Write a haiku"] * 22)][:64]

    def run(p: str) -> str:
        text = ""
        for ch in client.chat.completions.create(model=SERVED, messages=[{"role": "user", "content": p}],
                                                 max_tokens=64, temperature=0, stream=True):
            if ch.choices:
                text += ch.choices[0].delta.content or ""
        return text

    alone = [run(p) for p in prompts]
    with concurrent.futures.ThreadPoolExecutor(64) as pool:
        together = list(pool.map(run, prompts))
    assert together == alone
    assert len(set(alone)) > 1


# ---- shutdown -------------------------------------------------------------------------------------------------
def test_sigterm_ends_streams_cleanly_and_exits_0(tiny_model):  # noqa: F811
    model, _ = tiny_model
    s = Server("--model", str(model), "--adapter", "none", "--served-model-name", SERVED, "--drain-timeout", "1",
               "--kv-cache-tokens", "8192", "--max-model-len", "4096")
    streams = [Stream(s.url, "/v1/chat/completions", chat(f"The quick {i}", max_tokens=3000, ignore_eos=True)).open()
               for i in range(3)]
    iters = [st.events() for st in streams]
    for it in iters:
        next(it)
        next(it)
    s.proc.send_signal(signal.SIGTERM)
    t0 = time.monotonic()
    for it in iters:
        rest = list(it)
        assert rest[-1] == "[DONE]"
        last = json.loads(rest[-2])
        assert last["choices"][0]["finish_reason"] == "abort"
    assert s.proc.wait(60) == 0, s.log
    assert time.monotonic() - t0 < 30
    assert "Traceback" not in s.log


def test_a_port_in_use_is_a_clear_error(tiny_model):  # noqa: F811
    model, _ = tiny_model
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = subprocess.run([sys.executable, "-m", "idlm.cli", "serve", "--model", str(model), "--adapter", "none",
                               "--port", str(port), "--kv-cache-tokens", "1024"], capture_output=True, text=True,
                              timeout=300)
    assert proc.returncode == 2 and f"could not serve on 127.0.0.1:{port}" in proc.stderr, proc.stderr
