"""Fused q/k/v and gate/up projections (base and LoRA) compute what the separate ones compute: hidden states
under every gate kind (none, all rows, a contiguous span, scattered rows), for Llama, Qwen2-style biases and
Qwen3 q/k norms, with adapters on some or all projections."""
from __future__ import annotations

import copy

import pytest
import torch

from idlm.models.attention import DenseAttention
from idlm.models.fuse import fuse_projections
from idlm.models.llama import LORA_OFF
from idlm.models.lora import AdapterConfig, add_lora

from conftest import tiny_model


def _with_adapter(model, targets):
    cfg = AdapterConfig(r=4, lora_alpha=8, gated=True, target_modules=targets)
    torch.manual_seed(3)
    for mod in add_lora(model, cfg):
        torch.nn.init.normal_(mod.lora_B, std=0.2)
    return model.requires_grad_(False)


@pytest.mark.parametrize("overrides", [{}, {"attention_bias": True}, {"family": "qwen3", "qk_norm": True}])
@pytest.mark.parametrize("targets", [None, ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
                                     ("q_proj", "v_proj", "up_proj")])
def test_fused_model_equals_separate_projections(overrides, targets):
    model = tiny_model(vocab_size=500, **overrides)
    if targets:
        model = _with_adapter(model, targets)
    fused = copy.deepcopy(model)
    fuse_projections(fused)
    layer = fused.model.layers[0]
    assert layer.self_attn.qkv is not None and not hasattr(layer.self_attn, "q_proj")
    assert layer.mlp.gate_up is not None and not hasattr(layer.mlp, "up_proj")
    ids = torch.randint(0, 500, (2, 24))
    pos = torch.arange(24).expand(2, 24)
    gates = [LORA_OFF, None]
    if targets:
        span = torch.zeros(2, 24)
        span[1, 5:9] = 1  # one contiguous range of the flattened rows
        scattered = (torch.rand(2, 24) < 0.3).float()
        gates += [span, scattered]
    with torch.no_grad():
        for gate in gates:
            a = model(ids, pos, DenseAttention(), gate)
            b = fused(ids, pos, DenseAttention(), gate)
            assert (a - b).abs().max().item() <= 1e-5 * a.abs().max().item()
        if targets:  # the adapter acts at all: gated rows differ from the base
            assert not torch.allclose(fused(ids, pos, DenseAttention(), None),
                                      fused(ids, pos, DenseAttention(), LORA_OFF))


def test_fusing_refuses_a_trainable_model():
    model = tiny_model(vocab_size=500).requires_grad_(True)
    with pytest.raises(ValueError, match="frozen"):
        fuse_projections(model)
