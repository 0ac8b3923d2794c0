"""A soak of 2,000 mixed requests on a tiny model: normal, stopped early (stop strings, small max_tokens),
aborted mid-stream, invalid. Afterwards every KV block is free, the log holds no error, and RSS grew by at most
100 MB over the second 1,000 (the first fill the bounded caches: oneDNN's primitives, one per product shape, and
the allocator's pools; RSS rises by about 150 MB there, then by about 15 MB per 1,000 requests)."""
from __future__ import annotations

import concurrent.futures
import http.client
import json
import random

from serve_helpers import Server, tiny_model, tiny_tokenizer  # noqa: F401 (fixtures)
from test_api import request

TOTAL, WARMUP, WORKERS = 2000, 1000, 16


def one(url: str, i: int) -> str:
    rng = random.Random(i)
    kind = ("normal", "stopped", "aborted", "invalid")[i % 4]
    prompt = rng.choice(["The quick brown fox", "What is 2 + 2?", "Write a haiku about the sea.", "x"]) + f" {i}"
    body = {"model": "tiny", "messages": [{"role": "user", "content": prompt}], "temperature": rng.choice([0, 0.8]),
            "seed": i, "max_tokens": rng.randint(1, 24), "decoding": rng.choice(["ar", "risd"])}
    if kind == "invalid":
        field, value = rng.choice([("temperature", -1), ("n", 0), ("tools", [{"type": "function"}])])
        body[field] = value
        code, _, _ = request(url, "POST", "/v1/chat/completions", body)
        assert code == 400
        return kind
    if kind == "stopped":
        body.update(stop=["e", "a"], max_tokens=64)
    if kind == "aborted":
        conn = http.client.HTTPConnection(url.removeprefix("http://"), timeout=60)
        conn.request("POST", "/v1/chat/completions", body=json.dumps({**body, "stream": True, "max_tokens": 400,
                                                                      "ignore_eos": True}),
                     headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        assert r.status == 200
        r.readline()  # a first event, then leave
        conn.sock.close()
        conn.close()
        return kind
    stream = rng.random() < 0.5
    code, _, resp = request(url, "POST", "/v1/chat/completions", {**body, "stream": stream})
    assert code == 200, resp
    if stream:
        assert resp.rstrip().endswith("data: [DONE]")
    else:
        assert resp["choices"][0]["finish_reason"] in ("stop", "length")
    return kind


def test_soak_of_a_thousand_mixed_requests(tiny_model):  # noqa: F811
    model, adapter = tiny_model
    s = Server("--model", str(model), "--adapter", str(adapter), "--decoding", "ar", "--served-model-name", "tiny",
               "--kv-cache-tokens", "4096", "--max-num-seqs", "16", "--max-queue", "512")
    try:
        free = s.metrics()["idlm_kv_blocks_free"]
        with concurrent.futures.ThreadPoolExecutor(WORKERS) as pool:
            kinds = list(pool.map(lambda i: one(s.url, i), range(WARMUP)))
            warm = s.rss_mb()
            kinds += list(pool.map(lambda i: one(s.url, i), range(WARMUP, TOTAL)))
        assert {k: kinds.count(k) for k in set(kinds)} == {"normal": 500, "stopped": 500, "aborted": 500,
                                                           "invalid": 500}
        m = s.wait_for(lambda m: m["idlm_running_requests"] == 0 and m["idlm_queue_depth"] == 0
                       and m["idlm_kv_blocks_free"] == free, timeout=60)
        assert m["idlm_kv_blocks_free"] == free and m["idlm_running_requests"] == 0
        assert m['idlm_requests_total{finish_reason="none",status="invalid"}'] == 500
        assert m['idlm_requests_total{finish_reason="none",status="aborted"}'] == 500
        assert s.rss_mb() <= warm + 100
    finally:
        assert s.stop() == 0, s.log
    assert "ERROR" not in s.log and "Traceback" not in s.log, s.log
