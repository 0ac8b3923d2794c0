"""Gated LoRA in training: the adapter acts at MASK rows only, exactly as in serving."""
from __future__ import annotations

import pytest
import torch

from idlm.config import ModelConfig
from idlm.models.attention import DenseAttention
from idlm.models.llama import LORA_OFF, CausalLM
from idlm.models.lora import LoRAProj
from idlm.training.config import config_from_dict
from idlm.training.objective import AllMaskedLoss, LossConfig, build_example, collate
from idlm.training.trainer import prepare_model


def model_and_batch(mode: str):
    cfg = ModelConfig.from_hf(
        {"architectures": ["LlamaForCausalLM"], "vocab_size": 40, "hidden_size": 32, "intermediate_size": 64,
         "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2}
    )
    torch.manual_seed(0)
    model = CausalLM(cfg)
    tc = config_from_dict({"model": "random", "model_config": {"x": 1}, "mode": mode, "data": {"train": ["x"]},
                           "lora": {"r": 4, "alpha": 8}})
    acfg, lora_mode = prepare_model(model, tc)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRAProj):
                m.lora_B.normal_(std=0.5)  # nonzero B: the delta is real wherever the gate is 1
    exs = [build_example(list(range(1, 11)), 4, model.mask_token_id, 3),
           build_example(list(range(5, 12)), 2, model.mask_token_id, 3)]
    return model, lora_mode, collate(exs)


def test_gated_lora_clean_rows_bit_identical_mask_rows_differ():
    model, lora_mode, batch = model_and_batch("gated_lora")
    assert lora_mode == "gated"
    loss = AllMaskedLoss(model, LossConfig(gated=True), lora_mode=lora_mode)
    gate = loss.gate(batch.input_ids)
    is_mask = batch.input_ids == model.mask_token_id
    assert torch.equal(gate.bool(), is_mask)  # gate = (input id == MASK) at every row
    attn = DenseAttention(batch.attn_mask)
    with torch.no_grad():
        with_adapter = model(batch.input_ids, batch.positions, attn, gate)
        base = model(batch.input_ids, batch.positions, attn, LORA_OFF)
    real = ~is_mask  # prompt tokens of x_t, all of x_0, padding
    assert torch.equal(with_adapter[real], base[real])  # bit-identical, not just close
    assert (with_adapter[is_mask] - base[is_mask]).abs().amax(-1).min() > 1e-4  # every MASK row moved


def test_gated_lora_gradients_reach_only_adapter_and_mask_embedding():
    model, lora_mode, batch = model_and_batch("gated_lora")
    out = AllMaskedLoss(model, LossConfig(gated=True), lora_mode=lora_mode)(batch)
    out["loss"].backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or n == "mask_embedding" for n in trainable)
    assert model.mask_embedding.grad is not None and model.mask_embedding.grad.abs().sum() > 0
    assert all(p.grad is None for n, p in model.named_parameters() if not p.requires_grad)


def test_plain_lora_changes_clean_rows():
    model, lora_mode, batch = model_and_batch("lora")
    assert lora_mode == "all"
    loss = AllMaskedLoss(model, LossConfig(), lora_mode=lora_mode)
    assert loss.gate(batch.input_ids) is None
    attn = DenseAttention(batch.attn_mask)
    with torch.no_grad():
        a = model(batch.input_ids, batch.positions, attn, None)
        b = model(batch.input_ids, batch.positions, attn, LORA_OFF)
    real = batch.input_ids != model.mask_token_id
    assert not torch.equal(a[real], b[real])


@pytest.mark.parametrize("mode", ["gated_lora", "lora"])  # lora: every row's embedding gets a gradient
def test_in_vocab_mask_row_is_the_only_trained_embedding_row(tmp_path, mode):
    """Checkpoints whose MASK id is a vocabulary row (official I-DLM): LoRA modes train that row only."""
    from safetensors.torch import load_file

    from idlm.training.trainer import Trainer
    from training_helpers import TINY_MODEL, one_thread, tiny_config

    model_cfg = dict(TINY_MODEL, mask_token_id=45)
    cfg = tiny_config(tmp_path, mode=mode, max_steps=2, model_config=model_cfg, lora={"r": 4, "alpha": 8},
                      save_dtype="float32", weight_decay=0.1)
    tr = Trainer(cfg)
    before = None

    def snapshot(step, rec):
        nonlocal before
        if before is None:
            before = tr.model.model.embed_tokens.weight.detach().clone()

    tr.on_step = snapshot
    with one_thread():
        tr.train()
    after = tr.model.model.embed_tokens.weight.detach()
    changed = (after != before).any(-1).nonzero().flatten().tolist()
    assert changed == [45]
    saved = load_file(tmp_path / "run" / "adapter" / "adapter_model.safetensors")
    torch.testing.assert_close(saved["idlm.mask_embedding"], after[45])
