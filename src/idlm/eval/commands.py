"""`idlm eval TASK`: accuracy with a 95% interval, TPF and tok/s per decoding, per-item records, and the
parity of every decoding against the first (registered by idlm.cli; heavy imports happen in the handler)."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from idlm.weight_formats import WEIGHT_FORMATS


def cmd_eval(args: argparse.Namespace) -> int:
    import torch

    from idlm.bench.results import machine_info, write_results
    from idlm.decoding.sampling import SamplingParams
    from idlm.engine.llm import LLM
    from idlm.eval import runner
    from idlm.eval.sandbox import network_isolation
    from idlm.eval.tasks import data_file, get_task

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    task = get_task(args.task)
    path = data_file(task, args.data)
    items = task.load(path)
    if args.limit is not None:
        if args.limit < 1:
            raise ValueError("--limit must be >= 1")
        items = items[: args.limit]
    runs = runner.parse_runs(args.decoding, args.stride) if args.decoding else None
    max_tokens = args.max_tokens or task.max_tokens
    # the default KV pool (32k tokens) holds 16 requests of 2k; beyond it the scheduler preempts, never fails
    llm = LLM(args.model, adapter=args.adapter, dtype=args.dtype, device=args.device, quantize=args.quantize,
              max_num_seqs=args.batch_size, compile=args.compile, clamp_max_tokens=True)
    if runs is None:
        runs = runner.parse_runs(llm.default_decoding, args.stride)
    greedy = args.temperature == 0.0
    params = SamplingParams(temperature=args.temperature, max_tokens=max_tokens, seed=args.seed,
                            logprobs=5 if greedy and len(runs) > 1 else None)
    dtype = str(llm.dtype).replace("torch.", "")
    tie = args.tie_tolerance
    if tie is None:
        tie = runner.TIE_TOLERANCE.get(llm.quantize or dtype, 2e-3)
    results, outputs = [], []
    for run in runs:
        summary, outs = runner.run_task(llm, task, items, run, params, progress=not args.no_progress)
        results.append(summary)
        outputs.append(outs)
        print(f"{task.name} {run.label}: accuracy {summary['accuracy']:.3f} ({summary['correct']}/{summary['n']}, "
              f"95% CI {summary['ci95']}), TPF {summary['tokens_per_forward']:.2f}, "
              f"{summary['tokens_per_second']:.1f} tok/s", file=sys.stderr)
    par = [runner.parity(task, results[0], outputs[0], r, o, tie, greedy) for r, o in zip(results[1:], outputs[1:])]
    result = {
        "task": task.name, "about": task.about, "n": len(items), "data_file": str(path),
        "command": "idlm " + " ".join(sys.argv[1:]), "model": args.model,
        "adapter": str(llm.adapter_path) if llm.adapter_path else None, "dtype": dtype, "quantize": llm.quantize,
        "compile": args.compile,
        "temperature": args.temperature, "seed": args.seed, "max_tokens": max_tokens, "batch_size": args.batch_size,
        "tie_tolerance": tie if greedy else None, "sandbox_network": network_isolation() if task.name == "humaneval"
        else None, "machine": machine_info(str(llm.device)), "runs": results, "parity": par,
    }
    text = runner.markdown(result)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2))
        out.with_suffix(".md").write_text(text)
        print(text)
        print(f"wrote {out} and {out.with_suffix('.md')}", file=sys.stderr)
    else:
        write_results(result, Path(args.results_dir), f"eval-{task.name}", text)
    bad = [p for p in par if p["lossless"] and p["unexplained"] and greedy]
    for p in bad:
        print(f"parity: {p['run']} differs from {p['reference']} on {p['unexplained']} item(s) beyond a near-tie",
              file=sys.stderr)
    return 1 if bad and args.strict else 0


def register(subparsers) -> None:
    e = subparsers.add_parser("eval", help="accuracy on gsm8k / humaneval / arc-easy / arc-challenge, and the parity "
                                           "of decodings item by item")
    e.add_argument("task", help="gsm8k | humaneval | arc-easy | arc-challenge")
    e.add_argument("--decoding", default=None,
                   help="comma list of runs, the first is the reference: ar, auto, isd, risd, with options after "
                        "colons, e.g. 'ar,risd,risd:fast_verify,risd:verify_alpha=0.8' (default: the model's)")
    e.add_argument("--stride", type=int, default=None, help="stride for runs that give none (default: the adapter's)")
    e.add_argument("--limit", type=int, default=None, help="the first K items (a fixed subset)")
    e.add_argument("--data", default=None, help="benchmark file (default: located in its installed package)")
    e.add_argument("--model", default="smollm2-135m")
    e.add_argument("--adapter", default=None, help="adapter dir (default: the model's shipped adapter; 'none': off)")
    e.add_argument("--dtype", choices=["float32", "bfloat16"], default=None)
    e.add_argument("--device", choices=["cpu", "cuda"], default=None)
    e.add_argument("--quantize", choices=WEIGHT_FORMATS, default=None,
                   help="int8, int4, w8a8 or bf16 weights (models/quantize.py)")
    e.add_argument("--compile", action="store_true", help="compiled forwards (models/compile.py)")
    e.add_argument("--batch-size", type=int, default=16, help="requests decoded together")
    e.add_argument("--max-tokens", type=int, default=None, help="answer budget (default: the task's)")
    e.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default; parity needs it)")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--tie-tolerance", type=float, default=None,
                   help="log-prob gap under which a greedy difference counts as a near-tie (default by dtype)")
    e.add_argument("--strict", action="store_true",
                   help="exit 1 when a lossless decoding differs from the reference beyond a near-tie")
    e.add_argument("--out", default=None, help="JSON file (+ .md beside it); default benchmarks/results/eval-*")
    e.add_argument("--results-dir", default="benchmarks/results")
    e.add_argument("--threads", type=int, default=0, help="CPU threads (0 = torch default)")
    e.add_argument("--no-progress", action="store_true")
    e.set_defaults(func=cmd_eval)
