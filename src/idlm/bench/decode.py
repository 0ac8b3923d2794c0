"""Decode benchmark: our AR / ISD / R-ISD / auto against transformers `generate`, one interleaved run.

Greedy, every request forced to `max_tokens` new tokens (EOS ignored) so all rows time the same work. At
batch size b the prompts run in waves of b concurrent requests (all with the same decoding; the engine's
continuous batching serves each wave); tok/s is the total over the prompt set (at least b prompts). Each
repeat runs every configuration at every batch size in turn, so all see the same machine state; the table
gives medians over repeats, the ratio to AR measured within each repeat, and its spread. At batch 1 it also gives
the time per engine step and its ratio to AR's (the step cost). Every timed run is bracketed by a placement probe
(bench/placement.py: a VM's host moves its CPUs between placements in which the same step costs differently), and
each row repeats its figures per placement, over the repeats in which the row's run and AR's saw the same one.
Prints a table and writes JSON + markdown under the output directory.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from importlib import resources
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch._dynamo.utils import counters

from idlm.bench.placement import placements, probe
from idlm.bench.results import machine_info, write_results


def bench_prompts(n: int) -> list[str]:
    prompts = json.loads(resources.files("idlm.data").joinpath("bench_prompts.json").read_text())
    return prompts[:n]


def heldout_prompts(n: int) -> list[str]:
    """The first user turn of `n` held-out chat prompts (never trained on), spread over the file's kinds."""
    from idlm.eval.acceptance import HELDOUT_PROMPTS

    recs = [json.loads(l) for l in HELDOUT_PROMPTS.read_text().splitlines() if l.strip()]
    if len(recs) > n:
        recs = [recs[(i * len(recs)) // n] for i in range(n)]
    return [r["messages"][-1]["content"] for r in recs]


PROMPT_SETS = {"heldout": heldout_prompts, "bench": bench_prompts}


class Variant(NamedTuple):
    """One engine configuration of a run (its own LLM)."""

    quantize: str
    stationary: bool
    compile: bool
    panel: str = "auto"  # models/panel.py


def run_ours(llm, prompts: list[str], max_tokens: int, batch: int, decoding: str, stride: int | None,
             **options: Any) -> dict[str, Any]:
    """The prompts in waves of `batch` concurrent requests: total tok/s and per-request decoding figures."""
    from idlm.decoding.sampling import SamplingParams
    from idlm.decoding.stats import RequestStats

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    convs = [[{"role": "user", "content": p}] for p in prompts]
    graphs = counters["stats"]["unique_graphs"]
    outs, t0 = [], time.perf_counter()
    for i in range(0, len(convs), batch):
        outs += llm.chat(convs[i : i + batch], params, decoding=decoding, stride=stride, **options)
    seconds = time.perf_counter() - t0
    pooled = RequestStats(decoding=outs[0].stats.decoding)
    for o in outs:
        pooled.merge(o.stats)
    d = pooled.to_dict()
    run = {"tok_per_s": pooled.generated_tokens / seconds, "tokens": pooled.generated_tokens, "seconds": seconds,
           "tpf": pooled.tokens_per_forward, "rows_per_forward": d["rows_per_forward"],
           "cold_share": d.get("cold_share", 0.0), "tree_hits": pooled.tree_hits,
           "acceptance": d.get("acceptance_by_position", []), "token_ids": [o.token_ids for o in outs],
           "graphs_compiled": counters["stats"]["unique_graphs"] - graphs}  # inside the timed run: warm-up missed
    if batch == 1:  # one request at a time: the engine steps are the request's forwards
        run["ms_per_step"] = seconds * 1e3 * pooled.tokens_per_forward / pooled.generated_tokens
    if pooled.decoding == "auto":
        run["choices"] = dict(pooled.choices)
    return run


def run_transformers(hf_dir: Path, tokenizer, prompts: list[str], max_tokens: int, dtype: torch.dtype,
                     device: str, prompt_lookup: int = 0) -> list[dict[str, float]]:
    """transformers `generate` at batch 1, greedy; `prompt_lookup` > 0: assisted generation drafting that many
    tokens by prompt lookup (n-gram matches in the context), the speculative decoding a user would pick."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=dtype, local_files_only=True).to(device).eval()
    runs = []

    def gen(ids: torch.Tensor, n: int) -> torch.Tensor:
        with torch.inference_mode():
            extra = {"prompt_lookup_num_tokens": prompt_lookup} if prompt_lookup else {}
            return model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n,
                                  min_new_tokens=n, pad_token_id=tokenizer.eos_token_id, **extra)

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
    return runs


def configurations(args: argparse.Namespace, has_adapter: bool) -> tuple[list[dict[str, Any]], list[str]]:
    """(name, decoding, stride, options) of every idlm row, and notes on what was skipped."""
    strides = [int(x) for x in str(args.stride).split(",") if x.strip()]
    branches = [int(b) for b in str(args.branches).split(",") if b.strip()]
    trees = [int(k) for k in str(args.tree).split(",") if k.strip()]
    configs, notes = [], []
    for decoding in [d.strip() for d in args.decoding.split(",") if d.strip()]:
        if decoding in ("risd", "auto") and not has_adapter:
            notes.append(f"{decoding} skipped: {args.model} has no adapter")
            continue
        if decoding == "ar":
            configs.append({"engine": "idlm ar", "decoding": "ar", "stride": None, "options": {}})
        elif decoding == "auto":
            configs.append({"engine": f"idlm auto N<={max(strides)}", "decoding": "auto", "stride": max(strides),
                            "options": {}})
        else:
            for n in strides:
                for b in branches:
                    for k in trees:
                        name = (f"idlm {decoding} N={n}" + (f" branches={'all' if b == -1 else b}" if b else "")
                                + (f" tree={k}" if k > 1 else ""))
                        options = {"branches": None if b == -1 else b, **({"tree": k} if k > 1 else {})}
                        configs.append({"engine": name, "decoding": decoding, "stride": n, "options": options})
    return configs, notes


def _summary(runs: list[dict[str, Any]], ar_runs: list[dict[str, Any]] | None) -> dict[str, Any]:
    row = {"tok_per_s": round(statistics.median(r["tok_per_s"] for r in runs), 2),
           "tok_per_s_range": [round(min(r["tok_per_s"] for r in runs), 2), round(max(r["tok_per_s"] for r in runs), 2)],
           "tokens_per_forward": round(statistics.median(r["tpf"] for r in runs), 3),
           "rows_per_forward": round(statistics.median(r["rows_per_forward"] for r in runs), 3),
           "rows_per_token": round(statistics.median(r["rows_per_forward"] / r["tpf"] for r in runs), 3),
           "cold_share": round(statistics.median(r["cold_share"] for r in runs), 4),
           "tree_hits": runs[-1]["tree_hits"],
           "runs": [{k: v for k, v in r.items() if k != "token_ids"} for r in runs]}
    if runs[0].get("choices"):
        row["choices"] = runs[-1]["choices"]
    if "ms_per_step" in runs[0]:
        row["ms_per_step"] = round(statistics.median(r["ms_per_step"] for r in runs), 2)
    if ar_runs:
        row.update(_vs_ar(list(zip(runs, ar_runs))))
        ratios = [r["tok_per_s"] / a["tok_per_s"] for r, a in zip(runs, ar_runs)]
        row["speedup_range"] = [round(min(ratios), 3), round(max(ratios), 3)]
        row["same_tokens_as_ar"] = all(r["token_ids"] == a["token_ids"] for r, a in zip(runs, ar_runs))
    row["by_placement"] = _by_placement(runs, ar_runs)
    return row


def _by_placement(runs: list[dict[str, Any]], ar_runs: list[dict[str, Any]] | None) -> dict[str, Any]:
    """The row's figures over the runs of each placement (bench/placement.py); ratios to AR over the repeats in
    which both runs saw that placement."""
    out = {}
    for label in sorted({r["placement"] for r in runs} - {"mixed"}):
        mine = [r for r in runs if r["placement"] == label]
        entry: dict[str, Any] = {"runs": len(mine),
                                 "tok_per_s": round(statistics.median(r["tok_per_s"] for r in mine), 2)}
        if "ms_per_step" in mine[0]:
            entry["ms_per_step"] = round(statistics.median(r["ms_per_step"] for r in mine), 2)
        pairs = [(r, a) for r, a in zip(runs, ar_runs or []) if r["placement"] == a["placement"] == label]
        if pairs:
            entry["pairs_with_ar"] = len(pairs)
            entry.update(_vs_ar(pairs))
        out[label] = entry
    return out


def _vs_ar(pairs: list[tuple[dict[str, Any], dict[str, Any]]]) -> dict[str, float]:
    """Medians over (run, AR run) pairs of the speed-up and, where both timed their steps, the step cost."""
    out = {"speedup_vs_idlm_ar": round(statistics.median(r["tok_per_s"] / a["tok_per_s"] for r, a in pairs), 3)}
    if "ms_per_step" in pairs[0][0] and "ms_per_step" in pairs[0][1]:
        out["step_cost_vs_ar"] = round(statistics.median(r["ms_per_step"] / a["ms_per_step"] for r, a in pairs), 3)
    return out


def _divergence(run: dict[str, Any], reference: dict[str, Any]) -> dict[str, Any]:
    """Per request, the index of the first token that differs from the reference run's (its length if none):
    median and the per-request values."""
    firsts = [next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
              for a, b in zip(run["token_ids"], reference["token_ids"])]
    return {"median": statistics.median(firsts), "per_request": firsts}


def _llamacpp(args: argparse.Namespace, batches: list[int], prompt_ids: list[list[int]], notes: list[str]):
    """llama.cpp on the model's GGUF file (batch 1), loaded and warmed up, or None with the reason in `notes`."""
    from idlm.bench import llamacpp

    if not args.llamacpp:
        return None
    gguf = llamacpp.gguf_for(args.model)
    if 1 not in batches or gguf is None or not llamacpp.available():
        notes.append("llama.cpp row skipped: " + ("it runs at batch 1" if 1 not in batches else
                                                 f"{args.model} has no GGUF file" if gguf is None else
                                                 f"llama-cpp-python is not installed; add it with {llamacpp.INSTALL}"))
        return None
    try:
        lcpp = llamacpp.LlamaCpp(gguf, threads=torch.get_num_threads())
        lcpp.run(prompt_ids[:1], 8)  # warm-up
    except llamacpp.LlamaCppError as e:
        notes.append(f"llama.cpp row skipped: {e}")
        return None
    return lcpp


def _llamacpp_run(lcpp, prompt_ids: list[list[int]], max_tokens: int, notes: list[str]) -> dict[str, Any] | None:
    """One timed llama.cpp run, or None (with the reason in `notes`) if its worker died."""
    from idlm.bench.llamacpp import LlamaCppError

    before = probe()
    try:
        run = lcpp.run(prompt_ids, max_tokens)
    except LlamaCppError as e:
        notes.append(f"llama.cpp stopped: {e}; its row has only the runs before")
        return None
    return {**run, "probe_us": [before, probe()]}


def run_decode_bench(args: argparse.Namespace) -> dict[str, Any]:
    from idlm import LLM

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.quick:  # a smoke run: every row kind, little work
        args.stride, args.batch, args.prompts, args.max_tokens, args.repeats = "2,4", "1,2", 2, 12, 1
    batches = [int(b) for b in str(args.batch).split(",") if b.strip()]
    make_prompts = PROMPT_SETS[args.prompt_set]
    prompts = {b: make_prompts(max(args.prompts, b)) for b in batches}
    dtype = args.dtype or ("bfloat16" if device == "cuda" else "float32")
    # engine variants: weight format x stationary mode x compiled, each its own LLM, every row interleaved in one run
    def modes(flag: str) -> list[bool]:
        return [False, True] if flag == "both" else [flag == "on"]

    panels = [k.strip() for k in str(args.panel).split(",") if k.strip()]
    variants = [Variant(q.strip(), st, cp, k) for q in str(args.quantize).split(",") if q.strip() for k in panels
                for st in modes(args.stationary) for cp in modes(args.compile)]
    llms = {v: LLM(args.model, adapter=args.adapter, dtype=dtype, device=device, max_num_seqs=max(batches),
                   kv_cache_tokens=max(batches) * (args.max_tokens + 320), quantize=v.quantize,
                   panel=v.panel, stationary=v.stationary, compile=v.compile)
            for v in variants}
    llm = llms[variants[0]]
    base, notes = configurations(args, llm.adapter is not None)
    configs = [{**c, "variant": v, "engine": c["engine"] + ("" if v.quantize == "none" else f" {v.quantize}")
                + (f" panel {v.panel}" if len(panels) > 1 else "")
                + (" stationary" if v.stationary else "") + (" compiled" if v.compile else "")}
               for v in variants for c in base if not (v.stationary and c["decoding"] == "ar")]  # AR: nothing to pad
    for c in configs:  # warm-up at every batch size: the cost model of auto (measured once per machine and cached),
        for b in batches:  # compiled variants' graphs (every step class: LLM.warm_up, as `idlm serve` runs it)
            run_ours(llms[c["variant"]], prompts[b][:b], 8, b, c["decoding"], c["stride"], **c["options"])
        if c["variant"].compile:
            llms[c["variant"]].warm_up(c["decoding"], c["stride"])
    lcpp_ids = [llm.apply_chat_template([{"role": "user", "content": p}]) for p in prompts.get(1, [])]
    lcpp = _llamacpp(args, batches, lcpp_ids, notes)
    runs: dict[tuple[int, int], list[dict[str, Any]]] = {}
    lcpp_runs: list[dict[str, Any]] = []
    for r in range(args.repeats):
        for b in batches:
            for i, c in enumerate(configs):
                before = probe()
                run = run_ours(llms[c["variant"]], prompts[b], args.max_tokens, b, c["decoding"], c["stride"],
                               **c["options"])
                run["probe_us"] = [before, probe()]
                runs.setdefault((i, b), []).append(run)
                print(f"repeat {r + 1}/{args.repeats} batch {b:>2} {c['engine']:>28}: {run['tok_per_s']:7.2f} tok/s, "
                      f"TPF {run['tpf']:.3f}" + (f", {run['graphs_compiled']} graph(s) compiled inside the run"
                                                  if run["graphs_compiled"] else ""), file=sys.stderr)
            if lcpp is not None and lcpp.alive and b == 1:
                run = _llamacpp_run(lcpp, lcpp_ids, args.max_tokens, notes)
                if run is not None:
                    lcpp_runs.append(run)
                    print(f"repeat {r + 1}/{args.repeats} batch  1 {'llama.cpp':>28}: {run['tok_per_s']:7.2f} "
                          f"tok/s", file=sys.stderr)
    if lcpp is not None:
        lcpp.close()
    timed = [run for rs in runs.values() for run in rs] + lcpp_runs
    for run, label in zip(timed, placements([tuple(run["probe_us"]) for run in timed])):
        run["placement"] = label
    # the AR row of each weight format and compile mode
    ar_of = {(c["variant"].quantize, c["variant"].compile, c["variant"].panel): i for i, c in enumerate(configs)
             if c["decoding"] == "ar"}

    def dense_ar(compiled: bool) -> int | None:
        """The unquantized AR row (of the first panel choice), of the same compile mode where there is one."""
        return ar_of.get(("none", compiled, panels[0]), ar_of.get(("none", not compiled, panels[0])))

    rows = []
    for b in batches:
        for i, c in enumerate(configs):
            v = c["variant"]
            ar = ar_of.get((v.quantize, v.compile, v.panel))
            ar_runs = runs[(ar, b)] if ar is not None and i != ar else None
            row = {"engine": c["engine"], "dtype": dtype, "quantize": v.quantize, "stationary": v.stationary,
                   "compile": v.compile, "row_limits": llms[v].row_limits,
                   "panel": llms[v].panel, "batch": b,
                   "decoding": c["decoding"],
                   "stride": c["stride"] or 1, "branches": c["options"].get("branches", 0),
                   **_summary(runs[(i, b)], ar_runs)}
            dense = dense_ar(v.compile)
            if v.quantize != "none" and dense is not None:  # quality: where greedy output leaves the dense AR's
                row["tokens_to_divergence_vs_" + dtype] = _divergence(runs[(i, b)][-1], runs[(dense, b)][-1])
            rows.append(row)
    if lcpp_runs:
        ar = dense_ar(False)
        rows.append({"engine": f"llama.cpp {lcpp.name}", "dtype": lcpp.name, "quantize": lcpp.name, "batch": 1,
                     "decoding": "ar", "stride": 1, "branches": 0,
                     **_summary(lcpp_runs, runs[(ar, 1)] if ar is not None else None)})
    if args.transformers:
        texts = prompts[1] if 1 in prompts else make_prompts(args.prompts)
        ar_1 = next((r for r in rows if r["decoding"] == "ar" and r["batch"] == 1), None)
        for name, lookup in (("transformers generate", 0), ("transformers prompt lookup (10)", 10)):
            tf = run_transformers(llm.checkpoint.path, llm.tokenizer, texts, args.max_tokens, getattr(torch, dtype),
                                  device, prompt_lookup=lookup)
            row = {"engine": name, "dtype": dtype, "batch": 1,
                   "tok_per_s": round(statistics.median(r["tok_per_s"] for r in tf), 2),
                   "tokens_per_forward": 1.0 if not lookup else None, "runs": tf}
            if ar_1:
                row["speedup_vs_idlm_ar"] = round(row["tok_per_s"] / ar_1["tok_per_s"], 3)
            rows.append(row)
        base = next(r for r in rows if r["engine"] == "transformers generate")
        for r in rows:
            if r["batch"] == 1 and r is not base:
                r["ratio_vs_transformers"] = round(r["tok_per_s"] / base["tok_per_s"], 3)
    result = {
        "benchmark": "decode",
        "command": "idlm " + " ".join(sys.argv[1:]) if sys.argv and sys.argv[0].endswith("idlm") else None,
        "model": args.model,
        "adapter": str(llm.adapter_path) if llm.adapter_path else None,
        "batches": batches,
        "repeats": args.repeats,
        "greedy": True,
        "max_tokens": args.max_tokens,
        "prompt_set": args.prompt_set,
        "prompts": prompts[max(batches)],
        "machine": machine_info(device),
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "rows": rows,
        "notes": notes,
    }
    write_results(result, Path(args.out), "decode", markdown_table(result))
    return result


def _range(r: dict[str, Any], key: str) -> str:
    lo_hi = r.get(key)
    return f" ({lo_hi[0]}-{lo_hi[1]})" if lo_hi else ""


def markdown_table(result: dict[str, Any]) -> str:
    lines = ["| engine | batch | tok/s (range) | tokens/forward | rows/forward | rows/token | cold share | "
             "ms/step | step cost vs AR | vs idlm AR (range) | same tokens as AR | vs transformers |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        same = r.get("same_tokens_as_ar")
        lines.append(f"| {r['engine']} | {r['batch']} | {r['tok_per_s']}{_range(r, 'tok_per_s_range')} | "
                     f"{r['tokens_per_forward'] or ''} | {r.get('rows_per_forward', '')} | "
                     f"{r.get('rows_per_token', '')} | {r.get('cold_share', '')} | {r.get('ms_per_step', '')} | "
                     f"{r.get('step_cost_vs_ar', '')} | {r.get('speedup_vs_idlm_ar', '')}{_range(r, 'speedup_range')} | "
                     f"{'' if same is None else ('yes' if same else 'NO')} | {r.get('ratio_vs_transformers', '')} |")
    split = [r for r in result["rows"] if r.get("by_placement")]
    if any(set(r["by_placement"]) != {"one"} for r in split):  # the host moved the CPUs during the run
        lines += ["", "By placement (bench/placement.py; ratios over the repeats in which the row and AR saw the same "
                  "placement):", "", "| engine | batch | placement | runs | tok/s | ms/step | step cost vs AR | "
                  "vs idlm AR | pairs |", "|---|---|---|---|---|---|---|---|---|"]
        lines += [f"| {r['engine']} | {r['batch']} | {label} | {e['runs']} | {e['tok_per_s']} | "
                  f"{e.get('ms_per_step', '')} | {e.get('step_cost_vs_ar', '')} | {e.get('speedup_vs_idlm_ar', '')} | "
                  f"{e.get('pairs_with_ar', '')} |" for r in split for label, e in r["by_placement"].items()]
    m = result["machine"]
    lines.append("")
    lines.append(f"{m['cpu']} ({m['cores']} cores, {m['torch_threads']} torch threads, capability "
                 f"{m.get('cpu_capability')}), torch {m['torch']}, {result['rows'][0]['dtype']}, greedy, "
                 f"{result['max_tokens']} new tokens per request, {result['prompt_set']} prompts, median of "
                 f"{result['repeats']} interleaved repeats; adapter {result.get('adapter')}.")
    for r in result["rows"]:
        div = next((v for k, v in r.items() if k.startswith("tokens_to_divergence_vs_")), None)
        if div is not None:
            limits = f"; quantized kernels up to {r['row_limits']} rows (by kernel and weight shape)" \
                if r.get("row_limits") else ""
            lines.append(f"{r['engine']} batch {r['batch']}: greedy output leaves the unquantized AR's after "
                         f"{div['median']} tokens (median; per request {div['per_request']}){limits}.")
    choices = [f"{r['engine']} batch {r['batch']}: {r['choices']}" for r in result["rows"] if r.get("choices")]
    if choices:
        lines.append("")
        lines.extend(f"Choices of auto (steps by decoding, last repeat): {c}" for c in choices)
    lines.extend(f"Note: {n}" for n in result["notes"])
    return "\n".join(lines) + "\n"
