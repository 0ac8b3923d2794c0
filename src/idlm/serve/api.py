"""The OpenAI-compatible HTTP API: chat and text completions (streamed or not), models, health, metrics, the page.

A request is checked completely before it reaches the engine (fields, model name, context, queue room), so
every refusal is a 4xx/503 with OpenAI's error object and costs the engine nothing. Each of its `n` choices is
one engine request (choice i seeded with seed + i). The client is watched for `http.disconnect` while it waits
(queued, running, streaming): when it leaves, its requests are aborted and their KV blocks freed by the engine
thread before the next step.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from typing import Any, AsyncIterator, Callable

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from idlm.decoding.adaptive import Adaptive
from idlm.decoding.decoder import TokenLogprob
from idlm.decoding.policy import Decoding
from idlm.decoding.stats import RequestStats
from idlm.engine.async_llm import AsyncLLM, Delta
from idlm.engine.llm import LLM
from idlm.engine.llm_engine import PromptTooLongError
from idlm.serve.metrics import Metrics
from idlm.serve.protocol import ApiError, ChatRequest, CompletionRequest, Sampling, parse

log = logging.getLogger("idlm.serve")


@dataclass
class ServeOptions:
    served_model_name: str
    decoding: str  # the default decoding of requests that name none
    stride: int | None = None
    api_key: str | None = None
    max_queue: int = 256  # requests waiting to run beyond which new ones get 503
    drain_timeout: float = 30.0  # SIGTERM: seconds in-flight requests may still run


@dataclass
class Choice:
    """One engine request's accumulated output."""

    index: int
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    kinds: list[str] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    stats: RequestStats | None = None
    error: str | None = None


class Api:
    """The routes' shared state: the model, the engine loop, options and metrics."""

    def __init__(self, llm: LLM, engine: AsyncLLM, options: ServeOptions):
        self.llm, self.engine, self.options = llm, engine, options
        self.metrics = Metrics(engine.state)
        self.default = llm.make_decoding(options.decoding, options.stride)
        self.token_text = lru_cache(maxsize=65536)(self._token_text)

    def _token_text(self, token_id: int) -> str:
        return self.llm.tokenizer.decode([token_id], skip_special_tokens=False)

    # ---- checks ------------------------------------------------------------------------------------
    def authorize(self, request: Request) -> None:
        key = self.options.api_key
        if key and request.headers.get("authorization") != f"Bearer {key}":
            raise ApiError(401, "invalid or missing API key (Authorization: Bearer KEY)", code="invalid_api_key")

    def check_model(self, name: str | None) -> None:
        if name is not None and name not in (self.options.served_model_name, self.llm.name):
            raise ApiError(404, f"the model {name!r} does not exist; this server serves "
                                f"{self.options.served_model_name!r}", code="model_not_found", param="model")

    def decoding_for(self, req: Sampling) -> Decoding | Adaptive:
        if req.decoding is None and req.stride is None:
            return self.default
        name = req.decoding or self.options.decoding
        if name == "auto":
            if req.stride is not None and req.stride != self.default.stride and isinstance(self.default, Adaptive):
                raise ApiError(400, f"auto runs up to the server's stride ({self.default.stride}); ask risd for a "
                                    "fixed stride", param="stride")
            if isinstance(self.default, Adaptive):
                return self.default
            raise ApiError(400, "auto needs the server to start with --decoding auto", param="decoding")
        try:
            return self.llm.make_decoding(name, req.stride)
        except ValueError as e:
            raise ApiError(400, str(e), param="decoding") from e

    def admit(self, n: int) -> None:
        if self.engine.draining:
            raise ApiError(503, "the server is shutting down", type="server_error", code="shutting_down")
        waiting = self.engine.state().waiting
        if waiting + n > self.options.max_queue:
            raise ApiError(503, f"the server is busy ({waiting} requests waiting); retry later", type="server_error",
                           code="queue_full", headers={"Retry-After": "1"})

    def params_for(self, req: Sampling, prompt_ids: list[int], decoding: Decoding | Adaptive, n: int,
                   prompt_field: str) -> list:
        max_tokens = req.requested_max_tokens()  # type: ignore[attr-defined]
        room = self.engine.engine.room(len(prompt_ids), decoding)
        if room < 1:
            raise ApiError(400, f"the prompt ({len(prompt_ids)} tokens) leaves no room in the context "
                                f"({self.engine.engine.capacity} tokens)", param=prompt_field,
                           code="context_length_exceeded")
        if max_tokens is None:
            max_tokens = room
        params = [req.sampling_params(max_tokens, req.requested_logprobs(), i) for i in range(n)]  # type: ignore
        try:
            self.engine.engine.check_request(prompt_ids, params[0], decoding)
        except PromptTooLongError as e:
            raise ApiError(400, str(e), param="max_tokens", code="context_length_exceeded") from e
        except ValueError as e:
            raise ApiError(400, str(e)) from e
        return params

    # ---- running ---------------------------------------------------------------------------------
    async def start(self, prompt_ids: list[int], params: list, decoding: Decoding | Adaptive,
                    prefix: str) -> list[AsyncIterator[Delta]]:
        """Submit one engine request per choice and wait for the engine to take them."""
        streams = [self.engine.generate(f"{prefix}-{i}", prompt_ids, p, decoding) for i, p in enumerate(params)]
        try:
            for s in streams:
                try:
                    ack = await s.__anext__()
                except RuntimeError as e:  # not accepting (shutting down)
                    raise ApiError(503, str(e), type="server_error", code="shutting_down") from e
                if ack.finish_reason == "abort":
                    raise ApiError(503, ack.error or "the server is shutting down", type="server_error",
                                   code="shutting_down")
                if ack.finish_reason is not None:
                    raise ApiError(500, ack.error or "the engine refused the request", type="server_error")
        except BaseException:
            for s in streams:
                await s.aclose()  # type: ignore[attr-defined]
            raise
        return streams

    def finish_metrics(self, choice: Choice, started: float, aborted: bool = False) -> None:
        status = "aborted" if aborted else ("error" if choice.finish_reason == "error" else "ok")
        self.metrics.finished(status, choice.finish_reason, choice.stats, time.monotonic() - started)


