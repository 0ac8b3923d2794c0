"""Our attention kernel over the paged pool (models/attention.cpp, `idlm_panel::attention`, chosen in
models/attention.py): against a float64 reference for grouped-query heads, several sequences, scattered block
tables, key counts that are not whole vectors and tree masks; a row's bits the same whatever rows and sequences share
the call; a row that sees no key gets zeros; bad tables are refused; and a model attending by it gives the library
kernel's logits."""
from __future__ import annotations

import pytest
import torch

from idlm.engine.block_manager import BlockManager
from idlm.engine.kv_cache import KVCache
from idlm.models import attention, panel
from idlm.models.attention import PagedAttention

from conftest import tiny_model

NB, BS, HKV, D, H = 40, 16, 3, 64, 9


@pytest.fixture(scope="module", autouse=True)
def built():
    why_not = panel.available()
    if why_not and torch.backends.cpu.get_cpu_capability() not in panel.CAPABILITIES:
        pytest.skip(why_not)
    assert why_not is None


@pytest.fixture(scope="module")
def pools():
    g = torch.Generator().manual_seed(0)
    return torch.randn(NB, BS, HKV, D, generator=g), torch.randn(NB, BS, HKV, D, generator=g)


def reference(q, kp, vp, tables, mask):
    """float64: each sequence's keys gathered by its table, each query head against its kv head."""
    b, nb = tables.shape
    s = mask.shape[-1]
    keys = kp[tables.reshape(-1)].reshape(b, nb * BS, HKV, D)[:, :s].double().repeat_interleave(H // HKV, 2)
    vals = vp[tables.reshape(-1)].reshape(b, nb * BS, HKV, D)[:, :s].double().repeat_interleave(H // HKV, 2)
    scores = torch.einsum("bqhd,bshd->bhqs", q.double(), keys) / D ** 0.5
    weights = scores.masked_fill(~mask, float("-inf")).softmax(-1)
    return torch.einsum("bhqs,bshd->bqhd", weights, vals)


def case(b, qn, s, seed):
    g = torch.Generator().manual_seed(seed)
    nb = -(-s // BS)
    tables = torch.stack([torch.randperm(NB, generator=g)[:nb] for _ in range(b)])
    q = torch.randn(b, qn, H, D, generator=g) * 2
    mask = torch.rand(b, 1, qn, s, generator=g) < 0.6  # a tree's rows see scattered keys
    mask[..., 0] = True
    return q, tables, mask


@pytest.mark.parametrize("b,qn,s", [(1, 1, 1), (1, 1, 37), (1, 7, 300), (3, 4, 100), (2, 9, 16), (2, 3, 17)])
def test_the_kernel_matches_a_float64_reference(pools, b, qn, s):
    q, tables, mask = case(b, qn, s, seed=b * 100 + qn * 10 + s)
    got = torch.ops.idlm_panel.attention(q, *pools, tables, mask)
    assert got.shape == q.shape and got.dtype == torch.float32
    assert (got.double() - reference(q, *pools, tables, mask)).abs().max() < 1e-5


def test_a_rows_bits_do_not_depend_on_the_rows_or_sequences_beside_it(pools):
    q, tables, mask = case(3, 7, 90, seed=5)
    every = torch.ops.idlm_panel.attention(q, *pools, tables, mask)
    for b in range(3):
        alone = torch.ops.idlm_panel.attention(q[b:b + 1], *pools, tables[b:b + 1], mask[b:b + 1])
        assert torch.equal(alone, every[b:b + 1])
        for r in range(7):
            row = torch.ops.idlm_panel.attention(q[b:b + 1, r:r + 1].contiguous(), *pools, tables[b:b + 1],
                                                 mask[b:b + 1, :, r:r + 1].contiguous())
            assert torch.equal(row, every[b:b + 1, r:r + 1])


def test_a_row_that_sees_no_key_gets_zeros_and_bad_tables_are_refused(pools):
    q, tables, mask = case(1, 2, 40, seed=6)
    mask[0, 0, 1] = False
    got = torch.ops.idlm_panel.attention(q, *pools, tables, mask)
    assert torch.equal(got[0, 1], torch.zeros(H, D)) and got[0, 0].abs().sum() > 0
    with pytest.raises(RuntimeError, match="not in the pool"):
        torch.ops.idlm_panel.attention(q, *pools, tables + NB, mask)
    with pytest.raises(RuntimeError, match="S <= blocks x block size"):
        torch.ops.idlm_panel.attention(q, *pools, tables[:, :1], mask)
    with pytest.raises(RuntimeError, match="float32 q"):
        torch.ops.idlm_panel.attention(q.double(), *pools, tables, mask)


def test_a_model_attending_by_the_kernel_gives_the_library_kernels_logits(monkeypatch):
    """Steps of 1-7 rows and prefill chunks of 9 and 40 rows, three sequences at once over scattered blocks: the same
    logits within float32 rounding whichever kernel the groups take."""
    model = tiny_model(vocab_size=500)
    torch.manual_seed(4)
    lens = [(0, 9), (9, 1), (10, 7), (17, 3), (20, 40)]
    ours = attention.kernel_fits
    outs = {}
    for kernel in (False, True):
        monkeypatch.setattr(attention, "kernel_fits", ours if kernel else lambda pool: False)
        kv = KVCache(model.config, num_blocks=64, block_size=4, dtype=torch.float32, device="cpu")
        blocks = BlockManager(64, 4)
        blocks.free_ids.rotate(7)
        tables: list[list[int]] = [[], [], []]
        logits, methods = [], set()
        for start, n in lens:
            for t in tables:
                assert blocks.grow(t, start + n)
            meta = PagedAttention.build(kv.k, kv.v, 4, tables, [start] * 3, [n] * 3, "cpu")
            methods.update(g.method for g in meta.groups)
            ids = torch.randint(0, 500, (3 * n,), generator=torch.Generator().manual_seed(start))
            pos = torch.arange(start, start + n).repeat(3)
            with torch.no_grad():
                logits.append(model.logits(model(ids, pos, meta)))
        outs[kernel] = torch.cat(logits)
        assert methods == ({"kernel"} if kernel else {"sdpa"})  # 1-row steps and long chunks too
    assert (outs[False] - outs[True]).abs().max() < 1e-4 * outs[False].abs().max()


def test_a_rows_logits_are_the_same_bits_whether_its_step_feeds_it_alone_or_with_others():
    """Every step attends by the kernel (1-row AR steps, verify steps, prefill chunks of any length) and the panel
    products are row-independent: a position's logits are the same bits fed alone (AR), among the rows of a wider
    step (an R-ISD verify step) or in one long chunk (a prefill, whatever the prefix cache held), so a verify row is
    exactly the AR row, even where a format rounds its products' inputs."""
    from idlm.models.panel import PanelLinear

    model = tiny_model(vocab_size=500)
    model.pack_for_cpu_inference(PanelLinear)
    seq = torch.randint(0, 500, (48,), generator=torch.Generator().manual_seed(5)).tolist()

    def logits(chunks: list[int]) -> torch.Tensor:
        kv = KVCache(model.config, num_blocks=16, block_size=4, dtype=torch.float32, device="cpu")
        blocks, table, out, start = BlockManager(16, 4), [], [], 0
        for n in chunks:
            assert blocks.grow(table, start + n)
            meta = PagedAttention.build(kv.k, kv.v, 4, [table], [start], [n], "cpu")
            assert {g.method for g in meta.groups} == {"kernel"}
            ids, pos = torch.tensor(seq[start:start + n]), torch.arange(start, start + n)
            with torch.no_grad():
                out.append(model.logits(model(ids, pos, meta)))
            start += n
        return torch.cat(out)

    alone = logits([8] + [1] * 40)
    assert torch.equal(alone, logits([8, 7, 7, 2, 24]))
    assert torch.equal(alone, logits([48]))
