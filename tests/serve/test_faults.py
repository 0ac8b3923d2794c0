"""An exception inside one request (the engine loop's fault-injection hook, so the app runs in-process here) is a
500 for that request alone; concurrent requests succeed and the server keeps serving."""
from __future__ import annotations

import concurrent.futures
import threading
import time

import uvicorn

from idlm import LLM
from idlm.bench.serve import free_port
from idlm.engine.async_llm import AsyncLLM
from idlm.serve.api import ServeOptions, create_app
from serve_helpers import tiny_model, tiny_tokenizer  # noqa: F401 (fixtures)
from test_api import request


def test_a_request_that_raises_is_a_500_for_it_alone(tiny_model):  # noqa: F811
    model, _ = tiny_model
    llm = LLM(str(model), adapter="none", kv_cache_tokens=2048)
    engine = AsyncLLM(llm.engine)
    bad = [7, 8, 9, 10, 11]

    def fault(rid: str, ids: list[int]) -> None:
        if ids == bad:
            raise RuntimeError("injected fault")

    engine.fault = fault
    app = create_app(llm, engine, ServeOptions("tiny", "ar"))
    engine.start()
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        while not server.started:
            time.sleep(0.02)
        body = {"model": "tiny", "max_tokens": 16, "temperature": 0, "ignore_eos": True}
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(request, url, "POST", "/v1/completions", {**body, "prompt": p})
                       for p in ([5, 6, 7], bad, "The quick brown fox", [12, 13])]
            results = [f.result() for f in futures]
        assert [r[0] for r in results] == [200, 500, 200, 200]
        assert "injected fault" in results[1][2]["error"]["message"]
        assert results[1][2]["error"]["type"] == "server_error"
        streamed = request(url, "POST", "/v1/completions", {**body, "prompt": bad, "stream": True})
        assert streamed[0] == 200 and "injected fault" in streamed[2]  # the error event, then [DONE]
        assert streamed[2].rstrip().endswith("data: [DONE]")
        code, _, resp = request(url, "POST", "/v1/completions", {**body, "prompt": [5, 6, 7]})
        assert code == 200 and resp["usage"]["completion_tokens"] == 16
        blocks = llm.engine.blocks
        assert blocks.num_free_blocks == blocks.num_blocks
    finally:
        server.should_exit = True
        thread.join(30)
        engine.shutdown()
