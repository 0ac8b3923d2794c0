"""The native forward against transformers on the same weights, and paged == full forward."""
from __future__ import annotations

import pytest
import torch

from idlm.config import ModelConfig
from idlm.engine.block_manager import BlockManager
from idlm.engine.kv_cache import KVCache
from idlm.models.attention import SHORT_QUERY, SUMS_QUERY, DenseAttention, PagedAttention, kernel_fits
from idlm.models.llama import build_model

from conftest import CHAT_PROMPTS, requires_embedded, tiny_model


def _rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return float((ours - ref).abs().max() / ref.abs().max())


def _hf_pair(kind: str):
    import transformers as tf

    common = dict(vocab_size=320, hidden_size=64, intermediate_size=160, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    if kind == "llama":
        cfg = tf.LlamaConfig(**common, tie_word_embeddings=True, rope_theta=50000.0,
                             rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                           "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
        return cfg, tf.LlamaForCausalLM
    if kind == "qwen2":
        return tf.Qwen2Config(**common, tie_word_embeddings=False), tf.Qwen2ForCausalLM
    return tf.Qwen3Config(**common, head_dim=32, tie_word_embeddings=False), tf.Qwen3ForCausalLM


@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3"])
def test_random_configs_match_transformers(kind):
    torch.manual_seed(0)
    hf_cfg, cls = _hf_pair(kind)
    ref = cls(hf_cfg).eval()
    with torch.no_grad():  # non-trivial norms and biases so every code path matters
        for name, p in ref.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.uniform_(0.5, 1.5) if "norm" in name else p.normal_(0, 0.2)
    cfg = ModelConfig.from_hf(hf_cfg.to_dict())
    assert cfg.family == kind
    ours = build_model(cfg, ref.state_dict(), torch.float32, "cpu")
    ids = torch.randint(0, 320, (2, 300))  # long enough for llama3 scaling to matter
    pos = torch.arange(300).expand(2, 300)
    with torch.no_grad():
        expected = ref(ids).logits
        got = ours.logits(ours(ids, pos, DenseAttention()))
    assert _rel_err(got, expected) <= 1e-4


@requires_embedded
def test_embedded_model_logits_match_transformers(embedded_llm, hf_reference):
    model = embedded_llm.checkpoint.model
    for prompt in CHAT_PROMPTS[:4]:
        ids = torch.tensor([embedded_llm.apply_chat_template([{"role": "user", "content": prompt}])])
        with torch.no_grad():
            expected = hf_reference(ids).logits[0]
            got = model.logits(model(ids, torch.arange(ids.shape[1])[None], DenseAttention()))[0]
        assert _rel_err(got, expected) <= 1e-4, prompt


def _paged_step(model, kv, blocks, table, start, tokens, spans=None):
    assert blocks.grow(table, start + len(tokens))
    meta = PagedAttention.build(kv.k, kv.v, kv.block_size, [table], [start], [len(tokens)], "cpu")
    if spans is not None:
        spans.append(meta.groups[0].span)
    with torch.no_grad():
        h = model(torch.tensor(tokens), torch.arange(start, start + len(tokens)), meta)
    return model.logits(h)


@pytest.mark.parametrize("family,scrambled", [("llama", False), ("qwen3", False), ("llama", True)])
def test_paged_incremental_equals_full_forward(family, scrambled):
    """Consecutive blocks attend through a view of the pool (span), scattered ones through a gathered copy."""
    model = tiny_model(vocab_size=500, family=family, qk_norm=family == "qwen3")
    torch.manual_seed(1)
    seq = torch.randint(0, 500, (40,)).tolist()
    with torch.no_grad():
        full = model.logits(model(torch.tensor([seq]), torch.arange(40)[None], DenseAttention()))[0]
    paged, spans = _incremental(model, seq, scrambled)
    assert _rel_err(paged, full) <= 1e-5
    assert all(span is None for span in spans) if scrambled else spans[-1] == 0


def _incremental(model, seq: list[int], scrambled: bool) -> tuple[torch.Tensor, list]:
    """Logits of `seq` (40 tokens) by paged steps of 1-9 rows with rollbacks, and each step's span."""
    kv = KVCache(model.config, num_blocks=16, block_size=4, dtype=torch.float32, device="cpu")
    blocks = BlockManager(16, 4)
    if scrambled:
        blocks.free_ids.rotate(5)
        blocks.free_ids[1], blocks.free_ids[2] = blocks.free_ids[2], blocks.free_ids[1]
    table: list[int] = []
    got = {}
    spans = []

    def record(start, tokens):
        out = _paged_step(model, kv, blocks, table, start, tokens, spans)
        for i in range(len(tokens)):
            got[start + i] = out[i]

    record(0, seq[:9])                       # prefill
    record(9, seq[9:10])                     # 1 query token
    record(10, [7, 7, 7])                    # 3 wrong tokens ...
    blocks.truncate(table, 10)               # ... rolled back
    record(10, seq[10:13])                   # 3 query tokens
    record(13, seq[13:20])                   # 7 query tokens
    blocks.truncate(table, 16)               # roll back 4 good ones (crosses a block boundary)
    record(16, seq[16:23])
    for n in range(23, 40):
        record(n, seq[n:n + 1])
    assert sorted(got) == list(range(40))
    return torch.stack([got[i] for i in range(40)]), spans


def test_a_lone_sequence_attends_alike_wherever_its_blocks_lie():
    """Consecutive blocks (a view of the pool) and scattered ones (a gathered copy) give the same bits: both cut
    the keys to the sequence's own (the library's kernel sums differently over a longer, masked tail), so a
    request's output does not depend on what ran before it (formats that round their products' inputs turn
    1e-7 differences into different tokens)."""
    torch.manual_seed(1)
    model = tiny_model(vocab_size=500)
    seq = torch.randint(0, 500, (40,)).tolist()
    assert torch.equal(_incremental(model, seq, False)[0], _incremental(model, seq, True)[0])


@pytest.mark.parametrize("lens", [(1,), (1, 1, 1), (3,), (9,), (3, 6), (3, 40)])
def test_graph_inputs_give_the_steps_own_attention(lens):
    """What a compiled graph traces (`graph_inputs` -> `from_graph_inputs`: keys gathered by whole blocks, a span's
    too, with the mask widened to them; a one-block table padded with a second) attends as the step does, by the
    library's kernel, ours, or multiply-and-sum (the graphs of AR steps where ours is not loaded); a step with a
    prefill chunk beside another sequence (several groups) stays out of graphs."""
    model = tiny_model(vocab_size=500)
    kv = KVCache(model.config, num_blocks=16, block_size=4, dtype=torch.float32, device="cpu")
    blocks = BlockManager(16, 4)
    tables: list[list[int]] = [[] for _ in lens]
    for t, n in zip(tables, lens):
        assert blocks.grow(t, n)
    torch.manual_seed(3)
    ids = torch.randint(0, 500, (sum(lens),))
    pos = torch.cat([torch.arange(n) for n in lens])
    meta = PagedAttention.build(kv.k, kv.v, kv.block_size, tables, [0] * len(lens), list(lens), "cpu")
    inputs = meta.graph_inputs()
    if any(n > SHORT_QUERY for n in lens):
        assert inputs is None
        return
    assert (meta.groups[0].span is not None) == (len(lens) == 1)
    chosen = meta.groups[0].method
    assert inputs[-1] == ("sums" if max(lens) <= SUMS_QUERY and chosen == "sdpa" else chosen)
    with torch.no_grad():
        want = model(ids, pos, meta)
        for method in ("sdpa", "sums") + (("kernel",) if kernel_fits(kv.k[0]) else ()):
            got = model(ids, pos, PagedAttention.from_graph_inputs(*inputs[:-1], method))
            assert _rel_err(got, want) <= 1e-6


@pytest.mark.parametrize("lens", [(5, 11, 2), (5, 70, 2, 41, 1)])  # the second mixes prefill chunks (> SHORT_QUERY)
def test_batched_paged_rows_equal_single(lens):
    """Several sequences with different query counts in one forward == each alone (short ones attend as one padded
    batch, each long one apart)."""
    model = tiny_model(vocab_size=500)
    kv = KVCache(model.config, num_blocks=64, block_size=4, dtype=torch.float32, device="cpu")
    blocks = BlockManager(64, 4)
    torch.manual_seed(2)
    seqs = [torch.randint(0, 500, (n,)).tolist() for n in lens]
    singles = []
    for s in seqs:
        t: list[int] = []
        singles.append(_paged_step(model, kv, blocks, t, 0, s))
        blocks.free(t)
    tables: list[list[int]] = [[] for _ in seqs]
    for t, s in zip(tables, seqs):
        assert blocks.grow(t, len(s))
    meta = PagedAttention.build(kv.k, kv.v, kv.block_size, tables, [0] * len(seqs), [len(s) for s in seqs], "cpu")
    assert len(meta.groups) == 1 + sum(n > SHORT_QUERY for n in lens)
    with torch.no_grad():
        flat = sum(seqs, [])
        pos = torch.cat([torch.arange(len(s)) for s in seqs])
        out = model.logits(model(torch.tensor(flat), pos, meta))
    assert _rel_err(out, torch.cat(singles)) <= 1e-5


def test_explicit_causal_mask_equals_default():
    model = tiny_model(vocab_size=500)
    ids = torch.randint(0, 500, (1, 20))
    pos = torch.arange(20)[None]
    mask = torch.ones(20, 20, dtype=torch.bool).tril()[None, None]
    with torch.no_grad():
        a = model(ids, pos, DenseAttention())
        b = model(ids, pos, DenseAttention(mask))
    assert torch.allclose(a, b, atol=1e-6)
