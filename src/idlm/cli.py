"""Command line: `idlm generate | chat | serve | models | bench | explore | acceptance | eval | train | distill | first-draft`."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Any

from idlm.weight_formats import WEIGHT_FORMATS

EXIT_USAGE = 2


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m", help="known name, HF/official I-DLM dir, or .gguf file")
    p.add_argument("--adapter", default=None, help="adapter dir (default: the model's shipped adapter; 'none': off)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None, help="default float32 on cpu, bfloat16 on cuda")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default cuda when available")
    p.add_argument("--quantize", choices=WEIGHT_FORMATS, default=None,
                   help="int8: int8 weights per output channel; int4: 4-bit weights per group of 32 (GGUF Q4_1's "
                        "layout), the LM head int8; bf16: weights rounded to bfloat16 (CPUs with AVX512-BF16); all "
                        "with bfloat16 inputs to the products; w8a8: int8 weights against activations quantized to "
                        "int8 per block of 32 (our panel kernels); the rest in float32 (CPU)")
    p.add_argument("--panel", choices=["auto", "on", "off"], default="auto",
                   help="our AVX2 / AVX-512 panel kernels for float32 and int8 products (built on first use; "
                        "models/panel.py): auto = where they are the faster on this machine (measured once)")
    p.add_argument("--kv-cache-tokens", type=int, default=32768, help="KV pool size in tokens")
    p.add_argument("--max-num-seqs", type=int, default=64, help="requests decoded together")
    p.add_argument("--max-num-batched-tokens", type=int, default=2048,
                   help="rows per forward (prefill chunks, drafts and MASK rows count)")
    p.add_argument("--no-prefix-caching", dest="prefix_caching", action="store_false",
                   help="recompute shared prompt prefixes")
    p.add_argument("--stationary", action="store_true",
                   help="every ISD decode step feeds its layout's widest row count (cold rounds padded)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="compiled forwards (torch.compile; each step shape compiles once, minutes on a cold "
                        "cache). Default: on for serve, off for one-shot commands")


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--presence-penalty", type=float, default=0.0)
    p.add_argument("--frequency-penalty", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true")


def add_decoding_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--decoding", choices=["auto", "ar", "isd", "risd"], default=None,
                   help="default: auto when the model has an adapter (before every step, AR or the lossless "
                        "R-ISD layout the cost model predicts fastest, up to --stride), else ar")
    p.add_argument("--stride", type=int, default=None, help="N tokens per step (default: from the adapter, else 4)")
    p.add_argument("--drafting", choices=["exact", "argmax"], default=None)
    p.add_argument("--verify-alpha", type=float, default=None)
    p.add_argument("--fast-verify", action="store_true", default=None)
    p.add_argument("--fast-verify-topk", type=int, default=None)
    p.add_argument("--confidence-accept-threshold", type=float, default=None)
    p.add_argument("--verify-num-specs", type=int, default=None)
    p.add_argument("--branches", type=int, default=None,
                   help="feed a branch of MASK rows at each of the first B draft positions, so a rejection there "
                        "needs no cold start (default 0; -1: every position)")
    p.add_argument("--tree", type=int, default=None,
                   help="K candidates at the first draft position, verified by the exact multi-candidate rule "
                        "(default 1: off)")


def sampling_params(args: argparse.Namespace):
    from idlm.decoding.sampling import SamplingParams

    return SamplingParams(
        temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, min_p=args.min_p,
        repetition_penalty=args.repetition_penalty, presence_penalty=args.presence_penalty,
        frequency_penalty=args.frequency_penalty, seed=args.seed, stop=args.stop,
        max_tokens=args.max_tokens, ignore_eos=args.ignore_eos,
    )


def decoding_options(args: argparse.Namespace) -> dict[str, Any]:
    names = ["drafting", "verify_alpha", "fast_verify", "fast_verify_topk", "confidence_accept_threshold",
             "verify_num_specs", "branches", "tree"]
    out = {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}
    if out.get("branches") == -1:
        out["branches"] = None  # every draft position
    return out


def load_llm(args: argparse.Namespace):
    from idlm import LLM

    return LLM(args.model, adapter=args.adapter, dtype=args.dtype, device=args.device, quantize=args.quantize,
               panel=args.panel, kv_cache_tokens=args.kv_cache_tokens, max_num_seqs=args.max_num_seqs,
               max_num_batched_tokens=args.max_num_batched_tokens, enable_prefix_caching=args.prefix_caching,
               stationary=args.stationary, compile=bool(args.compile), clamp_max_tokens=True)


def cmd_generate(args: argparse.Namespace) -> int:
    params = sampling_params(args)
    llm = load_llm(args)
    kw = dict(decoding=args.decoding, stride=args.stride, **decoding_options(args))
    if args.chat:
        out = llm.chat([{"role": "user", "content": args.prompt}], params, **kw)[0]
    else:
        out = llm.generate([args.prompt], params, **kw)[0]
    stats = out.stats.to_dict()
    if args.stats_jsonl:
        with open(args.stats_jsonl, "a") as f:
            f.write(json.dumps({"finish_reason": out.finish_reason, **stats}) + "\n")
    if args.json:
        print(json.dumps({"text": out.text, "token_ids": out.token_ids, "finish_reason": out.finish_reason,
                          "stats": stats}, ensure_ascii=False))
        return 0
    print(out.text)
    line = (f"[{stats['decoding']} stride={stats['stride']}] prompt {stats['prompt_tokens']} tok, "
            f"generated {stats['generated_tokens']} tok in {stats['forwards']} forwards "
            f"({stats['tokens_per_forward']:.2f} tok/forward), {stats['seconds']:.2f} s, "
            f"{stats['tokens_per_second']:.1f} tok/s")
    if "acceptance_by_position" in stats:
        line += f", acceptance by position {stats['acceptance_by_position']}, rounds {stats['rounds']}"
    if "choices" in stats:
        line += f", steps by layout {stats['choices']}"
    print(line, file=sys.stderr)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    params = sampling_params(args)
    llm = load_llm(args)
    kw = dict(decoding=args.decoding, stride=args.stride, **decoding_options(args))
    messages: list[dict[str, str]] = []
    if args.system:
        messages.append({"role": "system", "content": args.system})
    print("idlm chat: empty line or Ctrl-D to quit, /reset to clear the conversation", file=sys.stderr)
    while True:
        try:
            user = input("> ")
        except EOFError:
            print(file=sys.stderr)
            return 0
        if not user.strip():
            return 0
        if user.strip() == "/reset":
            messages = messages[:1] if args.system else []
            continue
        messages.append({"role": "user", "content": user})
        out = None
        for delta, final in llm.stream_chat(messages, params, **kw):
            if delta:
                print(delta, end="", flush=True)
            out = final or out
        print()
        if out is not None:
            s = out.stats
            print(f"[{s.generated_tokens} tok, {s.tokens_per_forward:.2f} tok/forward, "
                  f"{s.tokens_per_second:.1f} tok/s]", file=sys.stderr)
            messages.append({"role": "assistant", "content": out.text})


def cmd_models(args: argparse.Namespace) -> int:
    from idlm.loading import cached_models, known_models

    print("known models:")
    for name in known_models():
        print(f"  {name}")
    print("cached:")
    for name, path in cached_models():
        print(f"  {name}\t{path}")
    return 0


def cmd_acceptance(args: argparse.Namespace) -> int:
    from idlm.eval.acceptance import by_kind, eval_prompt_records, evaluate_isd
    from idlm.eval.paired import paired_bootstrap

    llm = load_llm(args)
    baseline = load_llm(argparse.Namespace(**{**vars(args), "adapter": args.baseline_adapter})) \
        if args.baseline_adapter else None
    records = eval_prompt_records(args.prompts, llm.tokenizer, args.num_prompts)
    prompts = [ids for _, ids in records]
    kinds = [rec.get("kind") for rec, _ in records]
    strides = [int(x) for x in args.stride.split(",")] if args.stride else [llm.default_stride]

    def evaluate(engine, n: int, t: float) -> dict:
        decoding = args.decoding or ("risd" if engine.adapter is not None else "isd")
        res = evaluate_isd(engine.model, engine.tokenizer, engine.checkpoint.eos_token_ids, prompts, n,
                           args.max_tokens, engine.make_decoding(decoding, n).lora, temperature=t, seed=args.seed)
        res.update(model=args.model, adapter=str(engine.adapter_path) if engine.adapter_path else None,
                   decoding=decoding)
        if any(k is not None for k in kinds):  # the prompt file labels its prompts (the held-out file does)
            res["by_kind"] = by_kind(res["per_prompt"], kinds)
        print(json.dumps(res) if args.json else
              f"{res['adapter'] or 'no adapter'}: stride {n}, temperature {t:g}: TPF {res['tokens_per_forward']:.3f}, "
              f"acceptance by position {res['acceptance_by_position']}, introspective acceptance "
              f"{res['introspective_acceptance']:.3f}, rounds {res['rounds']} ({res['prompts']} prompts, "
              f"{res['generated_tokens']} tokens)")
        if "by_kind" in res and not args.json:
            print("  by kind, TPF / first-draft acceptance: " + ", ".join(
                f"{k} {v['tokens_per_forward']:.2f} / {(v['acceptance_by_position'] or [0.0])[0]:.2f}"
                for k, v in sorted(res["by_kind"].items(), key=lambda kv: kv[1]["tokens_per_forward"])))
        return res

    rows = []
    for n, t in [(n, float(t)) for t in args.temperature.split(",") for n in strides]:
        res = evaluate(llm, n, t)
        if baseline is not None:
            base = evaluate(baseline, n, t)
            res["baseline"] = base
            res["comparison"] = paired_bootstrap(base["per_prompt"], res["per_prompt"], seed=args.seed)
            print(comparison_line(res["comparison"]))
        rows.append(res)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


def comparison_line(c: dict) -> str:
    def one(s: dict) -> str:
        return (f"{s['baseline']:.3f} -> {s['candidate']:.3f} ({s['difference']:+.3f}, 95% CI "
                f"[{s['ci95'][0]:+.3f}, {s['ci95'][1]:+.3f}], better in {100 * s['candidate_better']:.1f}% of resamples)")

    lines = [f"paired bootstrap over {c['prompts']} prompts, adapter vs baseline: TPF {one(c['tokens_per_forward'])}"]
    lines += [f"  acceptance at draft position {j + 1}: {one(s)}" for j, s in enumerate(c["acceptance_by_position"])]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="idlm", description="Introspective Diffusion Language Models")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate text for one prompt and print stats")
    g.add_argument("prompt")
    add_model_args(g)
    add_sampling_args(g)
    add_decoding_args(g)
    g.add_argument("--chat", dest="chat", action="store_true", default=True, help="apply the chat template (default)")
    g.add_argument("--no-chat", dest="chat", action="store_false", help="raw text prompt")
    g.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    g.add_argument("--stats-jsonl", default=None, help="append one JSON line of stats per request")
    g.set_defaults(func=cmd_generate)

    c = sub.add_parser("chat", help="interactive chat with streaming output")
    add_model_args(c)
    add_sampling_args(c)
    add_decoding_args(c)
    c.add_argument("--system", default=None, help="system prompt")
    c.set_defaults(func=cmd_chat)

    a = sub.add_parser("acceptance", help="greedy ISD acceptance by draft position on held-out prompts")
    add_model_args(a)
    a.add_argument("--decoding", choices=["isd", "risd"], default=None, help="default: risd with an adapter, else isd")
    a.add_argument("--stride", default=None, help="comma list (default: the adapter's, else 4)")
    a.add_argument("--prompts", default=None, help="JSONL of chat prompts (default: the packaged held-out set)")
    a.add_argument("--num-prompts", type=int, default=40)
    a.add_argument("--max-tokens", type=int, default=64)
    a.add_argument("--temperature", default="0", help="comma list; 0 = greedy, above 0 = exact sampled ISD")
    a.add_argument("--seed", type=int, default=0, help="prompt i is seeded seed + i when sampling")
    a.add_argument("--json", action="store_true", help="one JSON line per stride")
    a.add_argument("--out", default=None, help="write all rows as JSON")
    a.add_argument("--baseline-adapter", default=None,
                   help="also decode the same prompts with this adapter ('none': off) and report a paired bootstrap "
                        "interval of the differences (TPF, acceptance by position)")
    a.set_defaults(func=cmd_acceptance)

    m = sub.add_parser("models", help="list known and cached models")
    m.set_defaults(func=cmd_models)

    from idlm.bench import commands as bench_commands

    bench_commands.register(sub)
    bench_commands.register_explore(sub)
    from idlm.eval import commands as eval_commands

    eval_commands.register(sub)
    from idlm.serve import commands as serve_commands

    serve_commands.register(sub)
    try:
        from idlm.training import commands as training_commands
    except ImportError:
        training_commands = None
    if training_commands is not None:
        training_commands.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from idlm.errors import USER_ERRORS

    try:
        return int(args.func(args) or 0)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
