"""training/first_draft.py: teacher-forced first-draft agreement against direct forwards of the same model."""
from __future__ import annotations

import json

import pytest
import torch
from conftest import gated_tiny_model

from idlm.models.attention import KVRecorder
from idlm.models.llama import LORA_OFF
from idlm.training.first_draft import first_draft_rows, summarize


def _forward(model, ids, gate=LORA_OFF):
    ids = torch.tensor([ids])
    return model.logits(model(ids, torch.arange(ids.shape[1])[None], KVRecorder(), gate)[0]).float()


def _greedy(model, prompt, n):
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(_forward(model, ids)[-1].argmax()))
    return ids


@pytest.fixture(scope="module")
def case():
    model, cfg = gated_tiny_model()
    examples = [(_greedy(model, [5, 17, 33, 8], 14), 4), (_greedy(model, [40, 2, 9], 11), 3)]
    return model, cfg, examples


def test_rows_are_the_first_mask_of_each_block_and_the_clean_row_agrees_on_greedy_answers(case):
    model, cfg, examples = case
    rows = first_draft_rows(model, {"a": model}, examples, cfg.draft_len, top_k=4)
    ids, prompt_len = examples[0]
    want = [i for i in range(1, len(ids) - 1) if i >= prompt_len and (i % 3 == 0 or i == prompt_len)]
    assert [r["position"] for r in rows if r["example"] == 0] == want
    assert all(r["target"] == examples[r["example"]][0][r["position"] + 1] for r in rows)
    assert all(r["clean"] == r["target"] for r in rows)  # off by one row, this fails
    assert summarize(rows)["clean"] == 1.0


def test_drafts_equal_a_direct_forward_with_the_mask_and_the_adapter_on_it(case):
    model, cfg, examples = case
    mask = model.mask_token_id
    for r in first_draft_rows(model, {"a": model}, examples, cfg.draft_len):
        ids = examples[r["example"]][0][: r["position"]] + [mask]  # earlier blocks clean, x0[i] MASKed
        gate = torch.zeros(1, len(ids))
        gate[0, -1] = 1.0
        assert r["drafts"]["a"] == int(_forward(model, ids, gate)[-1].argmax())


def test_the_marginal_oracle_against_brute_force(case):
    model, cfg, examples = case
    for top_k in (1, 3):
        for r in first_draft_rows(model, {}, examples, cfg.draft_len, top_k=top_k):
            prefix = examples[r["example"]][0][: r["position"]]
            p = torch.softmax(_forward(model, prefix)[-1], -1)
            top_p, top_ids = p.topk(top_k)
            mix = sum(w * torch.softmax(_forward(model, prefix + [int(k)])[-1], -1) for w, k in zip(top_p, top_ids))
            assert r["marginal"] == int(mix.argmax())
            assert r["confidence"] == pytest.approx(float(p.max()), rel=1e-4)
            if top_k == 1:  # the greedy next token: the clean row's prediction
                assert r["marginal"] == r["clean"]


def test_summary_groups_by_confidence(case):
    model, cfg, examples = case
    rows = first_draft_rows(model, {"a": model, "b": model}, examples, cfg.draft_len)
    s = summarize(rows)
    assert sum(g["rows"] for g in s["by_confidence"]) == s["rows"] == len(rows)
    assert s["drafts"]["a"] == s["drafts"]["b"]
    assert summarize([]) == {"rows": 0, "by_confidence": []}


def test_cli_rejects_records_without_token_ids(tmp_path, capsys):
    from idlm.cli import main

    bad = tmp_path / "r.jsonl"
    bad.write_text(json.dumps({"prompt": "hi", "response": "there"}) + "\n")
    assert main(["first-draft", str(bad), "--adapter", str(tmp_path)]) == 2
    assert "prompt_ids and response_ids" in capsys.readouterr().err
