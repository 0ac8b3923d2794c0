"""`idlm bench decode` end to end on the embedded model: rows per decoding and batch size, auto's output
equal to AR's, JSON and markdown written."""
from __future__ import annotations

import json

from conftest import requires_embedded
from test_cli import idlm


@requires_embedded
def test_decode_bench_writes_rows_by_batch_with_auto_equal_to_ar(embedded_llm, tmp_path):
    proc = idlm("bench", "decode", "--decoding", "ar,risd,auto", "--stride", "3", "--batch", "1,2", "--prompts", "2",
                "--max-tokens", "12", "--repeats", "2", "--no-transformers", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    result = json.loads(next(tmp_path.glob("decode-cpu-*.json")).read_text())
    assert result["machine"]["cpu_capability"] and result["repeats"] == 2
    rows = {(r["engine"], r["batch"]): r for r in result["rows"]}
    assert set(rows) == {(e, b) for e in ("idlm ar", "idlm risd N=3", "idlm auto N<=3") for b in (1, 2)}
    for (engine, b), r in rows.items():
        assert len(r["runs"]) == 2 and r["tok_per_s"] > 0
        if engine != "idlm ar":
            assert r["same_tokens_as_ar"] is True and r["speedup_vs_idlm_ar"] > 0
    assert sum(rows[("idlm auto N<=3", 1)]["choices"].values()) > 0
    assert "| idlm auto N<=3 | 2 |" in next(tmp_path.glob("decode-cpu-*.md")).read_text()
