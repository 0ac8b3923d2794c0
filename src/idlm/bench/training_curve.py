"""`idlm bench training-curve`: held-out TPF and acceptance by draft position against training tokens over
all stages of an adapter, one PNG (+ JSON), so the next stage can be planned from the slope.

Each stage is a training run's `metrics.jsonl` (or its run directory); its evaluation records (the trainer's
periodic evaluation, on whatever prompts its config named) are placed at the training tokens seen by then,
offset by the tokens of the stages before it. `--heldout N=FILE` adds an `idlm acceptance --out` result (its
greedy run) at the end of stage N: the held-out file's figures, comparable across stages whose dev sets differ.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def stage_points(metrics: Path, offset: int, label: str) -> tuple[list[dict[str, Any]], int]:
    """(evaluation points with cumulative tokens, tokens at the stage's end)."""
    tokens_at: dict[int, int] = {}
    evals = []
    for line in metrics.read_text().splitlines():
        if not line.strip():
            continue
        rec = json.loads(line)
        if "eval" in rec:
            evals.append(rec)
        elif "tokens" in rec:
            tokens_at[int(rec["step"])] = int(rec["tokens"])
    last = max(tokens_at.values(), default=0)
    points = []
    for rec in sorted(evals, key=lambda r: r["step"]):
        ev = rec["eval"]
        at = 0 if rec["step"] == 0 else tokens_at.get(rec["step"], last)  # step 0: the stage's starting point
        points.append({"stage": label, "step": rec["step"], "tokens": offset + at,
                       "tokens_per_forward": ev["tokens_per_forward"],
                       "acceptance_by_position": ev["acceptance_by_position"], "prompts": ev.get("prompts")})
    return points, offset + last


def heldout_point(spec: str, bounds: list[int]) -> dict[str, Any]:
    """`N=FILE`: the greedy run of an `idlm acceptance` result placed at the end of stage N."""
    stage, sep, file = spec.partition("=")
    if not sep or not stage.isdigit() or not 1 <= int(stage) <= len(bounds):
        raise ValueError(f"--heldout {spec!r}: expected N=FILE with N a stage number from 1 to {len(bounds)}")
    data = json.loads(Path(file).read_text())
    runs = data if isinstance(data, list) else [data]
    greedy = next((r for r in runs if r.get("temperature", 0) == 0), None)
    if greedy is None:
        raise ValueError(f"--heldout {file}: no greedy (temperature 0) run in it")
    return {"stage": int(stage), "file": file, "tokens": bounds[int(stage) - 1],
            "tokens_per_forward": greedy["tokens_per_forward"],
            "acceptance_by_position": greedy["acceptance_by_position"], "prompts": greedy.get("prompts")}


def run(args: argparse.Namespace) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points: list[dict[str, Any]] = []
    offset = 0
    bounds = []
    for item in args.stages:
        p = Path(item)
        metrics = p / "metrics.jsonl" if p.is_dir() else p
        if not metrics.is_file():
            raise FileNotFoundError(f"no metrics file at {metrics}")
        got, offset = stage_points(metrics, offset, f"{len(bounds) + 1}: {p.name}")
        points += got
        bounds.append(offset)
    if not points:
        raise ValueError("the stages hold no evaluation records")
    heldout = sorted((heldout_point(spec, bounds) for spec in args.heldout or []), key=lambda h: h["stage"])
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    stages = list(dict.fromkeys(pt["stage"] for pt in points))  # each stage its own segment: eval sets may differ
    positions = max(len(pt["acceptance_by_position"]) for pt in points)
    for i, stage in enumerate(stages):
        pts = [pt for pt in points if pt["stage"] == stage]
        x = [pt["tokens"] / 1e6 for pt in pts]
        marker = "osd^v<>"[i % 7]
        a.plot(x, [pt["tokens_per_forward"] for pt in pts], marker + "-", color="C0",
               label=f"{stage} ({pts[0]['prompts']} prompts)")
        for j in range(positions):
            b.plot(x, [pt["acceptance_by_position"][j] if j < len(pt["acceptance_by_position"]) else None
                       for pt in pts], marker + "-", color=f"C{j}", label=f"draft {j + 1}" if i == 0 else None)
    if heldout:
        x = [h["tokens"] / 1e6 for h in heldout]
        a.plot(x, [h["tokens_per_forward"] for h in heldout], "*-", color="k", ms=10,
               label=f"held-out file, stage ends ({heldout[0]['prompts']} prompts)")
        for j in range(positions):
            b.plot(x, [h["acceptance_by_position"][j] for h in heldout], "*:", color=f"C{j}", ms=10,
                   label="held-out file" if j == 0 else None)
    a.set(xlabel="training tokens (M)", ylabel="tokens per forward", title="TPF (stride 4, greedy)")
    a.legend(fontsize=7)
    b.set(xlabel="training tokens (M)", ylabel="acceptance", title="acceptance by draft position")
    b.legend()
    for ax in (a, b):
        for t in bounds[:-1]:
            ax.axvline(t / 1e6, color="grey", lw=0.6, ls="--")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out.with_suffix(".png"), dpi=120)
    out.with_suffix(".json").write_text(json.dumps({"stages": args.stages, "points": points, "heldout": heldout},
                                                   indent=2))
    print(f"wrote {out.with_suffix('.png')} and .json ({len(points)} points, {offset:,} tokens)")
    return 0
