"""Comparison helpers: token-for-token equality with a tolerance only at genuine near-ties."""
from __future__ import annotations

import torch

from idlm.models.attention import DenseAttention

TIE_GAP = 1e-5


def top2_gap(model, ids: list[int]) -> float:
    """Gap between the two largest next-token logits after `ids` (our model, fp32, full forward)."""
    with torch.no_grad():
        h = model(torch.tensor([ids]), torch.arange(len(ids))[None], DenseAttention())
        top = torch.topk(model.logits(h[0, -1]).float(), 2).values
    return float(top[0] - top[1])


def assert_same_tokens(got: list[int], expected: list[int], prompt_ids: list[int], model, label: str = "") -> None:
    """Equal token for token; a first divergence passes only where the reference's top-2 gap < 1e-5."""
    n = min(len(got), len(expected))
    for i in range(n):
        if got[i] != expected[i]:
            gap = top2_gap(model, prompt_ids + expected[:i])
            print(f"{label}: first divergence at token {i}, reference top-2 logit gap {gap:.2e}")
            assert gap < TIE_GAP, f"{label}: tokens differ at {i} ({got[i]} vs {expected[i]}), top-2 gap {gap:.2e}"
            return
    assert len(got) == len(expected), f"{label}: lengths differ ({len(got)} vs {len(expected)})"
