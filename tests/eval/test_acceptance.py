"""`idlm acceptance`: greedy and sampled ISD acceptance by draft position, one row per stride x temperature."""
from __future__ import annotations

import json

from idlm.cli import main
from test_loading import save_tiny, tiny_tokenizer  # noqa: F401 (fixture)
from test_lora import random_gated_adapter


def test_acceptance_rows_for_greedy_and_sampled_decoding(tmp_path, tiny_tokenizer):  # noqa: F811
    save_tiny(tmp_path / "model", tiny_tokenizer)
    adapter = random_gated_adapter(tmp_path / "model", tmp_path / "adapter")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ["The quick brown fox", "Write a haiku"]))
    out = tmp_path / "acc.json"
    assert main(["acceptance", "--model", str(tmp_path / "model"), "--adapter", str(adapter), "--prompts", str(prompts),
                 "--stride", "2,4", "--temperature", "0,1", "--max-tokens", "16", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [(r["stride"], r["temperature"]) for r in rows] == [(2, 0.0), (4, 0.0), (2, 1.0), (4, 1.0)]
    for r in rows:
        assert 1 <= len(r["acceptance_by_position"]) <= r["stride"] - 1 and r["generated_tokens"] == 2 * 16
        assert 0.0 <= r["introspective_acceptance"] <= 1.0 and r["tokens_per_forward"] >= 1.0
    # random drafts: sampled acceptance is min(1, p/q) on average, greedy counts exact argmax hits
    assert rows[2]["introspective_acceptance"] > 0.0


def test_baseline_adapter_adds_a_paired_comparison(tmp_path, tiny_tokenizer):  # noqa: F811
    save_tiny(tmp_path / "model", tiny_tokenizer)
    adapter = random_gated_adapter(tmp_path / "model", tmp_path / "adapter")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ["The quick brown fox", "Write a haiku", "1 2 3"]))
    out = tmp_path / "acc.json"
    common = ["acceptance", "--model", str(tmp_path / "model"), "--adapter", str(adapter), "--prompts", str(prompts),
              "--stride", "3", "--max-tokens", "16"]
    assert main(common + ["--baseline-adapter", str(adapter), "--out", str(out)]) == 0
    row = json.loads(out.read_text())[0]
    assert len(row["per_prompt"]) == 3 and sum(r["generated_tokens"] for r in row["per_prompt"]) == 48
    assert row["baseline"]["adapter"] == row["adapter"]
    c = row["comparison"]  # the same adapter twice: greedy decoding is deterministic, nothing differs
    assert c["prompts"] == 3 and c["tokens_per_forward"]["difference"] == 0
    assert c["tokens_per_forward"]["baseline"] == row["tokens_per_forward"]
    assert main(common + ["--baseline-adapter", "none", "--out", str(out)]) == 0
    row = json.loads(out.read_text())[0]
    assert row["baseline"]["adapter"] is None and row["baseline"]["decoding"] == "isd"
    assert row["comparison"]["tokens_per_forward"]["candidate"] == row["tokens_per_forward"]
