"""Serving benchmark: `idlm serve` driven over HTTP by an async streaming client at several concurrencies.

The server runs as users run it (a subprocess); one engine serves every decoding compared (each request names
its decoding), and each repeat runs every (concurrency, decoding) pair in turn, so they share the machine's
state. A level of concurrency c keeps c streaming chat requests in flight over the held-out prompts (greedy,
EOS ignored, `max_tokens` each). Per pair: total tok/s (all tokens / wall time), tok/s per request, and
time to first token and inter-token latency (the gap between token-carrying events, shared by their tokens),
p50 and p99. JSON + markdown + a PNG plot under the output directory.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from idlm.bench.decode import heldout_prompts
from idlm.bench.results import machine_info
from idlm.bench.results import write_results


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`idlm serve` in a subprocess on 127.0.0.1 at a free port, ready when it logs its URL; stderr kept in `log`."""

    def __init__(self, *args: str, echo: bool = False, timeout: float = 600.0):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([sys.executable, "-m", "idlm.cli", "serve", "--port", str(self.port), *args],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        ready = threading.Event()

        def read() -> None:
            for line in self.proc.stderr:
                self.lines.append(line)
                if echo:
                    sys.stderr.write(line)
                if "ready at http://" in line:
                    ready.set()

        threading.Thread(target=read, daemon=True).start()
        if not ready.wait(timeout) or self.proc.poll() is not None:
            self.stop()
            raise RuntimeError("idlm serve did not start:\n" + self.log)

    @property
    def log(self) -> str:
        return "".join(self.lines)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 120.0) -> int:
        """Signal the server (SIGTERM: drain and exit) and return its exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


async def _read_body(reader: asyncio.StreamReader):
    """Yield the lines of a chunked (or plain) HTTP/1.1 body as they arrive."""
    buf = b""
    while True:
        size_line = await reader.readline()
        if not size_line:
            return
        size = int(size_line.strip() or b"0", 16)
        if size == 0:
            return
        buf += await reader.readexactly(size)
        await reader.readexactly(2)
        *lines, buf = buf.split(b"\n")
        for line in lines:
            yield line.decode()


async def stream_request(host: str, port: int, body: dict[str, Any]) -> dict[str, Any]:
    """One streamed chat request: times of its token-carrying events and their token counts."""
    reader, writer = await asyncio.open_connection(host, port)
    payload = json.dumps({**body, "stream": True}).encode()
    writer.write(f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n".encode() + payload)
    await writer.drain()
    start = time.perf_counter()
    status = (await reader.readline()).decode()
    if " 200 " not in status:
        raise RuntimeError(f"server answered {status.strip()}: {(await reader.read()).decode()[:300]}")
    while (await reader.readline()) not in (b"\r\n", b""):
        pass
    events: list[tuple[float, int]] = []
    stats: dict[str, Any] = {}
    async for line in _read_body(reader):
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        chunk = json.loads(line[6:])
        n = len(chunk.get("idlm", {}).get("kinds", []))
        if n:
            events.append((time.perf_counter() - start, n))
        stats = chunk.get("idlm", {}).get("stats", stats)
    writer.close()
    return {"events": events, "seconds": time.perf_counter() - start, "stats": stats}


async def run_level(host: str, port: int, prompts: list[str], concurrency: int, requests: int, decoding: str,
                    max_tokens: int) -> dict[str, Any]:
    """`requests` streamed requests with `concurrency` in flight."""
    todo = list(range(requests))
    results: list[dict[str, Any]] = []

    async def worker() -> None:
        while todo:
            i = todo.pop(0)
            body = {"messages": [{"role": "user", "content": prompts[i % len(prompts)]}], "max_tokens": max_tokens,
                    "temperature": 0, "ignore_eos": True, "decoding": decoding}
            results.append(await stream_request(host, port, body))

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - t0
    tokens = sum(n for r in results for _, n in r["events"])
    ttft = sorted(r["events"][0][0] for r in results if r["events"])
    itl = sorted(gap for r in results for (a, _), (b, n) in zip(r["events"], r["events"][1:])
                 for gap in [(b - a) / n] * n)
    forwards = sum(r["stats"].get("forwards", 0) for r in results)
    return {"decoding": decoding, "concurrency": concurrency, "requests": requests, "tokens": tokens,
            "seconds": round(wall, 3), "tok_per_s": round(tokens / wall, 2),
            "tok_per_s_per_request": round(statistics.median(
                sum(n for _, n in r["events"]) / r["seconds"] for r in results), 2),
            "ttft_p50": _pct(ttft, 50), "ttft_p99": _pct(ttft, 99), "itl_p50": _pct(itl, 50), "itl_p99": _pct(itl, 99),
            "tokens_per_forward": round(tokens / forwards, 3) if forwards else None}


def _pct(xs: list[float], p: float) -> float | None:
    if not xs:
        return None
    return round(xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))], 6)  # microseconds: a tiny model's gaps


def run_serve_bench(args: argparse.Namespace) -> dict[str, Any]:
    levels = [int(x) for x in args.concurrency.split(",")]
    decodings = args.decoding.split(",")
    prompts = heldout_prompts(max(max(levels) * 2, 16))
    server_args = ["--model", args.model, "--kv-cache-tokens", str(args.kv_cache_tokens), "--max-num-seqs",
                   str(max(levels)), "--max-queue", str(4 * max(levels))]
    if args.adapter:
        server_args += ["--adapter", args.adapter]
    server = ServerProcess(*server_args, echo=True)
    port = server.port
    runs: dict[tuple[str, int], list[dict[str, Any]]] = {}
    try:
        asyncio.run(run_level("127.0.0.1", port, prompts, 2, 2, decodings[0], 8))  # warm-up (and auto's costs)
        for rep in range(args.repeats):
            for c in levels:
                for d in decodings:
                    n = args.requests or max(2 * c, 8)
                    row = asyncio.run(run_level("127.0.0.1", port, prompts, c, n, d, args.max_tokens))
                    runs.setdefault((d, c), []).append(row)
                    print(f"repeat {rep + 1}/{args.repeats} concurrency {c:3d} {d:>5}: {row['tok_per_s']:8.2f} tok/s, "
                          f"TTFT p50 {row['ttft_p50']} s, ITL p50 {row['itl_p50']} s", file=sys.stderr)
    finally:
        server.stop()
    rows = []
    for (d, c), rs in runs.items():
        best = sorted(rs, key=lambda r: r["tok_per_s"])[len(rs) // 2]  # the median run
        ar = runs.get(("ar", c))
        ratio = None
        if ar and d != "ar":
            ratio = round(statistics.median(r["tok_per_s"] / a["tok_per_s"] for r, a in zip(rs, ar)), 3)
        rows.append({**best, "vs_ar": ratio, "runs": [r["tok_per_s"] for r in rs]})
    result = {"benchmark": "serve", "command": "idlm bench serve " + " ".join(sys.argv[3:]), "model": args.model,
              "max_tokens": args.max_tokens, "repeats": args.repeats, "machine": machine_info("cpu"),
              "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "rows": rows}
    path = write_results(result, Path(args.out), "serve", _markdown(result))
    _plot(result, path.with_suffix(".png"))
    return result


def _markdown(result: dict[str, Any]) -> str:
    m = result["machine"]
    lines = ["| decoding | concurrency | total tok/s | vs AR | tok/s per request | tokens/forward | TTFT p50 / p99 (s) "
             "| ITL p50 / p99 (s) |", "|---|---|---|---|---|---|---|---|"]
    for r in sorted(result["rows"], key=lambda r: (r["concurrency"], r["decoding"])):
        lines.append(f"| {r['decoding']} | {r['concurrency']} | {r['tok_per_s']} | {r['vs_ar'] or ''} | "
                     f"{r['tok_per_s_per_request']} | {r['tokens_per_forward']} | {r['ttft_p50']} / {r['ttft_p99']} | "
                     f"{r['itl_p50']} / {r['itl_p99']} |")
    lines += ["", f"{m['cpu']} ({m['cores']} cores, capability {m['cpu_capability']}), torch {m['torch']}; "
                  f"{result['max_tokens']} new tokens per request (greedy, EOS ignored), median of {result['repeats']} "
                  f"interleaved repeats; command: `{result['command']}`"]
    return "\n".join(lines) + "\n"


def _plot(result: dict[str, Any], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing (pip install idlm[plots]): no plot", file=sys.stderr)
        return
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for d in sorted({r["decoding"] for r in result["rows"]}):
        rs = sorted((r for r in result["rows"] if r["decoding"] == d), key=lambda r: r["concurrency"])
        cs = [r["concurrency"] for r in rs]
        a.plot(cs, [r["tok_per_s"] for r in rs], marker="o", label=d)
        b.plot(cs, [r["itl_p50"] for r in rs], marker="o", label=d)
    for ax, title in ((a, "total tok/s"), (b, "inter-token latency p50 (s)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent requests")
        ax.set_title(title)
        ax.legend()
    fig.suptitle(f"idlm serve, {result['machine']['cpu']} ({result['machine']['cpu_capability']})")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    print(f"wrote {path}", file=sys.stderr)
