"""`idlm explore`: the predicted speed-up of ISD / R-ISD over AR by stride, branches and batch size on this
machine, and where a step turns from memory-bound to compute-bound.

It measures, through the engine's cost model (engine/cost_model.py), the step time of AR and of the cold and
verify rounds of every layout at a few batch sizes (steps beyond `--max-rows` rows are left to the fit),
fits `StepFit` (a fixed cost plus per-row costs) to them, and turns acceptance by draft position into tokens
per forward and cold share through the round model (decoding/round_model.py). `--validate` also measures
the real speed-up of R-ISD stride 3 and 4 (without and with every branch) over AR at batch 1, 4 and 16 in
interleaved repeats and reports the prediction error. Output: a table, JSON + markdown and PNG plots
(speed-up by stride per batch size; the regime map) under the output directory.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from idlm.bench.decode import heldout_prompts, run_ours
from idlm.bench.results import machine_info
from idlm.bench.results import write_results
from idlm.decoding.policy import Decoding
from idlm.decoding.round_model import estimate
from idlm.engine.cost_model import CONTEXT, CostModel, StepFit, measure
from idlm.engine.machine_cache import machine_key
VALIDATE_BATCHES = (1, 4, 16)
VALIDATE_STRIDES = (3, 4)


def layout(llm, stride: int, branches: int | None) -> Decoding:
    """R-ISD (ISD without a gated adapter) at this stride and branches."""
    base = llm.make_decoding("risd" if llm.adapter is not None and llm.adapter.gated else "isd", 2)
    return Decoding(base.name, stride, base.lora, branches=branches)


def layouts(llm, strides: list[int]) -> list[Decoding]:
    """Every stride, without branches and with one at every draft."""
    return [layout(llm, n, b) for n in strides for b in (0, None)]


def predict(cost: CostModel, decodings: list[Decoding], acceptance: list[float], batches: list[int],
            mask_token_id: int) -> list[dict[str, Any]]:
    rows = []
    for d in decodings:
        e = estimate(acceptance, d.stride, d.branches)
        for b in batches:
            rows.append({"decoding": d.label, "stride": d.stride, "branches": "all" if d.branches is None else 0,
                         "batch": b, "tokens_per_forward": round(e.tokens_per_forward, 4),
                         "cold_share": round(e.cold_share, 4), "rows_per_forward": round(e.rows_per_forward, 2),
                         "speedup": round(cost.speedup(d, acceptance, b, mask_token_id), 4)})
    return rows


def regime_map(fit: StepFit, batches: list[int], rows: list[int]) -> list[list[float]]:
    """Step time with r rows per sequence (1 committed + r - 1 MASK rows through the adapter, all with logits)
    over an AR step at the same batch size: [len(rows)][len(batches)]."""
    return [[round(fit.seconds(b, r, r - 1, r) / fit.seconds(b, 1, 0, 1), 4) for b in batches] for r in rows]


def validate(llm, cost: CostModel, predicted: list[dict[str, Any]], prompts: int, max_tokens: int,
             repeats: int) -> list[dict]:
    """Measured speed-up of R-ISD stride 3 / 4, without and with every branch, over AR at batch 1, 4 and 16
    (interleaved repeats, the median ratio and its range) beside the prediction, and beside the prediction
    from the acceptance these very runs had (which isolates the cost model's error from the acceptance's)."""
    by_key = {(p["stride"], p["branches"], p["batch"]): p for p in predicted}
    name = layout(llm, 2, 0).name
    configs = [("ar", None, 0)] + [(name, n, b) for n in VALIDATE_STRIDES for b in (0, -1)]
    out = []
    for batch in VALIDATE_BATCHES:
        texts = heldout_prompts(max(prompts, batch))
        runs: dict[tuple, list[dict]] = {}
        for _ in range(repeats):
            for decoding, stride, b in configs:
                options = {} if decoding == "ar" else {"branches": None if b == -1 else 0}
                runs.setdefault((decoding, stride, b), []).append(
                    run_ours(llm, texts, max_tokens, batch, decoding, stride, **options))
        ar = runs[configs[0]]
        for decoding, stride, b in configs[1:]:
            ratios = [r["tok_per_s"] / a["tok_per_s"] for r, a in zip(runs[(decoding, stride, b)], ar)]
            pred = by_key.get((stride, "all" if b == -1 else 0, batch))
            measured = statistics.median(ratios)
            row = {"stride": stride, "branches": "all" if b == -1 else 0, "batch": batch,
                   "measured": round(measured, 4), "measured_range": [round(min(ratios), 4), round(max(ratios), 4)],
                   "measured_tpf": round(statistics.median(r["tpf"] for r in runs[(decoding, stride, b)]), 4)}
            if pred is not None:
                row.update(predicted=pred["speedup"], predicted_tpf=pred["tokens_per_forward"],
                           error=round(abs(pred["speedup"] - measured) / measured, 4))
            seen = runs[(decoding, stride, b)][0]["acceptance"]  # greedy: the same in every repeat
            if seen:
                d = layout(llm, stride, None if b == -1 else 0)
                at_seen = cost.speedup(d, seen, batch, llm.model.mask_token_id)
                row.update(run_acceptance=seen, predicted_at_run_acceptance=round(at_seen, 4),
                           error_at_run_acceptance=round(abs(at_seen - measured) / measured, 4))
            out.append(row)
            print(f"validate batch {batch:>2} {name} N={stride} branches={row['branches']}: measured "
                  f"{measured:.3f}, predicted {row.get('predicted')}", file=sys.stderr)
    return out


def plot(result: dict[str, Any], base: Path) -> list[Path]:
    """speed-up by stride (one line per batch size; without / with branches) and the regime map."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, branches in zip(axes, (0, "all")):
        for b in result["batches"]:
            pts = sorted((p["stride"], p["speedup"]) for p in result["predictions"]
                         if p["branches"] == branches and p["batch"] == b)
            ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=f"batch {b}")
        for v in result.get("validation", []):
            if v["branches"] == branches:
                ax.errorbar([v["stride"]], [v["measured"]], yerr=[[v["measured"] - v["measured_range"][0]],
                                                                   [v["measured_range"][1] - v["measured"]]],
                            fmt="x", color="black")
        ax.axhline(1.0, color="grey", lw=0.8, ls="--")
        ax.set_xticks(result["strides"])
        ax.set_xlabel("stride N")
        ax.set_title("R-ISD, " + ("no branches" if branches == 0 else "a branch at every draft"))
    axes[0].set_ylabel("predicted speed-up over AR (x: measured)")
    axes[1].legend(fontsize=8)
    fig.suptitle(f"acceptance {result['acceptance']} on {result['machine']['cpu']} "
                 f"({result['machine']['cpu_capability']}, {result['machine']['torch_threads']} threads)", fontsize=9)
    fig.tight_layout()
    paths.append(base.with_name(base.name + "-speedup.png"))
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    grid = result["regime"]
    im = ax.imshow(grid["relative_step_time"], origin="lower", aspect="auto", cmap="viridis",
                   norm=matplotlib.colors.LogNorm())
    ax.set_xticks(range(len(grid["batches"])), [str(b) for b in grid["batches"]])
    ax.set_yticks(range(len(grid["rows_per_sequence"])), [str(r) for r in grid["rows_per_sequence"]])
    ax.set_xlabel("batch size")
    ax.set_ylabel("rows per sequence")
    bound = result["fit"]["boundary_rows"]
    xs = list(range(len(grid["batches"])))
    ys = [min(len(grid["rows_per_sequence"]) - 1, max(0, _row_index(grid["rows_per_sequence"], bound / b)))
          for b in grid["batches"]]
    ax.plot(xs, ys, color="white", ls="--", label=f"{bound:.0f} rows per step: memory- | compute-bound")
    ax.legend(fontsize=8, loc="upper right")
    fig.colorbar(im, ax=ax, label="step time / AR step time (same batch)")
    fig.tight_layout()
    paths.append(base.with_name(base.name + "-regime.png"))
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


