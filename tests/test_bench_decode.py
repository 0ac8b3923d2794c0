"""`idlm bench decode` end to end on the embedded model: rows per decoding and batch size, auto's output
equal to AR's, JSON and markdown written."""
from __future__ import annotations

import json

from idlm.bench import llamacpp

from conftest import requires_embedded
from test_cli import idlm
from test_loading import save_tiny, tiny_tokenizer  # noqa: F401 (fixture)


@requires_embedded
def test_decode_bench_writes_rows_by_batch_with_auto_equal_to_ar(embedded_llm, tmp_path):
    proc = idlm("bench", "decode", "--decoding", "ar,risd,auto", "--stride", "3", "--batch", "1,2", "--prompts", "2",
                "--max-tokens", "12", "--repeats", "2", "--no-transformers", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    result = json.loads(next(tmp_path.glob("decode-cpu-*.json")).read_text())
    assert result["machine"]["cpu_capability"] and result["repeats"] == 2
    rows = {(r["engine"], r["batch"]): r for r in result["rows"]}
    lcpp = [r for r in result["rows"] if r["engine"].startswith("llama.cpp")]
    if llamacpp.available():  # the optional row: batch 1, on the same GGUF weights, beside our AR
        assert len(lcpp) == 1 and lcpp[0]["batch"] == 1 and lcpp[0]["speedup_vs_idlm_ar"] > 0
        rows.pop((lcpp[0]["engine"], 1))
    else:
        assert not lcpp and any("pip install 'idlm[bench]'" in n for n in result["notes"])
    assert set(rows) == {(e, b) for e in ("idlm ar", "idlm risd N=3", "idlm auto N<=3") for b in (1, 2)}
    for (engine, b), r in rows.items():
        assert len(r["runs"]) == 2 and r["tok_per_s"] > 0
        assert all(run["graphs_compiled"] == 0 for run in r["runs"])  # eager: nothing compiles inside a run
        if engine != "idlm ar":
            assert r["same_tokens_as_ar"] is True and r["speedup_vs_idlm_ar"] > 0
    assert sum(rows[("idlm auto N<=3", 1)]["choices"].values()) > 0
    assert "| idlm auto N<=3 | 2 |" in next(tmp_path.glob("decode-cpu-*.md")).read_text()


def test_quick_decode_bench_on_a_tiny_model(tmp_path, tiny_tokenizer):  # noqa: F811
    """`--quick` on a tiny HF checkpoint without an adapter: our AR and ISD rows, transformers generate and its
    prompt-lookup assisted generation; R-ISD and auto are skipped with a note."""
    save_tiny(tmp_path / "model", tiny_tokenizer)
    out = tmp_path / "out"
    proc = idlm("bench", "decode", "--model", str(tmp_path / "model"), "--decoding", "ar,isd,risd,auto", "--quick",
                "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    result = json.loads(next(out.glob("decode-cpu-*.json")).read_text())
    engines = {(r["engine"], r["batch"]) for r in result["rows"]}
    assert engines == {("idlm ar", 1), ("idlm ar", 2), ("idlm isd N=2", 1), ("idlm isd N=2", 2), ("idlm isd N=4", 1),
                       ("idlm isd N=4", 2), ("transformers generate", 1), ("transformers prompt lookup (10)", 1)}
    assert any("risd skipped" in n for n in result["notes"]) and any("auto skipped" in n for n in result["notes"])
    isd = [r for r in result["rows"] if r["engine"].startswith("idlm isd")]
    assert all(r["same_tokens_as_ar"] is True and r["rows_per_token"] > 1 for r in isd)
    assert result["machine"]["cpu_capability"] and (out / next(out.glob("decode-cpu-*.md")).name).exists()


def test_decode_bench_int8_and_stationary_variants_on_a_tiny_model(tmp_path, tiny_tokenizer):  # noqa: F811
    """Every variant (weight format x stationary mode) gets its own rows in one run; int8 rows compare with the
    int8 AR and record where greedy output leaves the fp32 AR's; AR is not repeated as stationary; a model
    without a GGUF file skips llama.cpp with the reason."""
    save_tiny(tmp_path / "model", tiny_tokenizer)
    out = tmp_path / "out"
    proc = idlm("bench", "decode", "--model", str(tmp_path / "model"), "--decoding", "ar,isd", "--stride", "3",
                "--batch", "1", "--prompts", "2", "--max-tokens", "10", "--quantize", "none,int8",
                "--stationary", "both", "--no-transformers", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    result = json.loads(next(out.glob("decode-cpu-*.json")).read_text())
    rows = {r["engine"]: r for r in result["rows"]}
    assert set(rows) == {"idlm ar", "idlm isd N=3", "idlm isd N=3 stationary", "idlm ar int8", "idlm isd N=3 int8",
                         "idlm isd N=3 int8 stationary"}
    assert rows["idlm ar int8"]["row_limits"] is not None and rows["idlm ar"]["row_limits"] is None  # {}: panel
    assert rows["idlm isd N=3 int8 stationary"]["stationary"] is True
    for name in ("idlm isd N=3 int8", "idlm isd N=3 int8 stationary"):
        assert rows[name]["speedup_vs_idlm_ar"] > 0 and "tokens_to_divergence_vs_float32" in rows[name]
    assert rows["idlm isd N=3 stationary"]["same_tokens_as_ar"] is True
    assert any("no GGUF file" in n for n in result["notes"])
    for r in rows.values():  # batch 1: time per engine step; every run bracketed by the placement probe
        assert r["ms_per_step"] > 0
        labels = {run["placement"] for run in r["runs"]}
        assert labels <= {"fast", "slow", "mixed", "one"} and all(len(run["probe_us"]) == 2 for run in r["runs"])
        assert set(r["by_placement"]) == labels - {"mixed"}  # a run whose probes disagree counts in no placement
    assert rows["idlm isd N=3"]["step_cost_vs_ar"] > 0


def test_decode_bench_gives_each_panel_choice_its_rows(tmp_path, tiny_tokenizer):  # noqa: F811
    """`--panel off,on`: every variant gets rows of each, compared with the AR of its own weight format and panel
    choice; each row records whether the panel kernels ran."""
    import pytest
    import torch

    from idlm.models import panel

    if panel.available() and torch.backends.cpu.get_cpu_capability() not in panel.CAPABILITIES:
        pytest.skip(panel.available())
    save_tiny(tmp_path / "model", tiny_tokenizer)
    proc = idlm("bench", "decode", "--model", str(tmp_path / "model"), "--decoding", "ar,isd", "--stride", "3",
                "--batch", "1", "--prompts", "2", "--max-tokens", "10", "--quantize", "none,int8",
                "--panel", "off,on", "--no-transformers", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    rows = {r["engine"]: r for r in json.loads(next(tmp_path.glob("decode-cpu-*.json")).read_text())["rows"]}
    assert set(rows) == {f"idlm {d}{q} panel {p}" for d in ("ar", "isd N=3") for q in ("", " int8") for p in ("off", "on")}
    assert [rows[f"idlm ar{q} panel {p}"]["panel"] for q in ("", " int8") for p in ("off", "on")] == [False, True] * 2
    for p in ("off", "on"):
        assert rows[f"idlm isd N=3 panel {p}"]["same_tokens_as_ar"] is True
