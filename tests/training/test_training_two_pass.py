"""The two-pass objective of gated adapters == the one-pass `[x_t | x_0]` objective: same loss, same gradients."""
from __future__ import annotations

import pytest
import torch

from idlm.training.objective import (
    AllMaskedLoss, LossConfig, build_example, build_gated_example, collate, collate_gated,
)
from idlm.training.trainer import prepare_model, random_model
from training_helpers import TINY_MODEL, tiny_config


def test_rows_that_differ_from_their_clean_twin(tmp_path):
    ex = build_gated_example(list(range(1, 13)), 5, 47, 3)  # blocks [0-2][3-5][6-8][9-11], response from 5
    assert ex.noisy_positions.tolist() == list(range(5, 12))
    assert ex.noisy_ids.tolist() == [47] * 7
    # row 5 (block 1) sees clean 0..4 (earlier block + its block's unchanged prompt rows) and itself
    assert ex.noisy_mask[0, :12].nonzero().flatten().tolist() == [0, 1, 2, 3, 4]
    assert ex.noisy_mask[0, 12:].nonzero().flatten().tolist() == [0]
    # row 7 (block 2) sees clean 0..5 and noisy rows 6, 7
    assert ex.noisy_mask[2, :12].nonzero().flatten().tolist() == [0, 1, 2, 3, 4, 5]
    assert ex.noisy_mask[2, 12:].nonzero().flatten().tolist() == [1, 2]
    # a non-response row after a response row of its block differs too (multi-turn masks)
    resp = [False] * 3 + [True, False, False] + [False] * 6
    multi = build_gated_example(list(range(1, 13)), 0, 47, 3, response_mask=resp)
    assert multi.noisy_positions.tolist() == [3, 4, 5]
    assert multi.noisy_ids.tolist() == [47, 5, 6] and multi.task_mask.tolist() == [False] * 3


@pytest.mark.parametrize("draft_len", [1, 3, 4])
def test_two_pass_matches_one_pass_loss_and_gradients(tmp_path, draft_len):
    cfg = tiny_config(tmp_path, mode="gated_lora", lora={"r": 4, "alpha": 8}, draft_len=draft_len)
    model = random_model(TINY_MODEL, 0)
    prepare_model(model, cfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    mask_id = model.mask_token_id
    specs = [(list(torch.randint(0, 40, (n,), generator=g)), pl, None)
             for n, pl in [(20, 7), (13, 0), (29, 11), (9, 8)]]
    resp = [False] * 4 + [True] * 5 + [False] * 4 + [True] * 6  # two responses with a user turn between
    specs.append((list(torch.randint(0, 40, (19,), generator=g)), 0, resp))
    loss_mod = AllMaskedLoss(model, LossConfig(gated=True), lora_mode="gated")
    trainable = [p for p in model.parameters() if p.requires_grad]

    def run(batch):
        model.zero_grad(set_to_none=True)
        out = loss_mod(batch)
        out["loss"].backward()
        return out["loss"].detach(), [p.grad.clone() for p in trainable]

    one = collate([build_example(i, pl, mask_id, draft_len, r) for i, pl, r in specs])
    two = collate_gated([build_gated_example(i, pl, mask_id, draft_len, r) for i, pl, r in specs])
    assert two.noisy_ids.numel() < one.input_ids.numel() / 2  # fewer rows with gradients
    l1, g1 = run(one)
    l2, g2 = run(two)
    torch.testing.assert_close(l2, l1, rtol=1e-5, atol=1e-6)
    assert any(g.abs().sum() > 0 for g in g1)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)