def _row_index(rows: list[int], value: float) -> float:
    """Fractional index of `value` on the rows axis (for drawing the boundary)."""
    for i in range(len(rows) - 1):
        if rows[i] <= value <= rows[i + 1]:
            return i + (value - rows[i]) / (rows[i + 1] - rows[i])
    return 0.0 if value < rows[0] else len(rows) - 1.0


def markdown(result: dict[str, Any]) -> str:
    batches = result["batches"]
    lines = ["| layout | TPF | cold share | rows / forward | " + " | ".join(f"batch {b}" for b in batches) + " |",
             "|---|---|---|---|" + "---|" * len(batches)]
    by = {}
    for p in result["predictions"]:
        by.setdefault(p["decoding"], []).append(p)
    for label, ps in by.items():
        p0 = ps[0]
        lines.append(f"| {label} | {p0['tokens_per_forward']} | {p0['cold_share']} | {p0['rows_per_forward']} | "
                     + " | ".join(f"{p['speedup']:.2f}x" for p in sorted(ps, key=lambda p: p["batch"])) + " |")
    f, m = result["fit"], result["machine"]
    lines += ["", f"Predicted speed-up over AR (tokens/s) with acceptance by draft position {result['acceptance']} "
              f"({result['acceptance_source']}). Step fit: fixed {f['fixed'] * 1e3:.1f} ms + per sequence "
              f"{f['per_seq'] * 1e3:.2f} ms + per row {f['per_row'] * 1e3:.2f} ms + per adapter row "
              f"{f['per_gated'] * 1e3:.2f} ms + per logit row {f['per_logit'] * 1e3:.2f} ms; memory-bound below "
              f"about {f['boundary_rows']:.0f} rows per step, compute-bound above. {m['cpu']} (capability "
              f"{m['cpu_capability']}, {m['torch_threads']} threads), torch {m['torch']}, {result['dtype']}."]
    if result.get("validation"):
        lines += ["", "| layout | batch | predicted | measured (range) | error | predicted TPF | measured TPF | "
                  "predicted at the runs' acceptance | error |", "|---|---|---|---|---|---|---|---|---|"]
        for v in result["validation"]:
            lines.append(f"| N={v['stride']} branches={v['branches']} | {v['batch']} | {v.get('predicted')} | "
                         f"{v['measured']} ({v['measured_range'][0]}-{v['measured_range'][1]}) | "
                         f"{v.get('error')} | {v.get('predicted_tpf')} | {v['measured_tpf']} | "
                         f"{v.get('predicted_at_run_acceptance')} | {v.get('error_at_run_acceptance')} |")
        lines += ["", f"Median error {result['validation_median_error']} (at the runs' own acceptance: "
                  f"{result['validation_median_error_at_run_acceptance']}), {result['validation_repeats']} "
                  "interleaved repeats per point."]
    return "\n".join(lines) + "\n"


