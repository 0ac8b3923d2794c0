"""LoRA / gated LoRA: PEFT reads our adapter files and computes what we compute; gating acts per row."""
from __future__ import annotations

import json

import pytest
import torch

from idlm.config import ModelConfig
from idlm.models.attention import DenseAttention
from idlm.models.llama import LORA_OFF, RowGate, build_model
from idlm.models.lora import LoRAProj
from idlm.models.lora import AdapterConfig, add_lora, load_adapter, pack_adapter, read_adapter_config, save_adapter


def _tiny_pair():
    import transformers as tf

    torch.manual_seed(0)
    hf_cfg = tf.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    ref = tf.LlamaForCausalLM(hf_cfg).eval()
    ours = build_model(ModelConfig.from_hf(hf_cfg.to_dict()), ref.state_dict(), torch.float32, "cpu")
    return ref, ours


def _with_random_adapter(model, gated: bool) -> AdapterConfig:
    cfg = AdapterConfig(r=4, lora_alpha=8, gated=gated, draft_len=3, trained_stride=4)
    for mod in add_lora(model, cfg):
        torch.nn.init.normal_(mod.lora_B, std=0.1)
    return cfg


def random_gated_adapter(model: str, path, r: int = 4):
    """Save a gated adapter with random nonzero A and B for `model` (a name or dir) at `path`: its drafts are
    garbage, so R-ISD must reject most of them and still give AR's output."""
    from idlm.loading import load_checkpoint

    base = load_checkpoint(str(model), torch.float32, "cpu").model
    cfg = AdapterConfig(r=r, lora_alpha=2 * r, gated=True, draft_len=3, trained_stride=4)
    torch.manual_seed(0)
    for mod in add_lora(base, cfg):
        torch.nn.init.normal_(mod.lora_B, std=0.05)
    save_adapter(base, cfg, path)
    return path


def test_peft_reads_our_adapter_and_agrees(tmp_path):
    peft = pytest.importorskip("peft")
    ref, ours = _tiny_pair()
    cfg = _with_random_adapter(ours, gated=False)
    save_adapter(ours, cfg, tmp_path / "a")
    meta = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert meta["peft_type"] == "LORA" and meta["draft_len"] == 3 and meta["trained_stride"] == 4
    peft_model = peft.PeftModel.from_pretrained(ref, str(tmp_path / "a")).eval()
    ids = torch.randint(0, 256, (1, 24))
    with torch.no_grad():
        expected = peft_model(ids).logits[0]
        got = ours.logits(ours(ids, torch.arange(24)[None], DenseAttention()))[0]
        base = ours.logits(ours(ids, torch.arange(24)[None], DenseAttention(), lora_gate=LORA_OFF))[0]
    assert (got - expected).abs().max() <= 1e-4 * expected.abs().max()
    assert (base - expected).abs().max() > 1e-3  # the adapter really changes the output


def test_adapter_roundtrip_and_gating(tmp_path):
    _, ours = _tiny_pair()
    cfg = _with_random_adapter(ours, gated=True)
    save_adapter(ours, cfg, tmp_path / "g", dtype=torch.bfloat16)
    _, fresh = _tiny_pair()
    loaded = load_adapter(fresh, tmp_path / "g")
    assert loaded.gated and loaded.draft_len == 3 and read_adapter_config(tmp_path / "g").trained_stride == 4
    mask = fresh.mask_token_id
    ids = torch.tensor([[5, 6, 7, mask, mask, 9]])
    gate = (ids == mask).float()
    pos = torch.arange(6)[None]
    with torch.no_grad():
        gated = fresh(ids, pos, DenseAttention(), lora_gate=gate)
        off = fresh(ids, pos, DenseAttention(), lora_gate=LORA_OFF)
    clean = gate[0] == 0
    # causal: rows before the first MASK see no adapter at all -> bit-identical to the base
    assert torch.equal(gated[0, :3], off[0, :3])
    assert (gated[0, 3:5] - off[0, 3:5]).abs().max() > 1e-4
    assert clean[:3].all()


def test_adapter_files_from_before_the_draft_len_rename_load(tmp_path):
    """Adapter files written before the I-DLM draft length got its own name say `block_size`."""
    cfg = AdapterConfig(r=4, lora_alpha=8, gated=True, draft_len=3, trained_stride=4)
    (tmp_path / "adapter_config.json").write_text(json.dumps(
        {k if k != "draft_len" else "block_size": v for k, v in cfg.to_json().items()}))
    assert read_adapter_config(tmp_path).draft_len == 3


