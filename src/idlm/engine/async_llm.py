"""The serving loop: one thread owns the engine; asyncio code (in other threads) submits requests and reads deltas.

A forward takes tens of milliseconds to seconds, so the engine cannot run as an asyncio task (it would block
the event loop for the whole forward). The loop drains an inbox of adds and aborts between steps, runs one
`LLMEngine.step`, and hands every request's new tokens to its asyncio queue with one `call_soon_threadsafe`
per step. Aborts therefore take effect before the next forward; a request whose consumer goes away (client
disconnect, cancelled task) is aborted and its KV blocks are freed within one step.

`run()` serves in the calling thread, `start()` in a new background thread. `idlm serve` runs the loop in the
process's main thread and the HTTP event loop in a background one: on CPU, torch's OpenMP kernels called from
a thread other than the main one ran 25-35% slower here (the embedded model, batch 1: 16-18 vs 24-25 tok/s,
the same with the HTTP server idle), while an asyncio loop in a background thread costs the main thread's
forwards nothing measurable.

Errors stay with their request: validation happens before submission (`LLMEngine.check_request`), an
exception while publishing one request's output fails that request alone, and an exception inside a step
fails the requests of that step (the engine is consistent again once they are aborted) while the loop
keeps serving.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable

from idlm.decoding.adaptive import Adaptive
from idlm.decoding.decoder import TokenLogprob
from idlm.decoding.policy import Decoding
from idlm.decoding.sampling import SamplingParams
from idlm.decoding.stats import RequestStats
from idlm.engine.llm_engine import LLMEngine
from idlm.engine.sequence import Sequence

log = logging.getLogger("idlm.serve")


@dataclass
class Delta:
    """What one step added to a request. The last delta has `finish_reason` (and `stats`, or `error`)."""

    token_ids: list[int] = field(default_factory=list)
    text: str = ""  # text that is safe to show now (a possible stop-string start or partial character waits)
    kinds: list[str] = field(default_factory=list)  # per token: draft, clean or correction
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None  # stop | length | abort | error
    stats: RequestStats | None = None
    error: str | None = None
    forwards: int = 0  # the request's progress so far: forwards, drafts tested and accepted
    drafts_tested: int = 0
    drafts_accepted: int = 0


@dataclass(eq=False)
class _Request:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    decoding: Decoding | Adaptive
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    seq: Sequence | None = None
    sent: int = 0  # output tokens already delivered


@dataclass
class EngineState:
    """What /metrics and the admission check read (a snapshot; reads of ints and lengths, safe from any thread)."""

    waiting: int  # submitted, not yet running (inbox + scheduler queue)
    running: int
    kv_blocks_free: int
    kv_blocks_total: int


class AsyncLLM:
    """`generate()` from asyncio code; the engine runs in its own thread. Start with `start()`."""

    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self._inbox: queue.Queue = queue.Queue()
        self._live: dict[str, _Request] = {}
        self._thread: threading.Thread | None = None
        self._running = False
        self._stopping = False
        self._drain_deadline: float | None = None
        # Fault-injection hook: fault(request_id, prompt_ids) runs before a request's output is published each
        # step; an exception from it fails that request alone (as a bug in its detokenizer or stop check would).
        self.fault: Callable[[str, list[int]], None] | None = None

    # ---- lifecycle -------------------------------------------------------------------------------
    def run(self) -> None:
        """Serve in the calling thread until `shutdown()` (from another thread or a signal handler)."""
        self._running = True
        try:
            self._run()
        finally:
            self._running = False

    def start(self) -> None:
        """Serve in a new background thread."""
        self._running = True
        self._thread = threading.Thread(target=self.run, name="idlm-engine", daemon=True)
        self._thread.start()

    def drain(self, timeout: float) -> None:
        """Stop taking requests; requests still running after `timeout` seconds end with finish_reason abort."""
        self._drain_deadline = time.monotonic() + timeout
        self._inbox.put(("wake", None))

    @property
    def draining(self) -> bool:
        return self._drain_deadline is not None

    def state(self) -> EngineState:
        sched, blocks = self.engine.scheduler, self.engine.blocks
        return EngineState(len(sched.waiting) + self._inbox.qsize(), len(sched.running), blocks.num_free_blocks,
                           blocks.num_blocks)

    def shutdown(self) -> None:
        """Abort whatever is left and stop the loop (joins it if `start()` made the thread)."""
        self._stopping = True
        self._inbox.put(("wake", None))
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
            self._thread = None

    # ---- requests (any thread with an event loop) --------------------------------------------------
    async def generate(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                       decoding: Decoding | Adaptive) -> AsyncIterator[Delta]:
        """Submit a checked request (see `LLMEngine.check_request`) and yield its deltas. The first delta is an
        empty acknowledgement once the engine has taken it; leaving the iteration early aborts the request."""
        if not self._running or self._stopping or self.draining:
            raise RuntimeError("the engine is not accepting requests")
        req = _Request(request_id, prompt_ids, params, decoding, asyncio.get_running_loop(), asyncio.Queue())
        self._inbox.put(("add", req))
        finished = False
        try:
            while True:
                delta: Delta = await req.queue.get()
                finished = delta.finish_reason is not None
                yield delta
                if finished:
                    return
        finally:
            if not finished:
                self._inbox.put(("abort", request_id))

    def abort(self, request_id: str) -> None:
        self._inbox.put(("abort", request_id))

    # ---- the engine thread -----------------------------------------------------------------------
    def _run(self) -> None:
        engine = self.engine
        while True:
            self._take_inbox(block=not engine.has_unfinished() and not self._stopping)
            if self._stopping:
                self._abort_all("abort")
                return
            if self._drain_deadline is not None and time.monotonic() >= self._drain_deadline:
                self._abort_all("abort")
            if not engine.has_unfinished():
                continue
            try:
                engine.step()
            except Exception as e:  # one bad step must not take the server down
                log.exception("engine step failed; failing the requests in flight")
                self._abort_all("error", f"engine step failed: {type(e).__name__}: {e}")
                continue
            self._publish()

    def _take_inbox(self, block: bool) -> None:
        try:
            item = self._inbox.get(timeout=0.5) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            kind, value = item
            if kind == "add":
                self._add(value)
            elif kind == "abort":
                req = self._live.pop(value, None)
                if req is not None and req.seq is not None:
                    self.engine.abort(req.seq)
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                break

    def _add(self, req: _Request) -> None:
        if self._drain_deadline is not None:
            self._send({req: Delta(finish_reason="abort", error="the server is shutting down")})
            return
        try:
            req.seq = self.engine.add_request(req.prompt_ids, req.params, req.decoding)
        except Exception as e:
            log.exception("request %s could not be added", req.request_id)
            self._send({req: Delta(finish_reason="error", error=f"{type(e).__name__}: {e}")})
            return
        self._live[req.request_id] = req
        self._send({req: Delta()})

    def _publish(self) -> None:
        out: dict[_Request, Delta] = {}
        for rid, req in list(self._live.items()):
            seq = req.seq
            n = seq.num_output_tokens
            if n == req.sent and not seq.finished:
                continue
            try:
                if self.fault is not None:
                    self.fault(rid, req.prompt_ids)
                out[req] = self._delta(req)
            except Exception as e:
                log.exception("request %s failed", rid)
                self.engine.abort(seq)
                out[req] = Delta(finish_reason="error", error=f"{type(e).__name__}: {e}")
            if out[req].finish_reason is not None:
                del self._live[rid]
        self._send(out)

    @staticmethod
    def _delta(req: _Request) -> Delta:
        seq = req.seq
        n = seq.num_output_tokens
        lo = req.sent
        req.sent = n
        st = seq.stats
        return Delta(seq.output_ids[lo:n], seq.read_text_delta(), seq.kinds[lo:n],
                     seq.logprobs[lo:n] if seq.params.logprobs is not None else None,
                     seq.finish_reason if seq.finished else None, st if seq.finished else None,
                     forwards=st.forwards, drafts_tested=st.drafts_tested, drafts_accepted=sum(st.accepted_by_position))

    def _abort_all(self, reason: str, error: str | None = None) -> None:
        out = {}
        for req in self._live.values():
            if req.seq is not None and not req.seq.finished:
                self.engine.abort(req.seq)
            out[req] = Delta(finish_reason=reason, error=error, stats=req.seq.stats if req.seq else None)
        self._live.clear()
        self._send(out)

    @staticmethod
    def _send(out: dict[_Request, Delta]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, Delta]]] = {}
        for req, delta in out.items():
            by_loop.setdefault(req.loop, []).append((req.queue, delta))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, items)
            except RuntimeError:  # the loop is closed: nobody is listening any more
                pass


def _deliver(items: list[tuple[asyncio.Queue, Delta]]) -> None:
    for q, delta in items:
        q.put_nowait(delta)
