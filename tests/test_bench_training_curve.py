"""`idlm bench training-curve`: evaluation points placed at cumulative training tokens over stages."""
from __future__ import annotations

import json

from idlm.cli import main


def _metrics(path, steps):
    lines = []
    for step, tokens, tpf in steps:
        lines.append({"step": step, "loss": 1.0, "tokens": tokens})
        if tpf is not None:
            lines.append({"step": step, "eval": {"tokens_per_forward": tpf, "acceptance_by_position": [0.3, 0.2]}})
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    return path


def test_points_follow_cumulative_tokens_across_stages(tmp_path):
    a = _metrics(tmp_path / "a.jsonl", [(1, 100, None), (2, 200, 1.1)])
    run_b = tmp_path / "b"
    run_b.mkdir()
    _metrics(run_b / "metrics.jsonl", [(1, 50, 1.2), (2, 150, 1.3)])
    with (run_b / "metrics.jsonl").open("a") as f:  # eval.at_start: a record at step 0, the stage's start
        f.write(json.dumps({"step": 0, "eval": {"tokens_per_forward": 1.05, "acceptance_by_position": [0.3]}}) + "\n")
    out = tmp_path / "curve"
    assert main(["bench", "training-curve", str(a), str(run_b), "--out", str(out)]) == 0
    pts = json.loads(out.with_suffix(".json").read_text())["points"]
    assert [(p["tokens"], p["tokens_per_forward"]) for p in pts] == [(200, 1.1), (200, 1.05), (250, 1.2), (350, 1.3)]
    assert [p["stage"] for p in pts] == ["1: a.jsonl", "2: b", "2: b", "2: b"]  # a run dir is named by its folder
    assert out.with_suffix(".png").stat().st_size > 1000
    assert main(["bench", "training-curve", str(tmp_path / "missing.jsonl")]) == 2


def test_heldout_results_sit_at_their_stage_ends(tmp_path):
    a = _metrics(tmp_path / "a.jsonl", [(1, 100, 1.1)])
    b = _metrics(tmp_path / "b.jsonl", [(1, 60, 1.2), (2, 80, 1.3)])
    held = tmp_path / "held.json"
    held.write_text(json.dumps([{"temperature": 0.7, "tokens_per_forward": 9.0, "acceptance_by_position": [0.9, 0.9]},
                                {"temperature": 0.0, "tokens_per_forward": 1.25, "acceptance_by_position": [0.4, 0.3],
                                 "prompts": 40}]))
    out = tmp_path / "curve"
    assert main(["bench", "training-curve", str(a), str(b), "--heldout", f"2={held}", "--heldout", f"1={held}",
                 "--out", str(out)]) == 0
    got = json.loads(out.with_suffix(".json").read_text())["heldout"]
    assert [(h["stage"], h["tokens"], h["tokens_per_forward"]) for h in got] == [(1, 100, 1.25), (2, 180, 1.25)]
    for bad in ("3=" + str(held), str(held), "x=" + str(held)):
        assert main(["bench", "training-curve", str(a), str(b), "--heldout", bad, "--out", str(out)]) == 2
