"""`idlm bench kernels` on a tiny checkpoint: a row per product and row count, each kernel timed, the fastest
named, the int8 and int4 row limits recorded; JSON and markdown written."""
from __future__ import annotations

import json

from idlm.models import panel

from test_cli import idlm
from test_loading import save_tiny, tiny_tokenizer  # noqa: F401 (fixture)


def test_kernels_bench_times_every_product_and_row_count(tmp_path, tiny_tokenizer):  # noqa: F811
    save_tiny(tmp_path / "model", tiny_tokenizer)
    proc = idlm("bench", "kernels", "--model", str(tmp_path / "model"), "--rows", "1,7", "--repeats", "3",
                "--out", str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stderr
    result = json.loads(next((tmp_path / "out").glob("kernels-cpu-*.json")).read_text())
    assert {(r["product"], r["rows"]) for r in result["rows"]} == {
        (p, m) for p in ("qkv", "o", "gate_up", "down", "lm_head") for m in (1, 7)}
    for r in result["rows"]:
        assert r["int8_us"] > 0 and r["fp32_us"] > 0 and r["fastest"] in ("int8", "int8_panel", "w8a8", "int4", "fp32",
                                                                          "bf16", "panel", "gguf_panel")
        assert (r.get("panel_us", 0) > 0) == (r.get("int8_panel_us", 0) > 0) == (r.get("w8a8_us", 0) > 0) \
            == (r.get("gguf_panel_us", 0) > 0) == (panel.available() is None)
        assert r["int8_row_limit"] in (0, 1, 2, 4, 8, 16, 32, 64)
        # the tiny model's products all fit the int4 kernel but its LM head (500 outputs, not a multiple of 16)
        assert (r["int4_us"] > 0 and r["int4_row_limit"] in (0, 1, 2, 4, 8, 16, 32, 64)) if r["product"] != "lm_head" \
            else "int4_us" not in r
    assert result["machine"]["cpu_capability"]
    assert "| lm_head" in next((tmp_path / "out").glob("kernels-cpu-*.md")).read_text()
