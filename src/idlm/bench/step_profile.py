"""Step profile: what an AR step and an R-ISD step spend their time on, with and without fused projections.

Two `LLM`s on the same weights and adapter, one with q/k/v and gate/up fused (`fuse=True`, the default) and one
without, both of one weight format, panel choice and compile setting (compiled: warmed up first, so no step is
timed or profiled while it compiles). Step times come from the cost model's measurement (runner forward + the
decoder's greedy work, every layout interleaved), alternated between the two models over the repeats (medians). The profiler tables come
from real engine steps of one greedy request per decoding: the ops with the most self CPU time, with their
calls per step. JSON + markdown under the output directory.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from torch.profiler import ProfilerActivity, profile

from idlm.bench.results import machine_info
from idlm.bench.results import write_results
from idlm.decoding.sampling import SamplingParams
from idlm.engine.cost_model import CostModel, measure

PROMPT = "Explain what a database index is and when it helps."


def profile_steps(llm, decoding: str, stride: int | None, steps: int, rows: int) -> tuple[list[dict[str, Any]], float]:
    """Top ops (self CPU time) over `steps` engine steps of one greedy request; and the mean step seconds."""
    d = llm.make_decoding(decoding, stride)
    seq = llm.engine.add_request(llm.apply_chat_template([{"role": "user", "content": PROMPT}]),
                                 SamplingParams(temperature=0, max_tokens=4 * steps + 64, ignore_eos=True), d)
    try:
        for _ in range(6):  # prefill and warm-up
            llm.engine.step()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            t0 = time.perf_counter()
            for _ in range(steps):
                llm.engine.step()
            seconds = (time.perf_counter() - t0) / steps
    finally:
        llm.engine.abort(seq)
    total = sum(e.self_cpu_time_total for e in prof.key_averages())
    top = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:rows]
    return [{"op": e.key, "calls_per_step": round(e.count / steps, 1),
             "ms_per_step": round(e.self_cpu_time_total / 1000 / steps, 3),
             "share": round(e.self_cpu_time_total / total, 3)} for e in top], seconds


def run_profile_bench(args: argparse.Namespace) -> dict[str, Any]:
    from idlm import LLM

    batches = [int(b) for b in args.batch.split(",")]
    quantize = None if args.quantize == "none" else args.quantize
    llms = {name: LLM(args.model, adapter=args.adapter, fuse=fuse, quantize=quantize, panel=args.panel,
                      compile=args.compile == "on")
            for name, fuse in (("separate", False), ("fused", True))}
    stride = args.stride
    if args.compile == "on":  # every class of step compiled before anything is timed or profiled
        for llm in llms.values():
            llm.warm_up("risd", stride)
    times: dict[tuple[str, str, int], list[float]] = {}
    for rep in range(args.repeats):
        for name, llm in llms.items():
            cost: CostModel = measure(llm.engine, [llm.make_decoding("risd", stride)], batches, repeats=1)
            for layout, by_batch in cost.seconds.items():
                for b, s in by_batch.items():
                    times.setdefault((name, layout, b), []).append(s)
        print(f"repeat {rep + 1}/{args.repeats} measured", file=sys.stderr)
    step_rows = []
    for (name, layout, b), ts in sorted(times.items(), key=lambda kv: (kv[0][2], kv[0][1], kv[0][0])):
        if name != "fused":
            continue
        sep = statistics.median(times[("separate", layout, b)])
        fused = statistics.median(ts)
        step_rows.append({"layout": layout, "batch": b, "separate_ms": round(sep * 1000, 2),
                          "fused_ms": round(fused * 1000, 2), "fused_vs_separate": round(fused / sep, 3)})
    tables = {}
    for name, llm in llms.items():
        for decoding in ("ar", "risd"):
            rows, seconds = profile_steps(llm, decoding, stride, args.steps, args.rows)
            tables[f"{name} {decoding}"] = {"step_ms": round(seconds * 1000, 2), "ops": rows}
    result = {"benchmark": "profile", "command": "idlm bench profile " + " ".join(sys.argv[3:]), "model": args.model,
              "quantize": args.quantize, "panel": args.panel, "compile": args.compile, "stride": stride,
              "repeats": args.repeats, "machine": machine_info("cpu"),
              "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "steps": step_rows, "profiles": tables}
    write_results(result, Path(args.out), "profile", _markdown(result))
    return result


def _markdown(result: dict[str, Any]) -> str:
    m = result["machine"]
    out = ["| step layout | batch | separate q/k/v, gate/up (ms) | fused (ms) | fused / separate |", "|---|---|---|---|---|"]
    out += [f"| {r['layout']} | {r['batch']} | {r['separate_ms']} | {r['fused_ms']} | {r['fused_vs_separate']} |"
            for r in result["steps"]]
    for name, t in result["profiles"].items():
        out += ["", f"**{name}** (profiled steps, {t['step_ms']} ms per step under the profiler)", "",
                "| op | calls / step | self ms / step | share |", "|---|---|---|---|"]
        out += [f"| `{r['op']}` | {r['calls_per_step']} | {r['ms_per_step']} | {r['share']} |" for r in t["ops"]]
    out += ["", f"{m['cpu']} ({m['cores']} cores, {m['torch_threads']} torch threads, capability {m['cpu_capability']}), "
                f"torch {m['torch']}; weights {result['quantize']}, panel {result['panel']}, compiled "
                f"{result['compile']}; R-ISD stride {result['stride']}; step times: median of {result['repeats']} "
                f"alternated measurements; command: `{result['command']}`"]
    return "\n".join(out) + "\n"
