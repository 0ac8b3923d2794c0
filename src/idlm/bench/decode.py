"""Decode benchmark: our AR / ISD / R-ISD against transformers `generate`, same prompts, one run.

Batch 1, greedy, every request forced to `max_tokens` new tokens (EOS ignored) so all rows time the
same amount of work. Prints a table and writes JSON + markdown under the output directory.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from idlm.bench.results import write_results
from idlm.engine.cost_model import machine_key


def machine_info(device: str) -> dict[str, Any]:
    """The machine a figure was measured on, with the CPU capability that picks the kernels."""
    key = machine_key()
    info = {"platform": platform.platform(), "cpu": key["cpu"], "cpu_capability": key["capability"],
            "cores": os.cpu_count(), "torch_threads": key["threads"], "torch": key["torch"],
            "python": platform.python_version(), "device": device}
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def bench_prompts(n: int) -> list[str]:
    prompts = json.loads(resources.files("idlm.data").joinpath("bench_prompts.json").read_text())
    return prompts[:n]


def _median_row(name: str, dtype: str, runs: list[dict[str, float]]) -> dict[str, Any]:
    row = {
        "engine": name,
        "dtype": dtype,
        "tok_per_s": round(statistics.median(r["tok_per_s"] for r in runs), 2),
        "tokens_per_forward": round(statistics.median(r["tpf"] for r in runs), 3),
        "generated_tokens": int(sum(r["tokens"] for r in runs)),
        "runs": runs,
    }
    if runs and "rows_per_forward" in runs[0]:
        row["rows_per_forward"] = round(statistics.median(r["rows_per_forward"] for r in runs), 3)
        row["cold_share"] = round(statistics.median(r["cold_share"] for r in runs), 4)
    return row


def run_ours(llm, prompts: list[str], max_tokens: int, decoding: str, stride: int | None,
             **options: Any) -> list[dict[str, float]]:
    from idlm.decoding.sampling import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    llm.chat([{"role": "user", "content": prompts[0]}], SamplingParams(temperature=0.0, max_tokens=8),
             decoding=decoding, stride=stride, **options)  # warm-up
    runs = []
    for p in prompts:
        out = llm.chat([{"role": "user", "content": p}], params, decoding=decoding, stride=stride, **options)[0]
        s = out.stats
        d = s.to_dict()
        runs.append({"tok_per_s": s.tokens_per_second, "tpf": s.tokens_per_forward, "tokens": s.generated_tokens,
                     "seconds": s.seconds, "rows_per_forward": d["rows_per_forward"],
                     "cold_share": d.get("cold_share", 0.0)})
    return runs


def run_transformers(hf_dir: Path, tokenizer, prompts: list[str], max_tokens: int, dtype: torch.dtype,
                     device: str) -> list[dict[str, float]]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=dtype, local_files_only=True).to(device).eval()
    runs = []

    def gen(ids: torch.Tensor, n: int) -> torch.Tensor:
        with torch.inference_mode():
            return model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n,
                                  min_new_tokens=n, pad_token_id=tokenizer.eos_token_id)

    enc = [torch.tensor([tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                                       tokenize=True, return_dict=True)["input_ids"]], device=device)
           for p in prompts]
    gen(enc[0], 8)  # warm-up
    for ids in enc:
        t0 = time.perf_counter()
        out = gen(ids, max_tokens)
        if device == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        n = out.shape[1] - ids.shape[1]
        runs.append({"tok_per_s": n / dt, "tpf": 1.0, "tokens": n, "seconds": dt})
    del model
    return runs


def run_decode_bench(args: argparse.Namespace) -> dict[str, Any]:
    from idlm import LLM

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    decodings = [d.strip() for d in args.decoding.split(",") if d.strip()]
    strides = [int(s) for s in str(args.stride).split(",") if s.strip()]
    branches = [int(b) for b in str(args.branches).split(",") if b.strip()]
    prompts = bench_prompts(args.prompts)
    dtypes = ["float32"] + (["bfloat16"] if args.bf16 else [])
    if device == "cuda" and not args.bf16:
        dtypes = ["bfloat16"]
    rows: list[dict[str, Any]] = []
    notes: list[str] = []
    for dtype in dtypes:
        llm = LLM(args.model, adapter=args.adapter, dtype=dtype, device=device)
        ar_speed = None
        for decoding in decodings:
            if decoding == "risd" and llm.adapter is None:
                notes.append(f"risd skipped: {args.model} has no adapter")
                continue
            layouts = [(None, None)] if decoding == "ar" else [(n, b) for n in strides for b in branches]
            for stride, b in layouts:
                options = {} if decoding == "ar" else {"branches": None if b == -1 else b}
                runs = run_ours(llm, prompts, args.max_tokens, decoding, stride, **options)
                name = f"idlm {decoding}" + (f" N={stride}" if stride else "")
                if b:
                    name += " branches=" + ("all" if b == -1 else str(b))
                row = _median_row(name, dtype, runs)
                row.update(decoding=decoding, stride=stride or 1, branches=b)
                if decoding == "ar":
                    ar_speed = row["tok_per_s"]
                rows.append(row)
                print(f"{row['engine']:>18} {dtype:>8}: {row['tok_per_s']:7.2f} tok/s, "
                      f"TPF {row['tokens_per_forward']:.3f}", file=sys.stderr)
        if ar_speed:
            for r in rows:
                if r["dtype"] == dtype and r["engine"].startswith("idlm"):
                    r["speedup_vs_idlm_ar"] = round(r["tok_per_s"] / ar_speed, 3)
        if args.transformers:
            runs = run_transformers(llm.checkpoint.path, llm.tokenizer, prompts, args.max_tokens,
                                    getattr(torch, dtype), device)
            row = _median_row("transformers generate", dtype, runs)
            rows.append(row)
            print(f"{row['engine']:>18} {dtype:>8}: {row['tok_per_s']:7.2f} tok/s", file=sys.stderr)
            if ar_speed:
                for r in rows:
                    if r["dtype"] == dtype and r["engine"].startswith("idlm"):
                        r["ratio_vs_transformers"] = round(r["tok_per_s"] / row["tok_per_s"], 3)
        del llm
    result = {
        "benchmark": "decode",
        "command": "idlm " + " ".join(sys.argv[1:]) if sys.argv and sys.argv[0].endswith("idlm") else None,
        "model": args.model,
        "batch_size": 1,
        "greedy": True,
        "max_tokens": args.max_tokens,
        "prompts": prompts,
        "machine": machine_info(device),
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "rows": rows,
        "notes": notes,
    }
    write_results(result, Path(args.out), "decode", markdown_table(result))
    return result


def markdown_table(result: dict[str, Any]) -> str:
    lines = ["| engine | dtype | tok/s | tokens/forward | rows/forward | cold share | speedup vs idlm AR | "
             "ratio vs transformers |", "|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['engine']} | {r['dtype']} | {r['tok_per_s']} | {r['tokens_per_forward']} | "
                     f"{r.get('rows_per_forward', '')} | {r.get('cold_share', '')} | "
                     f"{r.get('speedup_vs_idlm_ar', '')} | {r.get('ratio_vs_transformers', '')} |")
    m = result["machine"]
    lines.append("")
    lines.append(f"{m['cpu']} ({m['cores']} cores, {m['torch_threads']} torch threads, capability "
                 f"{m.get('cpu_capability')}), torch {m['torch']}, "
                 f"batch 1, greedy, {result['max_tokens']} new tokens, median over {len(result['prompts'])} prompts.")
    lines.extend(f"Note: {n}" for n in result["notes"])
    return "\n".join(lines) + "\n"

