"""`idlm eval` end to end on fixture data: JSON + markdown written, records per item, and the greedy
parity of R-ISD against AR item by item (a tiny model with a random gated adapter, and the embedded model
with its shipped adapter)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import requires_embedded
from idlm.cli import main
from test_loading import save_tiny, tiny_tokenizer  # noqa: F401 (fixture)
from test_lora import random_gated_adapter

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tiny_tokenizer):  # noqa: F811
    root = tmp_path_factory.mktemp("eval-model")
    save_tiny(root / "model", tiny_tokenizer)
    return root / "model", random_gated_adapter(root / "model", root / "adapter")


def run_eval(tmp_path, *args: str) -> dict:
    out = tmp_path / "result.json"
    assert main(["eval", *args, "--out", str(out), "--no-progress"]) == 0
    assert out.with_suffix(".md").read_text().startswith("## idlm eval")
    return json.loads(out.read_text())


@pytest.mark.parametrize("task, data", [("gsm8k", "gsm8k.jsonl"), ("humaneval", "humaneval.jsonl"),
                                        ("arc-easy", "arc.jsonl")])
def test_each_task_runs_end_to_end_and_risd_agrees_with_ar_item_by_item(tmp_path, tiny, task, data):
    model, adapter = tiny
    r = run_eval(tmp_path, task, "--data", str(DATA / data), "--limit", "3", "--model", str(model),
                 "--adapter", str(adapter), "--decoding", "ar,risd:stride=3", "--max-tokens", "24",
                 "--batch-size", "2", "--strict")
    ar, risd = r["runs"]
    assert r["task"] == task and r["n"] == len(ar["records"]) == len(risd["records"]) <= 3
    for rec in ar["records"]:
        assert {"id", "prompt", "output", "answer", "gold", "correct", "tokens_per_forward"} <= set(rec)
    assert risd["stride"] == 3 and risd["lossless"] and 0.0 <= ar["ci95"][0] <= ar["ci95"][1] <= 1.0
    (par,) = r["parity"]
    assert par["identical_outputs"] == par["n"] == r["n"] and par["unexplained"] == 0
    assert [a["output"] for a in ar["records"]] == [b["output"] for b in risd["records"]]
    assert r["machine"]["cpu_capability"]


def test_bad_input_is_a_clear_error(tmp_path, tiny, capsys):
    model, _ = tiny
    assert main(["eval", "nope"]) == 2 and "unknown task" in capsys.readouterr().err
    assert main(["eval", "gsm8k", "--data", str(tmp_path / "missing.jsonl")]) == 2
    assert "not found" in capsys.readouterr().err
    assert main(["eval", "gsm8k", "--data", str(DATA / "gsm8k.jsonl"), "--model", str(model),
                 "--decoding", "ar,beam"]) == 2
    assert "unknown decoding" in capsys.readouterr().err


@requires_embedded
def test_embedded_model_risd_gives_ars_answers(tmp_path):
    """The shipped adapter on the embedded model: R-ISD (the default stride) writes AR's outputs token for token."""
    r = run_eval(tmp_path, "gsm8k", "--data", str(DATA / "gsm8k.jsonl"), "--limit", "3", "--decoding", "ar,risd",
                 "--max-tokens", "64", "--batch-size", "3")
    (par,) = r["parity"]
    assert par["identical_outputs"] == 3 and par["same_answers"] == 3, par["differing"]
    assert r["runs"][1]["tokens_per_forward"] > 1.0
