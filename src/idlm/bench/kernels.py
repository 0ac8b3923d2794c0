"""`idlm bench kernels`: one projection's cost by row count and kernel, for every weight shape of a model.

Kernels: aten's int8 kernel (`aten._weight_int8pack_mm`) and int4 one (`aten._weight_int4pack_mm_for_cpu`, where the
shape fits it), both with bf16 inputs (models/quantize.py), oneDNN with the weight packed in float32 and in bfloat16
(where the CPU packs it), and our panel kernels for float32 and int8 weights, w8a8 (int8 weights and activations,
models/panel.py, where they build) and float32 weights that are GGUF blocks ("gguf_panel": Q4_1, the LM head Q8_0, as
the embedded model's are; read as their codes, models/block_codes.py). The
row counts are those of decode steps (AR: 1 per request; R-ISD stride N: 2N - 1). Interleaved, median of `repeats`;
the table says which kernel is fastest at each row count, and the row limits quantize_model would measure (with
aten's int8 kernel).
"""
from __future__ import annotations

import argparse
import itertools
import time
from pathlib import Path
from typing import Any

import torch

from idlm.bench.results import machine_info, write_results


def shapes(model: str) -> dict[str, tuple[int, int]]:
    """(out, in) of each distinct product of the model once fused (q/k/v, o, gate/up, down, LM head)."""
    from idlm.loading import load_checkpoint
    from idlm.models.fuse import fuse_projections
    from idlm.models.llama import Proj

    m = load_checkpoint(model, torch.float32, "cpu").model.requires_grad_(False)
    fuse_projections(m)
    layer = m.model.layers[0]
    names = {"qkv": layer.self_attn.qkv, "o": layer.self_attn.o_proj, "gate_up": layer.mlp.gate_up,
             "down": layer.mlp.down_proj}
    out = {n: tuple(p.weight.shape) for n, p in names.items() if isinstance(p, Proj)}
    out["lm_head"] = tuple(m.output_weight().shape)
    return out


def run_kernels_bench(args: argparse.Namespace) -> dict[str, Any]:
    from idlm.models import panel
    from idlm.models.block_codes import BLOCK, random_blocks
    from idlm.models.llama import PackedLinear
    from idlm.models.quantize import Int4Linear, Int8Linear, Int8PanelLinear, W8A8Linear, measure_row_limit
    from idlm.models.timing import copies_beyond_cache, interleaved_medians, on_copies

    rows_list = [int(r) for r in args.rows.split(",")]
    rows = []
    has_panel = panel.available() is None
    for name, (n, k) in shapes(args.model).items():
        w = torch.randn(n, k) * 0.05
        copies = 1 if args.hot else copies_beyond_cache(w.numel() * 4)
        kinds = [Int8Linear] + ([Int4Linear] if Int4Linear.fits(w) else [])
        quantized = {kind.format: [kind(w, None, 1 << 30) for _ in range(copies)] for kind in kinds}
        if has_panel:
            quantized["int8_panel"] = [Int8PanelLinear(w, None) for _ in range(copies)]
            quantized["w8a8"] = [W8A8Linear(w, None) for _ in range(copies)]
        fp32 = [PackedLinear(w) for _ in range(copies)]
        panels = [panel.PanelLinear(w) for _ in range(copies)] if has_panel else None
        coded = None
        if has_panel and k % BLOCK == 0:
            kind = "q8_0" if name == "lm_head" else "q4_1"
            wg = random_blocks(n, k, kind)
            coded = [panel.PanelLinear(wg)]
            coded_copies = 1 if args.hot else copies_beyond_cache(coded[0].panels.nbytes)
            coded += [panel.PanelLinear(wg) for _ in range(1, coded_copies)]
        try:
            bf16 = [PackedLinear(w.bfloat16()) for _ in range(copies)]
        except RuntimeError:
            bf16 = None
        with torch.inference_mode():
            for m in rows_list:
                x = torch.randn(m, k)
                xb = x.bfloat16()
                inputs = {**{f: (lins, x) for f, lins in quantized.items()}, "fp32": (fp32, x)}
                if bf16 is not None:
                    inputs["bf16"] = (bf16, xb)
                if panels is not None:
                    inputs["panel"] = (panels, x)
                if coded is not None:
                    inputs["gguf_panel"] = (coded, x)
                kernels = {f: on_copies(itertools.cycle(ks), lambda k, a=a: k(a)) for f, (ks, a) in inputs.items()}
                t = {n: round(v * 1e6, 1) for n, v in interleaved_medians(kernels, args.repeats, warmup=3).items()}
                rows.append({"product": name, "out": n, "in": k, "rows": m, **{f"{k_}_us": v for k_, v in t.items()},
                             "fastest": min(t, key=t.get)})
            limits = {f"{kind.format}_row_limit": measure_row_limit(kind, k, n) for kind in kinds}
        for r in rows:
            if r["product"] == name:
                r.update(limits)
    result = {"benchmark": "kernels", "model": args.model, "repeats": args.repeats,
              "weights": "hot (one copy, in cache)" if args.hot else "from memory (copies cycled past 64 MB)",
              "rows": rows, "machine": machine_info("cpu"), "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    write_results(result, Path(args.out), "kernels", markdown(result))
    return result


def markdown(result: dict[str, Any]) -> str:
    columns = [("int8_us", "int8 aten (us)"), ("int8_panel_us", "int8 panel (us)"), ("w8a8_us", "w8a8 panel (us)"),
               ("int4_us", "int4 aten (us)"),
               ("fp32_us", "fp32 oneDNN (us)"),
               ("bf16_us", "bf16 oneDNN (us)"), ("panel_us", "fp32 panel (us)"),
               ("gguf_panel_us", "fp32 GGUF-coded panel (us)"), ("fastest", "fastest"),
               ("int8_row_limit", "int8 row limit"), ("int4_row_limit", "int4 row limit")]
    columns = [(k, h) for k, h in columns if any(k in r for r in result["rows"])]
    lines = ["| product (out x in) | rows | " + " | ".join(h for _, h in columns) + " |",
             "|---|---|" + "---|" * len(columns)]
    for r in result["rows"]:
        lines.append(f"| {r['product']} ({r['out']} x {r['in']}) | {r['rows']} | "
                     + " | ".join(str(r.get(k, "")) for k, _ in columns) + " |")
    m = result["machine"]
    lines += ["", f"{m['cpu']} ({m['cores']} cores, {m['torch_threads']} torch threads, capability "
                  f"{m['cpu_capability']}), torch {m['torch']}; median of {result['repeats']} interleaved calls; weights "
                  f"{result['weights']}."]
    return "\n".join(lines) + "\n"
