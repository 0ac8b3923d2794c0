"""`idlm bench ...` subcommands."""
from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    bench = sub.add_parser("bench", help="measured benchmarks (JSON under benchmarks/results/)")
    bsub = bench.add_subparsers(dest="bench_command", required=True)
    d = bsub.add_parser("decode", help="tok/s and tokens per forward: ar / isd / risd vs transformers generate")
    d.add_argument("--model", default="smollm2-135m")
    d.add_argument("--adapter", default=None)
    d.add_argument("--decoding", default="ar", help="comma list of ar,isd,risd")
    d.add_argument("--stride", default="4", help="comma list of strides for isd/risd")
    d.add_argument("--branches", default="0", help="comma list of branch counts for isd/risd (-1 = every draft)")
    d.add_argument("--prompts", type=int, default=5, help="number of bench prompts (batch 1 each)")
    d.add_argument("--max-tokens", type=int, default=128)
    d.add_argument("--device", choices=["cpu", "cuda"], default=None)
    d.add_argument("--no-transformers", dest="transformers", action="store_false",
                   help="skip the transformers generate baseline")
    d.add_argument("--bf16", action="store_true", help="add bfloat16 rows (ours and transformers)")
    d.add_argument("--out", default="benchmarks/results", help="directory for the JSON and markdown")
    d.set_defaults(func=_decode)
    f = bsub.add_parser("forward", help="cost of one forward by query rows per sequence and batch size")
    f.add_argument("--model", default="smollm2-135m")
    f.add_argument("--dtype", choices=["float32", "bfloat16"], default=None)
    f.add_argument("--device", choices=["cpu", "cuda"], default=None)
    f.add_argument("--rows", default="1,2,3,4,5,7,8,9,15,16,31", help="query rows per sequence (1 = AR)")
    f.add_argument("--batch", default="1", help="comma list of batch sizes")
    f.add_argument("--context", type=int, default=200, help="cached tokens per sequence")
    f.add_argument("--repeats", type=int, default=7)
    f.add_argument("--out", default="benchmarks/results")
    f.set_defaults(func=_forward)
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
    t.set_defaults(func=_throughput)


def _decode(args: argparse.Namespace) -> int:
    from idlm.bench.decode import run_decode_bench

    run_decode_bench(args)
    return 0


def _forward(args: argparse.Namespace) -> int:
    from idlm.bench.forward import run_forward_bench

    run_forward_bench(args)
    return 0


def _throughput(args: argparse.Namespace) -> int:
    from idlm.bench.throughput import run_throughput_bench

    run_throughput_bench(args)
    return 0
