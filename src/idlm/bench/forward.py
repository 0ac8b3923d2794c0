"""Cost of one forward as a function of query rows per sequence and batch size.

This is what ISD pays per step (1 row for AR, N for a cold start, 2N-1 for a verify round) and what
decides whether the speed-up follows tokens per forward (memory-bound: extra rows nearly free) or
falls behind it (compute-bound). Also answers whether padding cold starts to 2N-1 rows (fixed shapes)
costs anything here.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from idlm.bench.results import machine_info
from idlm.bench.results import write_results


def time_forward(model, kv, rows: int, batch: int, context: int, repeats: int) -> float:
    """Median seconds of one forward: `batch` sequences, each `rows` new rows after `context` cached tokens."""
    from idlm.engine.block_manager import BlockManager
    from idlm.models.attention import PagedAttention

    dev = next(model.parameters()).device
    blocks = BlockManager(kv.num_blocks, kv.block_size)
    tables: list[list[int]] = [[] for _ in range(batch)]
    for t in tables:  # a pretend-cached prefix (values do not matter for timing) and the new rows
        if not blocks.grow(t, context + rows):
            raise ValueError(f"the KV pool cannot hold {batch} x {context + rows} tokens")
    ids = torch.randint(0, model.config.vocab_size, (batch * rows,), device=dev)
    pos = torch.arange(context, context + rows, device=dev).repeat(batch)
    times = []
    with torch.inference_mode():
        for i in range(repeats + 2):
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            meta = PagedAttention.build(kv.k, kv.v, kv.block_size, tables, [context] * batch,
                                        [rows] * batch, dev)
            h = model(ids, pos, meta)
            model.logits(h)  # every row's logits: ISD needs them all
            if dev.type == "cuda":
                torch.cuda.synchronize()
            if i >= 2:
                times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run_forward_bench(args: argparse.Namespace) -> dict[str, Any]:
    from idlm import LLM

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    llm = LLM(args.model, adapter="none", dtype=args.dtype, device=device)
    model, kv = llm.model, llm.engine.kv
    rows_list = [int(x) for x in args.rows.split(",")]
    batches = [int(x) for x in args.batch.split(",")]
    table = []
    for b in batches:
        base = None
        for q in rows_list:
            sec = time_forward(model, kv, q, b, args.context, args.repeats)
            base = base or sec
            table.append({"batch": b, "rows_per_seq": q, "ms": round(sec * 1000, 3), "x_cost_of_1_row": round(sec / base, 3)})
            print(f"batch {b:3d} rows {q:3d}: {sec * 1000:8.2f} ms  x{sec / base:.2f}", file=sys.stderr)
    result = {"benchmark": "forward", "model": args.model, "dtype": str(llm.dtype).replace("torch.", ""),
              "context": args.context, "machine": machine_info(device),
              "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "rows": table}
    lines = ["| batch | rows per sequence | ms per forward | x cost of 1 row |", "|---|---|---|---|"]
    lines += [f"| {r['batch']} | {r['rows_per_seq']} | {r['ms']} | {r['x_cost_of_1_row']} |" for r in table]
    write_results(result, Path(args.out), "forward", "\n".join(lines) + "\n")
    return result
