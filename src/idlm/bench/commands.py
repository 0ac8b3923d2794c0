"""`idlm bench ...` subcommands."""
from __future__ import annotations

import argparse
import importlib

from idlm.weight_formats import WEIGHT_FORMATS


def register(sub: argparse._SubParsersAction) -> None:
    bench = sub.add_parser("bench", help="measured benchmarks (JSON under benchmarks/results/)")
    bsub = bench.add_subparsers(dest="bench_command", required=True)
    d = bsub.add_parser("decode", help="tok/s, tokens and rows per forward by decoding and batch size, vs AR "
                                       "and transformers generate (interleaved repeats)")
    d.add_argument("--model", default="smollm2-135m")
    d.add_argument("--adapter", default=None, help="adapter dir (default: the model's shipped adapter)")
    d.add_argument("--decoding", default="ar,risd,auto", help="comma list of ar,isd,risd,auto")
    d.add_argument("--stride", default="4", help="comma list of strides for isd/risd (auto: up to the largest)")
    d.add_argument("--branches", default="0", help="comma list of branch counts for isd/risd (-1 = every draft)")
    d.add_argument("--tree", default="1", help="comma list of first-position candidates for isd/risd (1 = off)")
    d.add_argument("--batch", default="1", help="comma list of batch sizes (concurrent requests)")
    d.add_argument("--prompts", type=int, default=5, help="prompts per batch size (at least the batch size)")
    d.add_argument("--prompt-set", choices=["heldout", "bench"], default="heldout",
                   help="held-out chat prompts (never trained on) or the short bench prompts")
    d.add_argument("--repeats", type=int, default=1, help="interleaved repeats (medians and spread reported)")
    d.add_argument("--quick", action="store_true", help="a smoke run: strides 2,4, batch 1,2, 2 prompts x 12 tokens")
    d.add_argument("--max-tokens", type=int, default=128)
    d.add_argument("--device", choices=["cpu", "cuda"], default=None)
    d.add_argument("--dtype", choices=["float32", "bfloat16"], default=None, help="default: float32 on CPU")
    d.add_argument("--quantize", default="none", help=f"comma list of {','.join(WEIGHT_FORMATS)}: each gets its own rows "
                                                      "(quantized weights; models/quantize.py)")
    d.add_argument("--panel", default="auto", help="comma list of auto,on,off: our panel kernels for float32 and int8 "
                                                   "products (models/panel.py); several give every variant rows of each")
    d.add_argument("--stationary", choices=["off", "on", "both"], default="off",
                   help="the stationary-batch mode (ISD steps padded to their layout's width); both: rows of each")
    d.add_argument("--compile", choices=["off", "on", "both"], default="off",
                   help="compiled forwards (models/compile.py); both: rows of each")
    d.add_argument("--no-transformers", dest="transformers", action="store_false",
                   help="skip the transformers generate baseline")
    d.add_argument("--no-llamacpp", dest="llamacpp", action="store_false",
                   help="skip the llama.cpp row (run when llama-cpp-python is installed: pip install 'idlm[bench]')")
    d.add_argument("--out", default="benchmarks/results", help="directory for the JSON and markdown")
    d.set_defaults(func=_lazy("idlm.bench.decode", "run_decode_bench"))
    c = bsub.add_parser("training-curve", help="held-out TPF and acceptance against training tokens over stages")
    c.add_argument("stages", nargs="+", help="run dirs or metrics.jsonl files, in stage order")
    c.add_argument("--heldout", action="append", metavar="N=FILE",
                   help="an `idlm acceptance --out` JSON measured at the end of stage N (repeatable)")
    c.add_argument("--out", default="benchmarks/results/training-curve", help="output path (.png and .json)")
    c.set_defaults(func=_lazy("idlm.bench.training_curve", "run"))
    f = bsub.add_parser("forward", help="cost of one forward by query rows per sequence and batch size")
    f.add_argument("--model", default="smollm2-135m")
    f.add_argument("--dtype", choices=["float32", "bfloat16"], default=None)
    f.add_argument("--device", choices=["cpu", "cuda"], default=None)
    f.add_argument("--rows", default="1,2,3,4,5,7,8,9,15,16,31", help="query rows per sequence (1 = AR)")
    f.add_argument("--batch", default="1", help="comma list of batch sizes")
    f.add_argument("--context", type=int, default=200, help="cached tokens per sequence")
    f.add_argument("--repeats", type=int, default=7)
    f.add_argument("--out", default="benchmarks/results")
    f.set_defaults(func=_lazy("idlm.bench.forward", "run_forward_bench"))
    t = bsub.add_parser("throughput", help="offline throughput by concurrency (continuous batching, prefix cache)")
    t.add_argument("--model", default="smollm2-135m")
    t.add_argument("--concurrency", default="1,4,16,64", help="comma list: max_num_seqs per run")
    t.add_argument("--decoding", default="ar,risd", help="comma list of ar,isd,risd")
    t.add_argument("--workload", default="chat,shared-prefix", help="chat and/or shared-prefix")
    t.add_argument("--max-tokens", type=int, default=64)
    t.add_argument("--kv-cache-tokens", type=int, default=32768)
    t.add_argument("--repeats", type=int, default=1, help="interleaved runs per configuration (median kept)")
    t.add_argument("--baseline-src", default=None,
                   help="the src dir of another idlm version (e.g. a git worktree) to run beside this one")
    t.add_argument("--out", default="benchmarks/results")
    t.set_defaults(func=_lazy("idlm.bench.throughput", "run_throughput_bench"))
    s = bsub.add_parser("serve", help="idlm serve over HTTP: total tok/s, TTFT and inter-token latency by "
                                      "concurrency, AR vs the default decoding on one server")
    s.add_argument("--model", default="smollm2-135m")
    s.add_argument("--adapter", default=None, help="adapter dir (default: the model's shipped adapter)")
    s.add_argument("--concurrency", default="1,4,16,64", help="comma list of requests in flight")
    s.add_argument("--decoding", default="ar,auto", help="comma list of decodings requests ask for")
    s.add_argument("--requests", type=int, default=None, help="requests per level (default: max(2 x level, 8))")
    s.add_argument("--max-tokens", type=int, default=128)
    s.add_argument("--kv-cache-tokens", type=int, default=32768)
    s.add_argument("--repeats", type=int, default=1, help="interleaved repeats (the median run is reported)")
    s.add_argument("--out", default="benchmarks/results")
    s.set_defaults(func=_lazy("idlm.bench.serve", "run_serve_bench"))
    pr = bsub.add_parser("profile", help="AR and R-ISD step times and torch.profiler tables, fused projections "
                                         "vs separate")
    pr.add_argument("--model", default="smollm2-135m")
    pr.add_argument("--adapter", default=None, help="adapter dir (default: the model's shipped adapter)")
    pr.add_argument("--stride", type=int, default=4)
    pr.add_argument("--batch", default="1,4,16", help="comma list of batch sizes for the step times")
    pr.add_argument("--repeats", type=int, default=5, help="alternated measurements per model (medians)")
    pr.add_argument("--steps", type=int, default=24, help="engine steps under the profiler per decoding")
    pr.add_argument("--rows", type=int, default=12, help="ops per profiler table")
    pr.add_argument("--quantize", default="none", choices=["none", *WEIGHT_FORMATS], help="both models' weights")
    pr.add_argument("--panel", default="auto", choices=["auto", "on", "off"], help="our panel kernels")
    pr.add_argument("--compile", choices=["off", "on"], default="off", help="compiled forwards (models/compile.py)")
    pr.add_argument("--out", default="benchmarks/results")
    pr.set_defaults(func=_lazy("idlm.bench.step_profile", "run_profile_bench"))
    k = bsub.add_parser("kernels", help="one projection's cost by row count: int8 kernel, fp32 and bf16 oneDNN, "
                                        "for every weight shape of the model")
    k.add_argument("--model", default="smollm2-135m")
    k.add_argument("--rows", default="1,2,3,4,5,7,8,16,32", help="comma list of row counts")
    k.add_argument("--repeats", type=int, default=30)
    k.add_argument("--hot", action="store_true", help="one weight copy, in cache (default: copies read from memory, "
                                                      "as in a decode step)")
    k.add_argument("--out", default="benchmarks/results")
    k.set_defaults(func=_lazy("idlm.bench.kernels", "run_kernels_bench"))