def _merge(choices: list[Choice]) -> dict[str, Any]:
    """The response's `idlm` object: the stats of its choices (each, and summed when n > 1)."""
    stats = [c.stats for c in choices if c.stats is not None]
    if not stats:
        return {}
    if len(stats) == 1:
        return stats[0].to_dict()
    total = RequestStats(decoding=stats[0].decoding, stride=stats[0].stride)
    for s in stats:
        total.merge(s)
    return {**total.to_dict(), "choices": [s.to_dict() for s in stats]}


async def _pump(streams: list[AsyncIterator[Delta]], out: asyncio.Queue) -> None:
    """Forward every choice's deltas into one queue as (choice index, delta); None when all are done."""

    async def one(i: int, s: AsyncIterator[Delta]) -> None:
        try:
            async for d in s:
                await out.put((i, d))
        finally:
            await s.aclose()  # type: ignore[attr-defined]

    try:
        await asyncio.gather(*(one(i, s) for i, s in enumerate(streams)))
    finally:
        await out.put(None)


async def _until_disconnect(receive: Callable) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


class EventStream(Response):
    """Server-sent events from an async iterator of `data:` payloads, watching for http.disconnect the whole
    time (while queued too, when nothing is written): on disconnect the iterator is cancelled and closed."""

    def __init__(self, events: AsyncIterator[str]):  # no body, so no Content-Length (Response's __init__ sets one)
        self.status_code, self.background, self.events = 200, None, events
        self.raw_headers = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
                            (b"x-accel-buffering", b"no")]

    async def __call__(self, scope, receive, send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})

        async def write() -> None:
            async for payload in self.events:
                await send({"type": "http.response.body", "body": f"data: {payload}\n\n".encode(),
                            "more_body": True})
            await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})

        writer = asyncio.ensure_future(write())
        listener = asyncio.ensure_future(_until_disconnect(receive))
        try:
            done, _ = await asyncio.wait({writer, listener}, return_when=asyncio.FIRST_COMPLETED)
            error = writer.exception() if writer in done else None
            if error is not None and not isinstance(error, OSError):  # OSError: the client went away mid-write
                log.error("stream failed: %s: %s", type(error).__name__, error)
        finally:
            for t in (writer, listener):
                t.cancel()
            await asyncio.gather(writer, listener, return_exceptions=True)
            await self.events.aclose()  # type: ignore[attr-defined]