def acceptance_for(llm, given: str | None, strides: list[int]) -> tuple[list[float], str]:
    if given:
        return [float(a) for a in given.split(",")], "given"
    if llm.adapter is not None and llm.adapter.acceptance:
        return list(llm.adapter.acceptance), "recorded in the adapter (held-out, greedy)"
    from idlm.eval.acceptance import evaluate_isd, load_eval_prompts

    prompts = load_eval_prompts(None, llm.tokenizer, 16)
    res = evaluate_isd(llm.model, llm.tokenizer, llm.engine.eos_token_ids, prompts, max(strides), 64,
                       layout(llm, 2, 0).lora)
    return res["acceptance_by_position"] or [0.0], "measured now (16 held-out prompts, greedy)"


def run_explore(args: argparse.Namespace, llm=None) -> dict[str, Any]:
    from idlm import LLM

    strides = [int(x) for x in args.strides.split(",")]
    batches = [int(x) for x in args.batches.split(",")]
    measured = sorted({int(x) for x in args.measure_batches.split(",")} | {1})
    if args.quick:
        strides, batches, measured = [2, 4], [1, 2, 4], [1, 4]
    decodings_room = max(batches) * (CONTEXT + 2 * max(strides) + max(strides) ** 2 + 8)
    if llm is None:
        llm = LLM(args.model, adapter=args.adapter, dtype=args.dtype, device=args.device,
                  max_num_seqs=max(max(batches), max(VALIDATE_BATCHES) if args.validate else 1),
                  kv_cache_tokens=max(decodings_room, 16 * (args.max_tokens + 320)))
    acceptance, source = acceptance_for(llm, args.acceptance, strides)
    decodings = layouts(llm, strides)
    mask = llm.model.mask_token_id
    t0 = time.perf_counter()
    cost = measure(llm.engine, decodings, measured, context=CONTEXT, repeats=2 if args.quick else args.repeats,
                   key={**machine_key(), "model": llm.name, "dtype": str(llm.dtype)}, max_rows=args.max_rows)
    fit = cost.fit()
    print(f"measured {sum(len(v) for v in cost.seconds.values())} layouts x batch sizes in "
          f"{time.perf_counter() - t0:.0f} s", file=sys.stderr)
    predictions = predict(cost, decodings, acceptance, batches, mask)
    rows_axis = [1, 2, 4, 8, 16, 32, 64]
    result: dict[str, Any] = {
        "benchmark": "explore",
        "command": "idlm " + " ".join(sys.argv[1:]) if sys.argv and sys.argv[0].endswith("idlm") else None,
        "model": llm.name,
        "adapter": str(llm.adapter_path) if llm.adapter_path else None,
        "dtype": str(llm.dtype).replace("torch.", ""),
        "acceptance": [round(a, 4) for a in acceptance],
        "acceptance_source": source,
        "strides": strides,
        "batches": batches,
        "measured_batches": measured,
        "machine": machine_info(str(llm.device)),
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "step_seconds": cost.seconds,
        "fit": {**{k: getattr(fit, k) for k in ("fixed", "per_seq", "per_row", "per_gated", "per_logit")},
                "boundary_rows": fit.boundary_rows},
        "predictions": predictions,
        "regime": {"batches": batches, "rows_per_sequence": rows_axis,
                   "relative_step_time": regime_map(fit, batches, rows_axis)},
    }
    if args.validate:
        v = validate(llm, cost, predictions, args.validate_prompts, args.max_tokens, args.validate_repeats)
        result["validation"] = v
        for field in ("error", "error_at_run_acceptance"):
            errors = [x[field] for x in v if field in x]
            result[f"validation_median_{field}"] = round(statistics.median(errors), 4) if errors else None
        result["validation_repeats"] = args.validate_repeats
    path = write_results(result, Path(args.out), "explore", markdown(result))
    try:
        pngs = plot(result, path.with_suffix(""))
        print("plots: " + ", ".join(str(p) for p in pngs), file=sys.stderr)
    except ImportError:
        print("no plots: matplotlib is not installed (pip install 'idlm[plots]')", file=sys.stderr)
    return result
