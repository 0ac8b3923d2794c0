"""What `idlm train` writes: a gated adapter that load_adapter restores, or a full HF-layout model dir."""
from __future__ import annotations

import json

import torch

from idlm.config import ModelConfig
from idlm.models.attention import DenseAttention
from idlm.models.lora import LoRAProj, load_adapter, read_adapter_config
from idlm.training.objective import build_example
from idlm.training.checkpoints import export_full_model
from idlm.training.trainer import Trainer, random_model
from training_helpers import TINY_MODEL, one_thread, tiny_config, word_tokenizer


def _hidden(model, ex, gate):
    return model(ex.input_ids[None], ex.positions[None], DenseAttention(ex.attn_mask[None, None]), gate)[0]


def test_gated_adapter_export_roundtrip(tmp_path):
    cfg = tiny_config(tmp_path, mode="gated_lora", max_steps=3, lora={"r": 4, "alpha": 8}, save_dtype="float32")
    tr = Trainer(cfg)
    with one_thread():
        summary = tr.train()
    path = tmp_path / "run" / "adapter"
    assert summary["output"] == str(path)
    acfg = read_adapter_config(path)
    assert acfg.gated and acfg.draft_len == 3 and acfg.trained_stride == 4
    assert acfg.mask_token_id == TINY_MODEL["vocab_size"]  # an extra input embedding
    fresh = random_model(TINY_MODEL, cfg.seed)  # same base weights (same seed)
    load_adapter(fresh, path)
    ex = build_example(list(range(12)), 4, fresh.mask_token_id, 3)
    gate = (ex.input_ids == fresh.mask_token_id).float()[None]
    with torch.no_grad():
        torch.testing.assert_close(_hidden(fresh, ex, gate), _hidden(tr.model, ex, gate))

    # lora.init: a new run starts from that adapter (trainable), and refuses one of another shape
    import pytest

    from idlm.training.trainer import TrainingError, prepare_model

    cont = random_model(TINY_MODEL, cfg.seed)
    prepare_model(cont, tiny_config(tmp_path, mode="gated_lora", lora={"r": 4, "alpha": 8, "init": str(path)}))
    trained = dict(tr.model.named_parameters())
    for n, p in cont.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.detach(), trained[n].detach())
    assert sum(p.requires_grad for p in cont.parameters()) == sum(p.requires_grad for p in tr.model.parameters())
    with pytest.raises(TrainingError, match="lora.init"):  # a rank cannot shrink
        prepare_model(random_model(TINY_MODEL, cfg.seed),
                      tiny_config(tmp_path, mode="gated_lora", lora={"r": 2, "alpha": 8, "init": str(path)}))
    with pytest.raises(TrainingError, match="lora.init"):  # nor the targets change
        prepare_model(random_model(TINY_MODEL, cfg.seed), tiny_config(
            tmp_path, mode="gated_lora", lora={"r": 4, "alpha": 8, "init": str(path), "targets": ["q_proj"]}))

    # a rank can grow (r 4 -> 8, alpha 8 -> 32: another scaling): the same function until the new rank trains
    grown = random_model(TINY_MODEL, cfg.seed)
    prepare_model(grown, tiny_config(tmp_path, mode="gated_lora", lora={"r": 8, "alpha": 32, "init": str(path)}))
    proj = next(m for m in grown.modules() if isinstance(m, LoRAProj))
    assert proj.lora_A.shape[0] == 8 and proj.lora_A.requires_grad and proj.scaling == 4
    assert proj.lora_A[4:].abs().sum() > 0 and proj.lora_B[:, 4:].abs().sum() == 0  # new rank: random A, zero B
    with torch.no_grad():
        torch.testing.assert_close(_hidden(grown, ex, gate), _hidden(tr.model, ex, gate))
    loss = _hidden(grown, ex, gate).square().sum()
    loss.backward()
    assert proj.lora_B.grad[:, 4:].abs().sum() > 0  # the new rank trains


def test_full_model_export_loads_with_mask_row_and_block_size(tmp_path):
    cfg = tiny_config(tmp_path, mode="full", max_steps=2, save_dtype="float32")
    tr = Trainer(cfg)
    tr.train()
    out = tmp_path / "hf"
    state = {n: p.detach() for n, p in tr.model.named_parameters()}
    export_full_model(state, tr.model.mask_token_id, dict(TINY_MODEL), word_tokenizer(), 3, out, torch.float32)
    conf = json.loads((out / "config.json").read_text())
    assert conf["mask_token_id"] == TINY_MODEL["vocab_size"] and conf["block_size"] == 3
    assert conf["vocab_size"] == TINY_MODEL["vocab_size"]  # MASK stays outside the vocabulary
    assert (out / "tokenizer.json").is_file()

    from idlm.loading import load_checkpoint

    ck = load_checkpoint(str(out), torch.float32, "cpu")
    assert ck.model.mask_token_id == TINY_MODEL["vocab_size"] and ck.config.draft_len == 3
    torch.testing.assert_close(ck.model.mask_embedding, tr.model.mask_embedding)  # the trained MASK vector
    ex = build_example(list(range(12)), 4, TINY_MODEL["vocab_size"], 3)
    with torch.no_grad():
        h_new, h_old = _hidden(ck.model, ex, None), _hidden(tr.model, ex, None)
        torch.testing.assert_close(h_new, h_old)
        torch.testing.assert_close(ck.model.logits(h_new), tr.model.logits(h_old))
    assert ModelConfig.from_hf(conf).mask_token_id == TINY_MODEL["vocab_size"]
    # a LoRA trained on top of that conversion starts from its trained MASK vector, not a fresh mean
    from idlm.training.trainer import prepare_model

    trained = ck.model.mask_embedding.detach().clone()
    prepare_model(ck.model, tiny_config(tmp_path, mode="gated_lora", lora={"r": 4, "alpha": 8}))
    torch.testing.assert_close(ck.model.mask_embedding.detach(), trained)
    assert ck.model.mask_embedding.requires_grad
