"""The `[x_t | x_0]` construction and the all-masked loss against hand-worked values."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from idlm.config import ModelConfig
from idlm.models.attention import DenseAttention
from idlm.models.llama import CausalLM
from idlm.training.objective import AllMaskedLoss, LossConfig, allmasked_attention_mask, build_example, collate

M = 99
X = -100  # no target

# L = 6, b = 3, prompt = first 2 tokens. blk = [0, 0, 0, 1, 1, 1] in each half.
# rows = queries, columns = keys; first 6 = noisy half (x_t), last 6 = clean half (x_0).
EXPECTED_MASK = [
    # noisy k0..k5       clean k0..k5
    [1, 0, 0, 0, 0, 0,   0, 0, 0, 0, 0, 0],  # noisy q0 (block 0): itself only
    [1, 1, 0, 0, 0, 0,   0, 0, 0, 0, 0, 0],  # noisy q1
    [1, 1, 1, 0, 0, 0,   0, 0, 0, 0, 0, 0],  # noisy q2
    [0, 0, 0, 1, 0, 0,   1, 1, 1, 0, 0, 0],  # noisy q3 (block 1): clean of block 0 + itself
    [0, 0, 0, 1, 1, 0,   1, 1, 1, 0, 0, 0],  # noisy q4
    [0, 0, 0, 1, 1, 1,   1, 1, 1, 0, 0, 0],  # noisy q5
    [0, 0, 0, 0, 0, 0,   1, 0, 0, 0, 0, 0],  # clean q0: causal, never noisy
    [0, 0, 0, 0, 0, 0,   1, 1, 0, 0, 0, 0],  # clean q1
    [0, 0, 0, 0, 0, 0,   1, 1, 1, 0, 0, 0],  # clean q2
    [0, 0, 0, 0, 0, 0,   1, 1, 1, 1, 0, 0],  # clean q3
    [0, 0, 0, 0, 0, 0,   1, 1, 1, 1, 1, 0],  # clean q4
    [0, 0, 0, 0, 0, 0,   1, 1, 1, 1, 1, 1],  # clean q5
]


def test_build_example_hand_worked_L6_b3():
    ex = build_example([10, 11, 12, 13, 14, 15], prompt_len=2, mask_id=M, draft_len=3)
    assert ex.input_ids.tolist() == [10, 11, M, M, M, M, 10, 11, 12, 13, 14, 15]
    assert ex.positions.tolist() == [0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 5]
    assert ex.attn_mask.dtype == torch.bool
    assert ex.attn_mask.int().tolist() == EXPECTED_MASK
    # logit shift: row i predicts x_0[i+1] when that is a response token
    assert ex.targets.tolist() == [X, 12, 13, 14, 15, X, X, 12, 13, 14, 15, X]
    # task rows: masked noisy rows (2..5) whose target is valid -> 2, 3, 4 (row 1 is a prompt token)
    assert ex.task_mask.int().tolist() == [0, 0, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0]
    # clean rows: every clean row whose target is a response token
    assert ex.clean_mask.int().tolist() == [0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 0]
    assert ex.num_response == 4


def test_mask_b1_is_token_causal_with_own_token_masked():
    """b = 1: noisy q sees clean tokens < q and itself (B.2.5: 'strict causal with x_q replaced by MASK')."""
    m = allmasked_attention_mask(5, 1)
    for q in range(5):
        assert m[q, :5].tolist() == [k == q for k in range(5)]
        assert m[q, 5:].tolist() == [k < q for k in range(5)]


def test_noisy_view_equals_block_aligned_causal_sequence():
    """The noisy row q sees exactly x_0[0 : b*blk(q)] ++ x_t[b*blk(q) : q+1] (B.2.5), for several b."""
    for L, b in [(7, 2), (9, 3), (8, 4)]:
        m = allmasked_attention_mask(L, b)
        for q in range(L):
            start = b * (q // b)
            noisy = [start <= k <= q for k in range(L)]
            clean = [k < start for k in range(L)]
            assert m[q].tolist() == noisy + clean, (L, b, q)


def tiny_model(seed=0):
    cfg = ModelConfig.from_hf(
        {"architectures": ["LlamaForCausalLM"], "vocab_size": 32, "hidden_size": 32, "intermediate_size": 64,
         "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-5}
    )
    torch.manual_seed(seed)
    m = CausalLM(cfg)
    for p in m.parameters():
        if p.dim() >= 2:
            torch.nn.init.normal_(p, std=0.2)
    m.init_mask_embedding(torch.randn(32))
    return m


def test_loss_matches_B3_formula():
    """task = sum CE(masked noisy rows) / #response; clean = mean CE(clean rows); loss = task + alpha*clean."""
    model = tiny_model()
    ids, plen = [1, 2, 3, 4, 5, 6, 7], 3
    ex = build_example(ids, plen, model.mask_token_id, 3)
    with torch.no_grad():
        h = model(ex.input_ids[None], ex.positions[None], DenseAttention(ex.attn_mask[None, None]))[0]
        logits = model.logits(h)
    L = len(ids)
    ce = lambda row, tok: float(F.cross_entropy(logits[row : row + 1], torch.tensor([tok])))
    # response = x_0[3:7] (4 tokens); noisy rows 3,4,5 predict 5,6,7; row 6 has no next token
    task = (ce(3, 5) + ce(4, 6) + ce(5, 7)) / 4
    # clean rows 2..5 predict x_0[3..6]
    clean = (ce(L + 2, 4) + ce(L + 3, 5) + ce(L + 4, 6) + ce(L + 5, 7)) / 4
    with torch.no_grad():
        out = AllMaskedLoss(model, LossConfig(alpha=0.2))(collate([ex]))
        bal = AllMaskedLoss(model, LossConfig(loss_auto_balance=True))(collate([ex]))
        gated = AllMaskedLoss(model, LossConfig(gated=True), lora_mode="gated")(collate([ex]))
    assert math.isclose(float(out["task"]), task, rel_tol=1e-5)
    assert math.isclose(float(out["clean"]), clean, rel_tol=1e-5)
    assert math.isclose(float(out["loss"]), task + 0.2 * clean, rel_tol=1e-5)
    assert math.isclose(float(bal["loss"]), 2 * task, rel_tol=1e-5)  # task + (task/clean) * clean
    assert "clean" not in gated and math.isclose(float(gated["loss"]), task, rel_tol=1e-5)


def test_padded_batch_equals_per_example_mean():
    """Right-padding to a common length changes nothing: batch loss = mean of the per-example losses."""
    model = tiny_model(1)
    exs = [build_example(list(range(1, 1 + n)), p, model.mask_token_id, 3) for n, p in [(9, 2), (5, 1), (12, 4)]]
    lm = AllMaskedLoss(model, LossConfig(alpha=0.2))
    with torch.no_grad():
        each = [float(lm(collate([e]))["loss"]) for e in exs]
        both = float(lm(collate(exs))["loss"])
    assert math.isclose(both, sum(each) / 3, rel_tol=1e-5)