def create_app(llm: LLM, engine: AsyncLLM, options: ServeOptions) -> FastAPI:
    api = Api(llm, engine, options)
    app = FastAPI(title="idlm", docs_url=None, redoc_url=None)
    app.state.api = api

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError) -> JSONResponse:
        if e.status >= 500 and e.status != 503:
            log.error("%s %s: %s", request.method, request.url.path, e.message)
        else:
            api.metrics.rejected("rejected" if e.status == 503 else "invalid")
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return JSONResponse(ApiError(e.status_code, f"{request.method} {request.url.path}: {e.detail}", kind).body(),
                            status_code=e.status_code)

    @app.exception_handler(Exception)
    async def _internal(request: Request, e: Exception) -> JSONResponse:
        log.exception("%s %s failed", request.method, request.url.path)
        return JSONResponse(ApiError(500, f"internal error: {type(e).__name__}: {e}", "server_error").body(),
                            status_code=500)

    async def body_of(request: Request, model: type[Sampling]) -> Sampling:
        api.authorize(request)
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the body is not valid JSON: {e}") from None
        req = parse(model, body)
        api.check_model(req.model)
        return req

    @app.get("/health")
    async def health() -> JSONResponse:
        if engine.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(api.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models(request: Request) -> JSONResponse:
        api.authorize(request)
        return JSONResponse({"object": "list", "data": [{
            "id": options.served_model_name, "object": "model", "created": 0, "owned_by": "idlm",
            "root": llm.name, "max_model_len": engine.engine.capacity, "decoding": options.decoding,
            "adapter": str(llm.adapter_path) if llm.adapter_path else None}]})

    @app.get("/", response_class=HTMLResponse)
    async def page() -> HTMLResponse:
        return HTMLResponse(resources.files("idlm.serve").joinpath("static/index.html").read_text())

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        req = await body_of(request, ChatRequest)
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                    for m in req.messages]  # type: ignore[attr-defined]
        try:
            prompt_ids = llm.apply_chat_template(messages)
        except Exception as e:  # a template that refuses the conversation (roles out of order, ...)
            raise ApiError(400, f"messages: the chat template refused them: {e}", param="messages") from e
        return await run(request, req, [prompt_ids], "chat")

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        req = await body_of(request, CompletionRequest)
        prompts = [llm.encode(p) if isinstance(p, str) else p for p in req.prompts()]  # type: ignore[attr-defined]
        vocab = llm.model.config.vocab_size
        if any(not p for p in prompts):
            raise ApiError(400, "a prompt is empty", param="prompt")
        if any(not 0 <= t < vocab for p in prompts for t in p):
            raise ApiError(400, f"prompt token ids must be in [0, {vocab})", param="prompt")
        return await run(request, req, prompts, "text")

    async def run(request: Request, req: Sampling, prompts: list[list[int]], kind: str) -> Response:
        arrived = time.monotonic()
        decoding = api.decoding_for(req)
        field = "messages" if kind == "chat" else "prompt"
        params = [api.params_for(req, p, decoding, req.n, field) for p in prompts]
        api.admit(req.n * len(prompts))
        rid = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"
        streams: list[AsyncIterator[Delta]] = []
        try:
            for j, (p, ps) in enumerate(zip(prompts, params)):
                streams += await api.start(p, ps, decoding, f"{rid}-{j}")
        except BaseException:
            for s in streams:
                await s.aclose()  # type: ignore[attr-defined]
            raise
        shape = Shape(api, kind, rid, req.model or options.served_model_name, int(time.time()))
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return EventStream(stream_events(api, shape, streams, prompts, arrived, include_usage))
        queue: asyncio.Queue = asyncio.Queue()
        choices = [Choice(i) for i in range(len(streams))]
        pump = asyncio.ensure_future(_pump(streams, queue))
        listener = asyncio.ensure_future(_until_disconnect(request.receive))
        try:
            while True:
                getter = asyncio.ensure_future(queue.get())
                done, _ = await asyncio.wait({getter, listener}, return_when=asyncio.FIRST_COMPLETED)
                if getter not in done:
                    getter.cancel()
                    for c in choices:
                        if c.finish_reason is None:
                            api.finish_metrics(c, arrived, aborted=True)
                    return Response(status_code=499)
                item = getter.result()
                if item is None:
                    break
                i, d = item
                accumulate(choices[i], d, api, arrived)
        finally:
            for t in (pump, listener):
                t.cancel()
            await asyncio.gather(pump, listener, return_exceptions=True)
        failed = [c for c in choices if c.finish_reason == "error"]
        if failed:
            raise ApiError(500, f"the request failed: {failed[0].error}", type="server_error")
        if any(c.finish_reason == "abort" for c in choices):
            raise ApiError(503, "the server aborted the request (shutting down)", type="server_error",
                           code="shutting_down")
        return JSONResponse(shape.response(choices, prompts, req.n))

    return app


def accumulate(choice: Choice, d: Delta, api: Api, arrived: float) -> None:
    first = not choice.token_ids and d.token_ids
    choice.token_ids += d.token_ids
    choice.text += d.text
    choice.kinds += d.kinds
    choice.logprobs += d.logprobs or []
    if first:
        api.metrics.ttft.observe(time.monotonic() - arrived)
    if d.finish_reason is not None:
        choice.finish_reason, choice.stats, choice.error = d.finish_reason, d.stats, d.error
        api.finish_metrics(choice, arrived)


