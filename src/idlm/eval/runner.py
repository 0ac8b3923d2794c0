"""Running a task under one or more decodings, batched through `LLM`, and comparing the runs item by item.

A run is named by a spec: `ar`, `risd`, `auto`, `isd`, optionally with options after colons, e.g.
`risd:stride=3`, `risd:fast_verify`, `risd:verify_alpha=0.8`, `risd:confidence_accept_threshold=0.9`.
Parity: every run is compared with the first (the reference). Under greedy decoding a lossless decoding
must give the same tokens; where two outputs differ, the first differing position is located and both runs'
log-probabilities of the two tokens there are reported: a difference within `tie_tolerance` is a near-tie
(two tokens the model scores equally up to float rounding), anything else is a bug in a lossless decoding
(or the expected effect of a lossy one).
"""
from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from idlm.eval.tasks import EvalError, Item, Task

DECODING_NAMES = ("ar", "auto", "isd", "risd")
# int8 and bf16 weights: each product's inputs and outputs are rounded to bf16, so AR and verify steps drift apart
# over tokens (models/quantize.py; int8: per-token log-prob differences up to 0.12, divergences at gaps 0.002-0.09).
# w8a8 rounds the products' inputs to int8 steps: a 1e-7 difference (attention sums over 1 or 7 query rows, or
# over keys padded to another sequence's length) that moves one input across a rounding boundary moves it a whole
# step, and the logits by more (divergences at gaps up to 0.36 on 16 held-out prompts x 64 tokens)
TIE_TOLERANCE = {"float32": 2e-3, "bfloat16": 5e-2, "float16": 2e-2, "int8": 0.2, "int4": 0.2, "w8a8": 0.5,
                 "bf16": 0.2}


@dataclass(frozen=True)
class RunSpec:
    label: str
    decoding: str
    stride: int | None = None
    options: dict[str, Any] = field(default_factory=dict)


def _value(text: str) -> Any:
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def parse_runs(spec: str, stride: int | None = None) -> list[RunSpec]:
    """'ar,risd,risd:verify_alpha=0.8' -> run specs; `stride` applies where a spec gives none."""
    runs = []
    for label in [s.strip() for s in spec.split(",") if s.strip()]:
        name, *opts = label.split(":")
        if name not in DECODING_NAMES:
            raise EvalError(f"unknown decoding {name!r} in {label!r}; choose from {', '.join(DECODING_NAMES)}")
        options: dict[str, Any] = {}
        for opt in opts:
            key, _, val = opt.partition("=")
            options[key.strip().replace("-", "_")] = _value(val.strip()) if val else True
        run_stride = options.pop("stride", stride)
        runs.append(RunSpec(label, name, None if name == "ar" else run_stride, options))
    if not runs:
        raise EvalError("no decoding given")
    if len({r.label for r in runs}) != len(runs):
        raise EvalError(f"a decoding is listed twice in {spec!r}")
    return runs


