"""Offline throughput by concurrency: total tok/s, tok/s per request, tokens per forward.

`idlm bench throughput --concurrency 1,4,16,64 --decoding ar,risd [--baseline-src DIR]`. Each concurrency c
serves max(4, 2c) distinct chat requests (greedy, EOS ignored, `--max-tokens` each) through `LLM.chat` with
`max_num_seqs = c`, in two workloads: `chat` (short distinct questions) and `shared-prefix` (the same
questions behind one long system prompt, which the prefix cache can serve). With `--baseline-src`, a second
engine (e.g. a git worktree of an older commit: its `src` dir) runs the same requests in its own process,
interleaved with ours configuration by configuration, so both see the same machine state; the table gives
the ratio and whether the greedy tokens agree.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any


from idlm.bench.decode import bench_prompts
from idlm.bench.results import machine_info
from idlm.bench.results import write_results

SYSTEM = ("You are a careful assistant for a public library. Answer questions about books, authors, reading "
          "programs, opening hours, membership, and research help. Keep answers short, friendly and accurate; "
          "if you are not sure, say so and suggest asking a librarian at the front desk. Do not invent titles, "
          "dates or quotations. When someone asks for recommendations, give at most three, each with one "
          "sentence on why it fits. Use plain language suitable for readers of every age, avoid jargon, and "
          "never share personal information about other library members. Library hours are nine to six on "
          "weekdays and ten to four on Saturdays; the library is closed on Sundays and public holidays. ") * 2


def conversations(n: int, shared_prefix: bool) -> list[list[dict[str, str]]]:
    from idlm.eval.acceptance import HELDOUT_PROMPTS

    questions = bench_prompts(8) + [json.loads(l)["messages"][-1]["content"]
                                    for l in HELDOUT_PROMPTS.read_text().splitlines() if l.strip()]
    out = []
    for i in range(n):
        msgs = [{"role": "user", "content": f"Question {i + 1}: {questions[i % len(questions)]}"}]
        out.append(([{"role": "system", "content": SYSTEM}] if shared_prefix else []) + msgs)
    return out


class Worker:
    """An engine version in its own process (bench/throughput_worker.py on PYTHONPATH=src)."""

    def __init__(self, name: str, src: Path):
        self.name, self.src = name, src
        env = dict(os.environ, PYTHONPATH=str(src))
        script = Path(__file__).with_name("throughput_worker.py")
        self.proc = subprocess.Popen([sys.executable, str(script)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     env=env, text=True)
        self.info = self._read()

    def _read(self) -> dict[str, Any]:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"{self.name} worker ({self.src}) exited: code {self.proc.wait()}")
        return json.loads(line)

    def run(self, cmd: dict[str, Any]) -> dict[str, Any]:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


def run_throughput_bench(args: argparse.Namespace) -> dict[str, Any]:
    concurrencies = [int(x) for x in args.concurrency.split(",")]
    decodings = [d.strip() for d in args.decoding.split(",") if d.strip()]
    workloads = [w.strip() for w in args.workload.split(",") if w.strip()]
    ours = Path(__file__).resolve().parents[2]
    workers = [Worker("current", ours)]
    if args.baseline_src:
        workers.append(Worker("baseline", Path(args.baseline_src).resolve()))
    rows = []
    try:
        for workload in workloads:
            for c in concurrencies:
                convs = conversations(max(4, 2 * c), workload == "shared-prefix")
                for decoding in decodings:
                    cmd = {"concurrency": c, "decoding": decoding, "conversations": convs,
                           "max_tokens": args.max_tokens, "kv_cache_tokens": args.kv_cache_tokens, "model": args.model}
                    runs: dict[str, list[dict[str, Any]]] = {w.name: [] for w in workers}
                    for _ in range(args.repeats):
                        for w in workers:  # interleaved: ours, baseline, ours, baseline ...
                            runs[w.name].append(w.run(cmd))
                    for w in workers:
                        rows.append(_row(w.name, workload, c, decoding, len(convs), runs[w.name]))
                        print(_line(rows[-1]), file=sys.stderr)
                    if len(workers) == 2:
                        a, b = runs["current"][0]["token_ids"], runs["baseline"][0]["token_ids"]
                        rows[-2]["same_tokens_as_baseline"] = sum(x == y for x, y in zip(a, b)) / len(a)
    finally:
        for w in workers:
            w.close()
    for r in rows:
        base = next((b for b in rows if b["engine"] == "baseline" and
                     (b["workload"], b["concurrency"], b["decoding"]) == (r["workload"], r["concurrency"], r["decoding"])),
                    None)
        if base is not None and r["engine"] == "current":
            r["ratio_vs_baseline"] = round(r["total_tok_per_s"] / base["total_tok_per_s"], 3)
    result = {
        "benchmark": "throughput",
        "command": "idlm " + " ".join(sys.argv[1:]) if sys.argv and sys.argv[0].endswith("idlm") else None,
        "model": args.model,
        "max_tokens": args.max_tokens,
        "repeats": args.repeats,
        "engines": {w.name: {"src": str(w.src), **w.info} for w in workers},
        "machine": machine_info("cpu"),
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "rows": rows,
    }
    write_results(result, Path(args.out), "throughput", markdown_table(result))
    return result


def _row(engine: str, workload: str, c: int, decoding: str, n: int, runs: list[dict[str, Any]]) -> dict[str, Any]:
    tok_s = [r["generated_tokens"] / r["seconds"] for r in runs]
    best = runs[tok_s.index(statistics.median(tok_s))] if len(runs) % 2 else runs[0]
    per_req = [len(t) / s for t, s in zip(best["token_ids"], best["request_seconds"]) if s > 0]
    return {
        "engine": engine, "workload": workload, "concurrency": c, "decoding": decoding, "requests": n,
        "total_tok_per_s": round(statistics.median(tok_s), 2),
        "runs_tok_per_s": [round(x, 2) for x in tok_s],
        "tok_per_s_per_request": round(statistics.mean(per_req), 2) if per_req else None,
        "tokens_per_forward": round(best["generated_tokens"] / max(1, sum(best["forwards"])), 3),
        "cached_tokens": best["cached_tokens"], "preemptions": best["preemptions"],
    }


def _line(r: dict[str, Any]) -> str:
    return (f"{r['engine']:>8} {r['workload']:>13} c={r['concurrency']:<3} {r['decoding']:>5}: "
            f"{r['total_tok_per_s']:8.1f} tok/s total, {r['tok_per_s_per_request']} per request, TPF "
            f"{r['tokens_per_forward']}, cached {r['cached_tokens']}")


def markdown_table(result: dict[str, Any]) -> str:
    lines = ["| workload | concurrency | decoding | engine | total tok/s | tok/s per request | TPF | cached prompt "
             "tokens | vs baseline | same tokens |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['workload']} | {r['concurrency']} | {r['decoding']} | {r['engine']} | {r['total_tok_per_s']} "
                     f"| {r['tok_per_s_per_request']} | {r['tokens_per_forward']} | {r['cached_tokens']} | "
                     f"{r.get('ratio_vs_baseline', '')} | {r.get('same_tokens_as_baseline', '')} |")
    m = result["machine"]
    lines += ["", f"{m['cpu']} ({m['cores']} cores, capability {m['cpu_capability']}), torch {m['torch']}; greedy, "
              f"{result['max_tokens']} new tokens per request (EOS ignored), max(4, 2c) requests per concurrency c, "
              f"median of {result['repeats']} interleaved run(s)."]
    for name, e in result["engines"].items():
        lines.append(f"{name}: {e['src']}")
    return "\n".join(lines) + "\n"
