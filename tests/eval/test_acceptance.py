"""`idlm acceptance`: greedy and sampled ISD acceptance by draft position, one row per stride x temperature."""
from __future__ import annotations

import json

from idlm.cli import main
from idlm.eval.acceptance import by_kind
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
    prompts.write_text("".join(json.dumps({"prompt": p, "kind": k}) + "\n"
                               for p, k in [("The quick brown fox", "a"), ("Write a haiku", "b"), ("1 2 3", "a")]))
    out = tmp_path / "acc.json"
    common = ["acceptance", "--model", str(tmp_path / "model"), "--adapter", str(adapter), "--prompts", str(prompts),
              "--stride", "3", "--max-tokens", "16"]
    assert main(common + ["--baseline-adapter", str(adapter), "--out", str(out)]) == 0
    row = json.loads(out.read_text())[0]
    assert len(row["per_prompt"]) == 3 and sum(r["generated_tokens"] for r in row["per_prompt"]) == 48
    assert row["baseline"]["adapter"] == row["adapter"]
    assert row["by_kind"] == by_kind(row["per_prompt"], ["a", "b", "a"]) and row["by_kind"]["b"]["prompts"] == 1
    c = row["comparison"]  # the same adapter twice: greedy decoding is deterministic, nothing differs
    assert c["prompts"] == 3 and c["tokens_per_forward"]["difference"] == 0
    assert c["tokens_per_forward"]["baseline"] == row["tokens_per_forward"]
    assert main(common + ["--baseline-adapter", "none", "--out", str(out)]) == 0
    row = json.loads(out.read_text())[0]
    assert row["baseline"]["adapter"] is None and row["baseline"]["decoding"] == "isd"
    assert row["comparison"]["tokens_per_forward"]["candidate"] == row["tokens_per_forward"]


def test_by_kind_is_ratios_of_sums_over_each_kinds_prompts():
    per = [{"generated_tokens": 10, "forwards": 8, "proposed_by_position": [4, 2], "accepted_by_position": [2, 1]},
           {"generated_tokens": 6, "forwards": 6, "proposed_by_position": [3], "accepted_by_position": [0]},
           {"generated_tokens": 9, "forwards": 4, "proposed_by_position": [4, 3], "accepted_by_position": [3, 3]}]
    got = by_kind(per, ["x", None, "x"])  # an unlabelled prompt counts in no kind
    assert got == {"x": {"prompts": 2, "tokens_per_forward": round(19 / 12, 4),
                         "acceptance_by_position": [round(5 / 8, 4), round(4 / 5, 4)]}}
    assert by_kind(per[1:2], ["y"])["y"]["acceptance_by_position"] == [0.0]