def wilson_interval(correct: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion (sound at 0 and n, unlike the normal approximation)."""
    if n == 0:
        return (0.0, 0.0)
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def run_task(llm: Any, task: Task, items: list[Item], run: RunSpec, params: Any, progress: bool = True
             ) -> tuple[dict[str, Any], list[Any]]:
    """Generate every item's answer under `run` (all submitted at once; the engine batches them), then score.
    Returns the run's summary with per-item records, and the raw outputs (for parity)."""
    from tqdm import tqdm

    from idlm.decoding.stats import RequestStats

    decoding = llm.make_decoding(run.decoding, run.stride, **run.options)
    prompts = [llm.apply_chat_template(it.messages) for it in items]
    outputs: list[Any] = [None] * len(items)
    bar = tqdm(total=len(items), file=sys.stderr, disable=not progress, desc=f"{task.name} {run.label}", unit="item")
    t0 = time.perf_counter()
    for i, out in llm.as_completed(prompts, params, decoding=decoding):
        outputs[i] = out
        bar.update(1)
    seconds = time.perf_counter() - t0
    bar.close()
    total = RequestStats(decoding=outputs[0].stats.decoding if outputs else run.decoding,
                         stride=outputs[0].stats.stride if outputs else 1)
    records = []
    for it, out in zip(items, outputs):
        s = task.score(it, out.text)
        total.merge(out.stats)
        records.append({
            "id": it.id, "prompt": it.messages[-1]["content"], "output": out.text, "answer": s.answer,
            "gold": it.gold, "correct": s.correct, **({"detail": s.detail} if s.detail else {}),
            "tokens": len(out.token_ids), "forwards": out.stats.forwards,
            "tokens_per_forward": round(out.stats.tokens_per_forward, 3), "finish_reason": out.finish_reason,
        })
    correct = sum(r["correct"] for r in records)
    lo, hi = wilson_interval(correct, len(records))
    stats = total.to_dict()
    summary = {
        "label": run.label, "decoding": decoding.label if hasattr(decoding, "label") else run.decoding,
        "lossless": bool(getattr(decoding, "lossless", True)), "stride": stats["stride"], "options": run.options,
        "n": len(records), "correct": correct, "accuracy": round(correct / max(1, len(records)), 4),
        "ci95": [round(lo, 4), round(hi, 4)], "generated_tokens": stats["generated_tokens"],
        "tokens_per_forward": stats["tokens_per_forward"],
        "tokens_per_second": round(stats["generated_tokens"] / seconds, 2) if seconds > 0 else 0.0,
        "seconds": round(seconds, 2),
        **{k: stats[k] for k in ("acceptance_by_position", "cold_share", "choices") if k in stats},
        "records": records,
    }
    return summary, outputs


def _logprob_of(entry: Any, token: int) -> float | None:
    if entry is None:
        return None
    return next((lp for t, lp in entry.top if t == token), None)


def divergence(ref: Any, other: Any, tie_tolerance: float) -> dict[str, Any] | None:
    """Where two outputs' tokens first differ, with both runs' log-probabilities of both tokens there
    (None when the tokens are equal)."""
    a, b = list(ref.token_ids), list(other.token_ids)
    d = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
    if d is None:
        if len(a) == len(b):
            return None
        return {"position": min(len(a), len(b)), "kind": "length", "near_tie": False}
    out: dict[str, Any] = {"position": d, "kind": "token", "ref_token": a[d], "run_token": b[d]}
    gaps = []
    for name, res, mine, theirs in (("ref", ref, a[d], b[d]), ("run", other, b[d], a[d])):
        entry = res.logprobs[d] if res.logprobs else None
        lp_mine, lp_theirs = (entry.logprob if entry is not None else None), _logprob_of(entry, theirs)
        if lp_mine is not None and lp_theirs is not None:
            gaps.append(lp_mine - lp_theirs)
            out[f"{name}_gap"] = round(lp_mine - lp_theirs, 6)  # how much its own choice was preferred
    out["near_tie"] = len(gaps) == 2 and max(abs(g) for g in gaps) <= tie_tolerance
    return out


def parity(task: Task, reference: dict[str, Any], ref_outputs: list[Any], run: dict[str, Any],
           run_outputs: list[Any], tie_tolerance: float, greedy: bool = True) -> dict[str, Any]:
    """Item-by-item comparison of `run` against the reference run. Sampled runs draw their own random
    streams (ISD consumes randomness differently from AR): only answers and accuracy compare there, and
    differences are not classified."""
    differing = []
    identical = same_answer = same_correct = 0
    for r0, r1, o0, o1 in zip(reference["records"], run["records"], ref_outputs, run_outputs):
        div = divergence(o0, o1, tie_tolerance)
        identical += div is None
        same_answer += r0["answer"] == r1["answer"]
        same_correct += r0["correct"] == r1["correct"]
        if div is not None:
            differing.append({"id": r0["id"], **div, "ref_answer": r0["answer"], "run_answer": r1["answer"]})
    n = len(run["records"])
    return {
        "reference": reference["label"], "run": run["label"], "lossless": run["lossless"], "n": n,
        "identical_outputs": identical, "same_answers": same_answer, "same_correctness": same_correct,
        "near_ties": sum(d["near_tie"] for d in differing) if greedy else None,
        "unexplained": sum(not d["near_tie"] for d in differing) if greedy else None,
        "accuracy_delta": round(run["accuracy"] - reference["accuracy"], 4),
        "differing": differing,
    }


def markdown(result: dict[str, Any]) -> str:
    m = result["machine"]
    lines = [f"## idlm eval {result['task']}: {result['n']} items ({result['data_file']})", "",
             "| decoding | lossless | accuracy | 95% CI | TPF | tok/s | identical to ref | same answer | near-ties "
             "| unexplained |", "|---|---|---|---|---|---|---|---|---|---|"]
    par = {p["run"]: p for p in result["parity"]}
    for r in result["runs"]:
        p = par.get(r["label"])
        classified = p is not None and p["unexplained"] is not None
        cmp = (f"{p['identical_outputs']}/{p['n']} | {p['same_answers']}/{p['n']} | "
               + (f"{p['near_ties']} | {p['unexplained']}" if classified else "n/a (sampled) | n/a")) if p \
            else "(reference) | | |"
        lines.append(f"| {r['label']} | {'yes' if r['lossless'] else 'no'} | {r['accuracy']:.3f} "
                     f"({r['correct']}/{r['n']}) | [{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}] | "
                     f"{r['tokens_per_forward']:.2f} | {r['tokens_per_second']:.1f} | {cmp} |")
    weights = f" + {result['quantize']} weights" if result.get("quantize") else ""
    lines += ["", f"Model {result['model']} + adapter {result['adapter']}, {result['dtype']}{weights}, temperature "
              f"{result['temperature']}, max {result['max_tokens']} tokens, batch {result['batch_size']}; "
              f"{m['cpu']} ({m['cores']} cores, capability {m['cpu_capability']}), torch {m['torch']}.",
              f"Command: `{result['command']}`"]
    return "\n".join(lines) + "\n"
