"""`idlm bench serve` and `idlm bench profile` end to end on a tiny model: rows per decoding and level, JSON,
markdown and the plot written."""
from __future__ import annotations

import json

import pytest
import torch

from idlm.models import panel
from serve_helpers import tiny_model, tiny_tokenizer  # noqa: F401 (fixtures)
from test_cli import idlm


def test_bench_serve_writes_rows_and_a_plot(tiny_model, tmp_path):  # noqa: F811
    model, adapter = tiny_model
    proc = idlm("bench", "serve", "--model", str(model), "--adapter", str(adapter), "--concurrency", "1,2",
                "--decoding", "ar,risd", "--requests", "2", "--max-tokens", "6", "--kv-cache-tokens", "2048",
                "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    result = json.loads(next(tmp_path.glob("serve-cpu-*.json")).read_text())
    rows = {(r["decoding"], r["concurrency"]): r for r in result["rows"]}
    assert set(rows) == {(d, c) for d in ("ar", "risd") for c in (1, 2)}
    for (d, _), r in rows.items():
        assert r["tokens"] == 12 and r["tok_per_s"] > 0 and r["ttft_p50"] > 0 and r["itl_p50"] > 0
        assert (r["vs_ar"] is None) == (d == "ar")
    assert result["machine"]["cpu_capability"]
    assert next(tmp_path.glob("serve-cpu-*.png")).stat().st_size > 0


def test_bench_profile_compares_fused_and_separate(tiny_model, tmp_path):  # noqa: F811
    model, adapter = tiny_model
    proc = idlm("bench", "profile", "--model", str(model), "--adapter", str(adapter), "--batch", "1,2",
                "--repeats", "1", "--steps", "2", "--stride", "3", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    result = json.loads(next(tmp_path.glob("profile-cpu-*.json")).read_text())
    assert {(r["layout"], r["batch"]) for r in result["steps"]} >= {("rows1-gated0-logits1", 1),
                                                                    ("rows1-gated0-logits1", 2)}
    assert set(result["profiles"]) == {"separate ar", "separate risd", "fused ar", "fused risd"}
    ops = {r["op"] for r in result["profiles"]["fused ar"]["ops"]}
    assert ops and all(r["calls_per_step"] > 0 for t in result["profiles"].values() for r in t["ops"])


def test_bench_profile_profiles_the_weight_format_it_is_given(tiny_model, tmp_path):  # noqa: F811
    if panel.available() and torch.backends.cpu.get_cpu_capability() not in panel.CAPABILITIES:
        pytest.skip(panel.available())
    model, adapter = tiny_model
    proc = idlm("bench", "profile", "--model", str(model), "--adapter", str(adapter), "--batch", "1",
                "--repeats", "1", "--steps", "2", "--stride", "3", "--quantize", "w8a8", "--panel", "on",
                "--rows", "40", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    result = json.loads(next(tmp_path.glob("profile-cpu-*.json")).read_text())
    assert (result["quantize"], result["panel"], result["compile"]) == ("w8a8", "on", "off")
    for table in result["profiles"].values():  # the products the profile shows are the w8a8 kernel's
        ops = {r["op"] for r in table["ops"]}
        assert "idlm_panel::linear_w8a8" in ops and "aten::linear" not in ops and "aten::mm" not in ops
