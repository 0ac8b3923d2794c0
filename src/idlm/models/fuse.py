"""Fewer, bigger matmuls for inference: q/k/v and gate/up become one projection each, base and LoRA.

A fused projection's weight is its parts' weights stacked along the output dim, so y = W_cat x is [q | k | v]
(or [gate | up]). Their LoRA A matrices share the input and stack the same way; their B matrices become one
block-diagonal matrix (each part's B, times its alpha / r, in its own rows and rank columns; parts without an
adapter contribute no rank). The gated delta of a fused group is then two matmuls on the MASK rows instead of
two per part. The fused layer is a plain `Proj` / `LoRAProj`, so gating, packing and the forward need nothing
new.

One way, for frozen inference only: the separate projections are removed (training, adapter loading and
saving use them, so an `LLM` fuses after loading its adapter, and training never fuses).
"""
from __future__ import annotations

import torch
from torch import nn

from idlm.models.llama import CausalLM, Proj
from idlm.models.lora import LoRAProj

GROUPS = {"self_attn": ("qkv", ("q_proj", "k_proj", "v_proj")), "mlp": ("gate_up", ("gate_proj", "up_proj"))}


def fuse(parts: list[Proj]) -> Proj:
    """One projection computing the parts' outputs side by side (their adapters too)."""
    bias = None if parts[0].bias is None else torch.cat([p.bias for p in parts])
    with torch.device("meta"):
        base = Proj(parts[0].in_features, sum(p.out_features for p in parts), bias=bias is not None)
    base.weight = nn.Parameter(torch.cat([p.weight for p in parts]), requires_grad=False)
    base.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
    ranks = [p.lora_A.shape[0] if isinstance(p, LoRAProj) else 0 for p in parts]
    if not any(ranks):
        return base
    fused = LoRAProj(base, sum(ranks), float(sum(ranks)))  # scaling 1: each part's is folded into its B block
    with torch.no_grad():
        fused.lora_A.copy_(torch.cat([p.lora_A for p, r in zip(parts, ranks) if r]))
        fused.lora_B.zero_()
        fused.blocks = []
        row = col = 0
        for p, r in zip(parts, ranks):
            if r:
                fused.lora_B[row : row + p.out_features, col : col + r] = p.lora_B * p.scaling
                fused.blocks.append((row, row + p.out_features, col, col + r))
                col += r
            row += p.out_features
    return fused.requires_grad_(False)


def fuse_projections(model: CausalLM) -> None:
    """Replace every layer's q/k/v and gate/up by one fused projection each (frozen inference)."""
    if any(p.requires_grad for p in model.parameters()):
        raise ValueError("fuse_projections is for frozen inference models (call requires_grad_(False) first)")
    for layer in model.model.layers:
        for parent_name, (fused_name, names) in GROUPS.items():
            parent = getattr(layer, parent_name)
            if getattr(parent, fused_name, None) is not None:
                continue
            setattr(parent, fused_name, fuse([getattr(parent, n) for n in names]))
            for n in names:
                delattr(parent, n)
