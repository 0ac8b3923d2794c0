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
    d.add_argument("--prompts", type=int, default=5, help="number of bench prompts (batch 1 each)")
    d.add_argument("--max-tokens", type=int, default=128)
    d.add_argument("--device", choices=["cpu", "cuda"], default=None)
    d.add_argument("--no-transformers", dest="transformers", action="store_false",
                   help="skip the transformers generate baseline")
    d.add_argument("--bf16", action="store_true", help="add bfloat16 rows (ours and transformers)")
    d.add_argument("--out", default="benchmarks/results", help="directory for the JSON and markdown")
    d.set_defaults(func=_decode)


def _decode(args: argparse.Namespace) -> int:
    from idlm.bench.decode import run_decode_bench

    run_decode_bench(args)
    return 0