@dataclass
class Shape:
    """Turns deltas and choices into OpenAI's chat or text-completion objects."""

    api: Api
    kind: str  # chat | text
    rid: str
    model: str
    created: int

    def logprobs(self, lps: list[TokenLogprob], ids: list[int], offset: int) -> dict[str, Any] | None:
        text = self.api.token_text
        if self.kind == "chat":
            def entry(t: int, lp: float) -> dict[str, Any]:
                s = text(t)
                return {"token": s, "logprob": lp, "bytes": list(s.encode())}
            return {"content": [{**entry(t, lp.logprob), "top_logprobs": [entry(a, b) for a, b in lp.top]}
                                for t, lp in zip(ids, lps)]}
        tokens = [text(t) for t in ids]
        offsets = []
        for s in tokens:
            offsets.append(offset)
            offset += len(s)
        return {"tokens": tokens, "token_logprobs": [lp.logprob for lp in lps],
                "top_logprobs": [{text(a): b for a, b in lp.top} for lp in lps], "text_offset": offsets}

    def usage(self, choices: list[Choice], prompts: list[list[int]]) -> dict[str, int]:
        p = sum(len(x) for x in prompts)
        c = sum(len(ch.token_ids) for ch in choices)
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    def response(self, choices: list[Choice], prompts: list[list[int]], n: int) -> dict[str, Any]:
        out = []
        for c in choices:
            lp = self.logprobs(c.logprobs, c.token_ids, 0) if c.stats is not None and c.logprobs else None
            body: dict[str, Any] = {"index": c.index, "logprobs": lp, "finish_reason": c.finish_reason}
            if self.kind == "chat":
                body["message"] = {"role": "assistant", "content": c.text}
            else:
                body["text"] = c.text
            out.append(body)
        return {"id": self.rid, "object": "chat.completion" if self.kind == "chat" else "text_completion",
                "created": self.created, "model": self.model, "choices": out,
                "usage": self.usage(choices, prompts), "idlm": _merge(choices)}

    def chunk(self, index: int, text: str | None, d: Delta | None, offset: int, first: bool) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": index}
        if self.kind == "chat":
            delta: dict[str, Any] = {"role": "assistant"} if first else {}
            if text is not None:
                delta["content"] = text
            choice["delta"] = delta
        else:
            choice["text"] = text or ""
        choice["logprobs"] = (self.logprobs(d.logprobs, d.token_ids, offset)
                              if d is not None and d.logprobs else None)
        choice["finish_reason"] = d.finish_reason if d is not None else None
        body = {"id": self.rid, "object": "chat.completion.chunk" if self.kind == "chat" else "text_completion",
                "created": self.created, "model": self.model, "choices": [choice]}
        if d is not None:
            body["idlm"] = {"kinds": d.kinds, "forwards": d.forwards, "drafts_tested": d.drafts_tested,
                            "drafts_accepted": d.drafts_accepted}
            if d.stats is not None:
                body["idlm"]["stats"] = d.stats.to_dict()
        return body


async def stream_events(api: Api, shape: Shape, streams: list[AsyncIterator[Delta]], prompts: list[list[int]],
                        arrived: float, include_usage: bool) -> AsyncIterator[str]:
    """The SSE payloads of a streamed request: a role chunk per choice (chat), a chunk per delta, usage last."""
    queue: asyncio.Queue = asyncio.Queue()
    choices = [Choice(i) for i in range(len(streams))]
    offsets = [0] * len(streams)
    last = [arrived] * len(streams)
    pump = asyncio.ensure_future(_pump(streams, queue))
    try:
        if shape.kind == "chat":
            for c in choices:
                yield json.dumps(shape.chunk(c.index, "", None, 0, first=True))
        while True:
            item = await queue.get()
            if item is None:
                break
            i, d = item
            c = choices[i]
            started = bool(c.token_ids)
            accumulate(c, d, api, arrived)
            if d.token_ids:
                now = time.monotonic()
                if started:  # inter-token latency: the gap since the last delta, shared by its tokens
                    api.metrics.itl.observe((now - last[i]) / len(d.token_ids))
                last[i] = now
            if d.error:
                yield json.dumps({**ApiError(500, f"the request failed: {d.error}", "server_error").body(),
                                  "index": i})
            yield json.dumps(shape.chunk(i, d.text, d, offsets[i], first=False))
            offsets[i] += sum(len(api.token_text(t)) for t in d.token_ids) if d.logprobs else 0
        if include_usage:
            yield json.dumps({"id": shape.rid, "object": "chat.completion.chunk" if shape.kind == "chat"
                              else "text_completion", "created": shape.created, "model": shape.model,
                              "choices": [], "usage": shape.usage(choices, prompts), "idlm": _merge(choices)})
    finally:  # normal end, or the client left (the writer was cancelled): abort what still runs
        pump.cancel()
        await asyncio.gather(pump, return_exceptions=True)
        for c in choices:
            if c.finish_reason is None:
                api.finish_metrics(c, arrived, aborted=True)