def test_shipped_default_adapter():
    """The adapter that ships for the embedded model is a gated idlm adapter of at most 25 MB."""
    from idlm.loading import default_adapter_path

    path = default_adapter_path("smollm2-135m")
    if path is None:
        pytest.skip("no default adapter shipped")
    cfg = read_adapter_config(path)
    assert cfg.gated and cfg.draft_len == 3 and cfg.trained_stride == 4
    assert sum(f.stat().st_size for f in path.iterdir()) <= 25 * 2**20
    from safetensors.torch import load_file

    tensors = load_file(str(path / "adapter_model.safetensors"))
    assert "idlm.mask_embedding" in tensors and all(t.dtype == torch.bfloat16 for t in tensors.values())


@pytest.mark.parametrize("gated_rows", [[2, 3, 4], [0, 3, 5, 6]])
def test_row_gate_paths_match_full_adapter(gated_rows):
    """Sliced (contiguous span) and gathered (scattered rows) deltas == the ungated adapter on those rows,
    and == the base elsewhere."""
    _, ours = _tiny_pair()
    _with_random_adapter(ours, gated=True)
    proj = next(m for m in ours.modules() if isinstance(m, LoRAProj))
    x = torch.randn(8, proj.in_features)
    gate = torch.zeros(8)
    gate[gated_rows] = 1
    rg = RowGate.from_mask(gate)
    assert (rg.span is not None) == (gated_rows == list(range(gated_rows[0], gated_rows[-1] + 1)))
    with torch.no_grad():
        full, base, got = proj(x, None), proj(x, LORA_OFF), proj(x, rg)
    on = gate.bool()
    torch.testing.assert_close(got[on], full[on], rtol=1e-5, atol=1e-6)
    assert torch.equal(got[~on], base[~on])
    assert RowGate.from_mask(torch.zeros(8)) is LORA_OFF


def test_a_packed_adapter_kernel_gives_the_adapters_deltas_and_leaves_clean_rows_alone():
    """`pack_adapter`: each adapter's delta by the given kernel (here a counting float64 one), called with the
    scaled A and B and the gated rows: the same deltas at gated rows (span and gathered) and on every row without a
    gate, the base output bit for bit elsewhere; frozen models only."""
    _, ours = _tiny_pair()
    _with_random_adapter(ours, gated=True)
    with pytest.raises(ValueError, match="frozen"):
        pack_adapter(ours, lambda a, b, blocks: None)
    ours.requires_grad_(False)
    proj = next(m for m in ours.modules() if isinstance(m, LoRAProj))
    x = torch.randn(8, proj.in_features)
    gates = [torch.tensor([0, 0, 1, 1, 1, 0, 0, 0.]), torch.tensor([1, 0, 0, 1, 0, 1, 1, 0.]), None]
    with torch.no_grad():
        want = [proj(x, None if g is None else RowGate.from_mask(g)) for g in gates]
        base = proj(x, LORA_OFF)
    calls = []

    def kind(scaled_a, b, blocks):  # noqa: ARG001 (one block: an unfused model)
        def add(y, h, rows):
            calls.append(None if rows is None else rows.tolist())
            picked = h if rows is None else h[rows]
            delta = ((picked.double() @ scaled_a.double().T) @ b.double().T).float()
            if rows is None:
                y += delta
            else:
                y[rows] += delta
        return add

    assert pack_adapter(ours, kind) == sum(isinstance(m, LoRAProj) for m in ours.modules())
    for g, w in zip(gates, want):
        with torch.no_grad():
            got = proj(x, None if g is None else RowGate.from_mask(g))
        on = torch.ones(8, dtype=torch.bool) if g is None else g.bool()
        torch.testing.assert_close(got[on], w[on], rtol=1e-5, atol=1e-6)
        assert torch.equal(got[~on], base[~on])
    assert calls == [[2, 3, 4], [0, 3, 5, 6], None]  # one call per forward, with the gated rows


def test_a_base_kernel_that_adds_the_delta_itself_gets_the_adapter_kernel_and_the_gated_rows():
    """Where the projection's kernel has `fused(x, delta_kernel, rows)` (the panel kernels' float32 and w8a8
    products), a forward is that one call, with the gated rows (None without a gate); the adapter is off without
    it at LORA_OFF."""
    _, ours = _tiny_pair()
    _with_random_adapter(ours, gated=True)
    ours.requires_grad_(False)
    pack_adapter(ours, lambda a, b, blocks: "delta kernel")
    proj = next(m for m in ours.modules() if isinstance(m, LoRAProj))
    calls = []

    class Kernel:
        def __call__(self, x):
            calls.append("base")
            return x @ proj.weight.T

        def fused(self, x, delta, rows):
            calls.append((delta, None if rows is None else rows.tolist()))
            return torch.zeros(*x.shape[:-1], proj.out_features)

    proj.kernel = Kernel()
    x = torch.randn(8, proj.in_features)
    proj(x, RowGate.from_mask(torch.tensor([0, 1, 1, 0, 0, 0, 0, 1.])))
    proj(x, None)
    proj(x, LORA_OFF)
    assert calls == [("delta kernel", [1, 2, 7]), ("delta kernel", None), "base"]
