"""The llama.cpp row runs in a worker process: a worker that dies (a llama.cpp built for another CPU raises
SIGILL) costs that row, with the reason in the notes, never the benchmark run."""
from __future__ import annotations

import json
import sys

import pytest

from idlm.bench import decode, llamacpp
from idlm.cli import build_parser

from test_loading import save_tiny, tiny_tokenizer  # noqa: F401 (fixture)

# answers the load, then `runs` runs with fixed totals, then kills itself with SIGILL as a foreign build does
FAKE_WORKER = """
import json, os, signal, sys
runs = int(sys.argv[1])
sys.stdin.readline()
print(json.dumps({"name": "fake"}), flush=True)
for line in sys.stdin:
    if runs == 0:
        os.kill(os.getpid(), signal.SIGILL)
    runs -= 1
    n = json.loads(line)["max_tokens"]
    print(json.dumps({"tok_per_s": 100.0, "tokens": n, "seconds": n / 100, "tpf": 1.0, "rows_per_forward": 1.0,
                      "ms_per_step": 10.0, "cold_share": 0.0, "tree_hits": 0, "acceptance": [],
                      "token_ids": [[0] * n]}), flush=True)
"""


def fake_worker(runs: int) -> list[str]:
    return [sys.executable, "-c", FAKE_WORKER, str(runs)]


def test_a_worker_dying_at_load_is_an_error_naming_the_signal_the_rebuild_or_its_last_words(tmp_path):
    with pytest.raises(llamacpp.LlamaCppError, match="SIGILL.*--no-binary llama-cpp-python"):
        llamacpp.LlamaCpp(tmp_path / "m.gguf", threads=1,
                          worker=[sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGILL)"])
    with pytest.raises(llamacpp.LlamaCppError, match="exited with code 3"):
        llamacpp.LlamaCpp(tmp_path / "m.gguf", threads=1, worker=[sys.executable, "-c", "raise SystemExit(3)"])
    with pytest.raises(llamacpp.LlamaCppError, match="exited with code 1: ModuleNotFoundError: No module named 'no_such_dep'"):
        llamacpp.LlamaCpp(tmp_path / "m.gguf", threads=1, worker=[sys.executable, "-c", "import no_such_dep"])


def test_a_worker_answers_runs_until_it_dies(tmp_path):
    lcpp = llamacpp.LlamaCpp(tmp_path / "m.gguf", threads=1, worker=fake_worker(1))
    assert lcpp.name == "fake" and lcpp.run([[1, 2]], 4)["tokens"] == 4
    with pytest.raises(llamacpp.LlamaCppError, match="SIGILL"):
        lcpp.run([[1, 2]], 4)
    lcpp.close()


@pytest.mark.parametrize("runs,kept", [(0, 0), (2, 1)])
def test_a_dying_llamacpp_costs_its_row_not_the_bench(tmp_path, tiny_tokenizer, monkeypatch, runs, kept):  # noqa: F811
    """runs=0: the worker dies in the warm-up, the row is skipped; runs=2: warm-up and the first repeat answer,
    the second repeat kills it: the row keeps one run. Every idlm row is whole either way."""
    save_tiny(tmp_path / "model", tiny_tokenizer)
    monkeypatch.setattr(llamacpp, "available", lambda: True)
    monkeypatch.setattr(llamacpp, "gguf_for", lambda model: tmp_path / "m.gguf")
    monkeypatch.setattr(llamacpp, "WORKER", fake_worker(runs))
    args = build_parser().parse_args(["bench", "decode", "--model", str(tmp_path / "model"), "--decoding", "ar,isd",
                                      "--stride", "2", "--batch", "1", "--prompts", "1", "--max-tokens", "6",
                                      "--repeats", "2", "--no-transformers", "--out", str(tmp_path / "out")])
    result = decode.run_decode_bench(args)
    assert json.loads(next((tmp_path / "out").glob("decode-cpu-*.json")).read_text())["rows"] == result["rows"]
    rows = {r["engine"]: r for r in result["rows"]}
    assert all(len(rows[e]["runs"]) == 2 for e in ("idlm ar", "idlm isd N=2"))
    assert [len(r["runs"]) for e, r in rows.items() if e.startswith("llama.cpp")] == ([kept] if kept else [])
    died = [n for n in result["notes"] if "SIGILL" in n]
    assert len(died) == 1 and died[0].startswith("llama.cpp row skipped" if kept == 0 else "llama.cpp stopped")