def register_explore(sub: argparse._SubParsersAction) -> None:
    e = sub.add_parser("explore", help="predicted ISD / R-ISD speed-up over AR by stride and batch size on this "
                                       "machine (cost model x round model), with an optional measured check")
    e.add_argument("--model", default="smollm2-135m")
    e.add_argument("--adapter", default=None, help="adapter dir (default: the model's shipped adapter)")
    e.add_argument("--acceptance", default=None,
                   help="acceptance by draft position, e.g. 0.4,0.35,0.3 (default: the adapter's recorded "
                        "held-out figure, else measured now)")
    e.add_argument("--strides", default="2,3,4,5,6,7,8")
    e.add_argument("--batches", default="1,2,4,8,16,32,64", help="batch sizes to predict")
    e.add_argument("--measure-batches", default="1,4,16,64", help="batch sizes to measure (the rest: interpolated)")
    e.add_argument("--max-rows", type=int, default=2048, help="steps with more rows are predicted by the fit")
    e.add_argument("--repeats", type=int, default=3, help="interleaved repeats of every measured step")
    e.add_argument("--quick", action="store_true", help="a small grid: strides 2,4, batches 1,2,4")
    e.add_argument("--validate", action="store_true",
                   help="also measure R-ISD N=3/4 (without / with branches) vs AR at batch 1, 4, 16")
    e.add_argument("--validate-prompts", type=int, default=8)
    e.add_argument("--validate-repeats", type=int, default=3)
    e.add_argument("--max-tokens", type=int, default=128, help="new tokens per request when validating")
    e.add_argument("--dtype", choices=["float32", "bfloat16"], default=None)
    e.add_argument("--device", choices=["cpu", "cuda"], default=None)
    e.add_argument("--out", default="benchmarks/results")
    e.set_defaults(func=_lazy("idlm.bench.explore", "run_explore"))


def _lazy(module: str, name: str):
    """A command running `module.name(args)`, imported only when run (keeps `idlm --help` light)."""

    def run(args: argparse.Namespace) -> int:
        getattr(importlib.import_module(module), name)(args)
        return 0

    return run
