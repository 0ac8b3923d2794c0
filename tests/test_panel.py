"""The panel kernels (models/panel.py, models/kernel_choice.py): float32, int8 and w8a8 products against a float64
reference for any shape, a row's output the same bit for bit whatever rows share the call, the choice against the
library's kernels measured once per machine, greedy R-ISD == AR on a tiny gated model with them, and on the
embedded model oneDNN's tokens in float32 and R-ISD int8 == AR int8 up to near-ties."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from idlm import LLM, SamplingParams
from idlm.bench.decode import heldout_prompts
from idlm.models import kernel_choice, panel
from idlm.models.lora import LoRAProj, pack_adapter
from idlm.models.panel import NO_DELTA, Int8Panels, PanelLinear, PanelLoRA, W8A8Panels
from idlm.models.quantize import Int8Linear, Int8PanelLinear, W8A8Linear, quantize_int8, quantize_model

from conftest import requires_embedded
from test_loading import tiny_tokenizer  # noqa: F401 (fixture)


@pytest.fixture(scope="module", autouse=True)
def built():
    why_not = panel.available()
    if why_not and torch.backends.cpu.get_cpu_capability() not in panel.CAPABILITIES:
        pytest.skip(why_not)
    assert why_not is None  # an AVX2 CPU with the compiler compiled steps need: it must build


@pytest.mark.parametrize("out_features,in_features", [(64, 32), (50, 37), (16, 1), (3, 200), (960, 576)])
@pytest.mark.parametrize("bias", [False, True])
def test_panel_linear_matches_a_float64_reference(out_features, in_features, bias):
    g = torch.Generator().manual_seed(out_features * in_features)
    w = torch.randn(out_features, in_features, generator=g)
    b = torch.randn(out_features, generator=g) if bias else None
    lin = PanelLinear(w, b)
    for rows in (0, 1, 2, 3, 4, 5, 7, 8, 9, 33, 300):  # every block shape, several chunks per thread
        x = torch.randn(rows, in_features, generator=g)
        want = x.double() @ w.double().T + (b.double() if bias else 0)
        got = lin(x)
        assert got.shape == (rows, out_features) and got.dtype == torch.float32
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5 * in_features ** 0.5)
    x3 = torch.randn(2, 5, in_features, generator=g)  # leading dims kept
    torch.testing.assert_close(lin(x3), lin(x3.reshape(10, in_features)).reshape(2, 5, out_features))


@pytest.mark.parametrize("kind", ["Q4_1", "Q8_0"])
@pytest.mark.parametrize("out_features,in_features", [(50, 64), (960, 576), (16, 1536)])
def test_block_coded_weights_give_the_float32_panels_bits(kind, out_features, in_features):
    """GGUF blocks made float32 are packed as their codes and rebuilt in registers: every output bit for bit the
    float32 panels' (the same weights, the same chains), at every block shape, with a bias and an adapter."""
    from test_block_codes import gguf_values
    from gguf import GGMLQuantizationType

    g = torch.Generator().manual_seed(out_features)
    w = gguf_values(torch.randn(out_features, in_features, generator=g), getattr(GGMLQuantizationType, kind))
    b = torch.randn(out_features, generator=g)
    lin = PanelLinear(w, b)
    assert lin.panels.dtype == torch.uint8  # packed as codes
    plain = torch.ops.idlm_panel.pack(w)
    delta = PanelLoRA(torch.randn(16, in_features, generator=g).bfloat16().float(),
                      torch.randn(out_features, 16, generator=g).bfloat16().float())
    for rows in (1, 2, 3, 4, 7, 8, 9, 33):
        x = torch.randn(rows, in_features, generator=g)
        want = torch.ops.idlm_panel.linear(x, plain, out_features, b, *NO_DELTA)
        assert torch.equal(lin(x), want)
        torch.testing.assert_close(lin(x).double(), x.double() @ w.double().T + b.double(), rtol=1e-5,
                                   atol=1e-5 * in_features ** 0.5)
        gated = torch.tensor([0, rows - 1])
        fused = torch.ops.idlm_panel.linear(x, plain, out_features, b, *delta.operands(gated))
        assert torch.equal(lin.fused(x, delta, gated), fused)


def test_an_adapter_whose_weights_look_like_gguf_blocks_stays_on_float_panels():
    """A fresh adapter's B is zeros, which are GGUF blocks too (d = 0): the delta's products keep float panels."""
    w = torch.randn(48, 64)
    lin = PanelLinear(w)
    delta = PanelLoRA(torch.ones(32, 64), torch.zeros(48, 32))
    assert torch.uint8 not in (delta.a.panels.dtype, delta.b[0].panels.dtype) and lin.panels.dtype == torch.float32
    x = torch.randn(3, 64)
    assert torch.equal(lin.fused(x, delta, torch.tensor([1])), lin(x))


def test_block_coded_panels_are_checked():
    q = torch.zeros(16, 64, dtype=torch.int8)
    d = torch.ones(16, 2, dtype=torch.float16)
    with pytest.raises(RuntimeError, match="4-bit code"):
        torch.ops.idlm_panel.pack_codes(q - 1, d, d)
    with pytest.raises(RuntimeError, match="multiple of 32"):
        torch.ops.idlm_panel.pack_codes(q[:, :40], d, d)
    with pytest.raises(RuntimeError, match="float16 scales"):
        torch.ops.idlm_panel.pack_codes(q, d.float(), None)
    panels = torch.ops.idlm_panel.pack_codes(q, d, None)
    with pytest.raises(RuntimeError, match="does not match the panels"):
        torch.ops.idlm_panel.linear(torch.randn(1, 96), panels, 16, None, *NO_DELTA)


def test_a_rows_output_does_not_depend_on_the_rows_beside_it():
    """What makes an AR step (1 row) and a verify step (many) compute a position alike, bit for bit."""
    g = torch.Generator().manual_seed(0)
    lin = PanelLinear(torch.randn(200, 96, generator=g))  # 13 panels: blocks of 2-4 panels and their remainders
    x = torch.randn(11, 96, generator=g)
    batched = lin(x)
    for i in range(11):
        assert torch.equal(lin(x[i:i + 1]), batched[i:i + 1])
    for a, b in ((3, 10), (0, 2), (1, 5)):  # other block splits of the same rows
        assert torch.equal(lin(x[a:b]), batched[a:b])
    assert torch.equal(lin(x.T.contiguous().T), batched)  # a non-contiguous input is read as its values


def test_a_weight_of_bfloat16_values_is_kept_in_bfloat16_with_the_same_sums():
    """Half the bytes for a bf16 adapter's weights, and not one output bit changed; other weights stay float32."""
    g = torch.Generator().manual_seed(2)
    w = torch.randn(70, 48, generator=g).bfloat16().float() * 2  # a power-of-two scaling keeps them bf16 values
    lin = PanelLinear(w)
    assert lin.panels.dtype == torch.bfloat16
    as_float32 = torch.ops.idlm_panel.pack(w)
    x = torch.randn(9, 48, generator=g)
    for rows in (1, 3, 7, 9):
        assert torch.equal(lin(x[:rows]), torch.ops.idlm_panel.linear(x[:rows], as_float32, 70, None, *NO_DELTA))
    assert PanelLinear(w + 1e-3).panels.dtype == torch.float32


def test_panel_linear_refuses_other_dtypes_and_mismatched_panels():
    lin = PanelLinear(torch.randn(32, 8))
    with pytest.raises(RuntimeError, match="float32"):
        lin(torch.randn(2, 8, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="does not match the panels"):
        lin(torch.randn(2, 9))
    with pytest.raises(RuntimeError, match="out_features"):
        torch.ops.idlm_panel.linear(torch.randn(2, 8), lin.panels, 40, None, *NO_DELTA)


def test_add_lora_adds_the_two_products_at_the_gated_rows_bit_for_bit():
    """One call = gather, x @ (scaling A).T, then @ B.T, added at the gated rows (all rows without a gate): the two
    PanelLinear products' sums exactly, other rows untouched; a bf16 adapter's weights as a float32 one's."""
    g = torch.Generator().manual_seed(3)
    a = torch.randn(24, 40, generator=g).bfloat16().float() * 2  # scaled A: bf16 values, kept in bf16
    b = torch.randn(70, 24, generator=g) * 0.1
    lora, pa, pb = PanelLoRA(a, b), PanelLinear(a), PanelLinear(b)
    assert lora.a.panels.dtype == torch.bfloat16 and lora.b[0].panels.dtype == torch.float32
    x, y0 = torch.randn(2, 4, 40, generator=g), torch.randn(2, 4, 70, generator=g)
    for rows in (torch.tensor([2, 3, 4]), torch.tensor([0, 5, 7]), torch.tensor([6]), None):
        y = y0.clone()
        lora(y, x, rows)
        flat, want = y.view(8, 70), y0.clone().view(8, 70)
        picked = torch.arange(8) if rows is None else rows
        want[picked] = want[picked] + pb(pa(x.view(8, 40)[picked]))
        assert torch.equal(flat, want)
    with pytest.raises(RuntimeError, match="contiguous float32"):
        lora(y0.transpose(0, 1), x, None)


def test_add_lora_with_a_block_diagonal_b_reads_only_its_blocks_and_gives_the_dense_products_bits():
    """A fused group's B (models/fuse.py): each part's block in its own rows and rank columns, a part without an
    adapter (rows 40-56) getting none. Given its blocks, the delta is the dense block-diagonal product's bit for
    bit; only the blocks are kept; blocks that do not fit are refused."""
    g = torch.Generator().manual_seed(4)
    blocks = [(0, 40, 0, 8), (56, 61, 8, 16), (61, 93, 16, 24)]  # out sizes 40, 5, 32: panels cut mid-block too
    a = torch.randn(24, 48, generator=g).bfloat16().float()
    b = torch.zeros(93, 24)
    for r0, r1, c0, c1 in blocks:
        b[r0:r1, c0:c1] = torch.randn(r1 - r0, c1 - c0, generator=g).bfloat16().float()
    lora, dense = PanelLoRA(a, b, blocks), PanelLoRA(a, b)
    assert [tuple(p.panels.shape) for p in lora.b] == [(3, 8, 16), (1, 8, 16), (2, 8, 16)]
    x, y0 = torch.randn(9, 48, generator=g), torch.randn(9, 93, generator=g)
    for rows in (torch.tensor([6, 7, 8]), torch.tensor([1, 4]), None):
        y, want = y0.clone(), y0.clone()
        lora(y, x, rows)
        dense(want, x, rows)
        assert torch.equal(y, want)
        assert torch.equal(y[:, 40:56], y0[:, 40:56])
        changed = torch.ones(9, dtype=torch.bool) if rows is None else torch.zeros(9, dtype=torch.bool).index_fill(0, rows, True)
        assert torch.equal(y[~changed], y0[~changed]) and not torch.equal(y[changed], y0[changed])
    with pytest.raises(RuntimeError, match="does not fit"):
        torch.ops.idlm_panel.add_lora(y0, x, lora.a.panels, 24, [p.panels for p in lora.b], [0, 40, 0, 56, 5, 8, 61, 32, 20], None)
    with pytest.raises(RuntimeError, match="three numbers"):
        torch.ops.idlm_panel.add_lora(y0, x, lora.a.panels, 24, [p.panels for p in lora.b], [0, 40, 0], None)


@pytest.mark.parametrize("kind", ["float32", "w8a8"])
def test_a_product_adding_the_adapter_delta_in_its_own_call_gives_the_two_calls_bits(kind):
    """`fused` (one operator call: each thread adds the delta to the columns it has just computed) == the product,
    its bias, then `add_lora`, bit for bit: blocks cut mid-panel, a part without an adapter, every row, a few, none;
    1 to 40 rows (prefill chunks too)."""
    g = torch.Generator().manual_seed(5)
    blocks = [(0, 40, 0, 8), (56, 61, 8, 16), (61, 93, 16, 24)]
    a = torch.randn(24, 48, generator=g)
    b = torch.zeros(93, 24)
    for r0, r1, c0, c1 in blocks:
        b[r0:r1, c0:c1] = torch.randn(r1 - r0, c1 - c0, generator=g)
    lora, w, bias = PanelLoRA(a, b, blocks), torch.randn(93, 48, generator=g), torch.randn(93, generator=g)
    if kind == "float32":
        lin = PanelLinear(w, bias)
        product, fused = lin, lin.fused
    else:
        w8 = W8A8Panels(*quantize_int8(w))
        product, fused = (lambda x: w8.product(x, bias)), (lambda x, d, rows: w8.product(x, bias, d, rows))
    for m in (1, 3, 7, 40):
        x = torch.randn(m, 48, generator=g)
        for rows in (None, torch.tensor([m - 1]), torch.arange(0, m, 3), torch.tensor([], dtype=torch.long)):
            want = product(x)
            lora(want, x, rows)
            got = fused(x, lora, rows)
            assert torch.equal(got, want)
            if rows is not None and len(rows) == 0:
                assert torch.equal(got, product(x))


def test_argmax_is_torchs_first_largest_value_nans_ties_and_signed_zeros_included():
    g = torch.Generator().manual_seed(6)
    for n in (1, 5, 63, 64, 65, 200, 4099):
        for m in (1, 3, 7):
            x = torch.randn(m, n, generator=g)
            cases = [x, x.round(), torch.full((m, n), -float("inf")), torch.zeros(m, n), -torch.zeros(m, n)]
            cases.append(x.index_fill(1, torch.tensor([n // 2, n - 1]), float("nan")))
            cases.append(x.index_fill(1, torch.tensor([n // 3, n - 1]), float("inf")))
            cases.append(torch.zeros(m, n).index_fill(1, torch.tensor([0]), -0.0))
            for c in cases:
                assert torch.equal(torch.ops.idlm_panel.argmax(c), c.argmax(-1))
    x = torch.randn(2, 3, 70, generator=g)
    assert torch.equal(panel.argmax(x), x.argmax(-1)) and panel.argmax(x.double()).shape == (2, 3)


def test_int8_panels_match_a_float64_reference_and_rows_are_independent():
    g = torch.Generator().manual_seed(1)
    q, scales = quantize_int8(torch.randn(50, 40, generator=g))
    lin = Int8Panels(q, scales)
    x = torch.randn(9, 40, generator=g).bfloat16()
    want = x.double() @ (q.double() * scales.double()[:, None]).T
    got = lin.product(x)
    assert got.dtype == torch.float32 and torch.equal(got.bfloat16().float(), got)  # bfloat16 values
    torch.testing.assert_close(got.double(), want, rtol=4e-3, atol=1e-4)
    batched = lin.product(x)
    assert all(torch.equal(lin.product(x[i:i + 1]), batched[i:i + 1]) for i in range(9))
    with pytest.raises(RuntimeError, match="bfloat16 x"):
        lin.product(x.float())
    # Int8PanelLinear: the same quantized model as aten's kernel, inputs and output rounded to bf16 alike
    w = torch.randn(64, 32, generator=g)
    xs = torch.randn(5, 32, generator=g)
    ours, aten = Int8PanelLinear(w, None), Int8Linear(w, None, 1 << 30)
    torch.testing.assert_close(ours(xs), aten(xs), rtol=1e-2, atol=1e-2)
    assert torch.equal(ours.weight, aten.weight)


def pair_sums(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The int8 products' defined sums, by hand in float32: per pair of inputs the odd one's product added, then the
    even one's (each product exact: bf16 x int8), each addition rounded; times the scales, rounded to bfloat16."""
    if x.shape[1] % 2:
        x, q = torch.nn.functional.pad(x, (0, 1)), torch.nn.functional.pad(q, (0, 1))
    x, w = x.float(), q.float()
    acc = torch.zeros(x.shape[0], w.shape[0])
    for i in range(0, x.shape[1], 2):
        acc = (acc + x[:, i + 1:i + 2] * w[:, i + 1]) + x[:, i:i + 1] * w[:, i]
    return (acc * scales.float()).bfloat16().float()


@pytest.mark.parametrize("out_features,in_features", [(64, 96), (50, 37), (40, 1)])
def test_int8_products_are_the_pair_sums_bit_for_bit_at_every_row_count(out_features, in_features):
    """The order every build and instruction computes (FMAs, or VDPBF16PS on AVX512-BF16 CPUs from 2 rows on), so
    an AR step and a verify step, and two machines, give a row the same bits."""
    g = torch.Generator().manual_seed(out_features + in_features)
    q, scales = quantize_int8(torch.randn(out_features, in_features, generator=g))
    lin = Int8Panels(q, scales)
    assert (lin.pairs is not None) == ("BF16" in panel.build().split("+"))
    x = (torch.randn(11, in_features, generator=g) * 4).bfloat16()
    for rows in (1, 2, 3, 7, 8, 9, 11):
        assert torch.equal(lin.product(x[:rows]), pair_sums(x[:rows], q, scales))
    if lin.pairs is None:
        with pytest.raises(RuntimeError, match="AVX512-BF16"):
            torch.ops.idlm_panel.pack_pairs(q)


def test_int8_products_round_ties_to_even_as_torch_does():
    """Sums exactly halfway between two bfloat16 values (1 + 2^-8 lies between 1 and 1 + 2^-7) round to the even
    one, as torch's own conversion does, at one row and at several (the FMA and VDPBF16PS paths)."""
    q = torch.tensor([[1, 1], [1, 3], [-1, -1], [-1, -3], [127, 1], [0, 0]], dtype=torch.int8)
    lin = Int8Panels(q, torch.ones(6))
    x = torch.tensor([[1.0, 2.0 ** -8]] * 3).bfloat16()
    sums = x.double() @ q.double().T
    want = sums.float().bfloat16().float()
    assert torch.equal(want[0, :4], torch.tensor([1.0, 1 + 2.0 ** -6, -1.0, -1 - 2.0 ** -6]))  # ties to even
    for rows in (1, 3):
        assert torch.equal(lin.product(x[:rows]), want[:rows])


def w8a8_reference(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The w8a8 model in float64: each row of x quantized per block of 32 inputs (scale max |x| / 127, round half to
    even; an all-zero block is zeros), the int8 sums exact, times both scales."""
    rows, k = x.shape
    padded = -(-k // 32) * 32
    blocks = torch.nn.functional.pad(x, (0, padded - k)).view(rows, padded // 32, 32)
    xs = blocks.abs().amax(-1, keepdim=True) / 127  # float32, as the kernel divides
    xq = torch.where(xs > 0, torch.round(blocks / xs).clamp(-127, 127), torch.zeros_like(blocks))
    w = torch.nn.functional.pad(q.double(), (0, padded - k)).view(q.shape[0], padded // 32, 32)
    sums = torch.einsum("rbi,nbi->rbn", xq.double(), w)  # exact integers
    return (sums * xs.double()).sum(1) * scales.double()


@pytest.mark.parametrize("out_features,in_features", [(64, 96), (50, 37), (40, 1), (960, 576)])
def test_w8a8_products_match_a_float64_reference_and_rows_are_independent(out_features, in_features):
    """Every block shape (1-8 rows by 1-6 panels on AVX-512, 1-2 by 1-2 on AVX2), a K that is not a multiple of 32
    or of 4, out features that are not of 16, an all-zero row and block, and a row's bits the same in any call."""
    g = torch.Generator().manual_seed(out_features + in_features)
    q, scales = quantize_int8(torch.randn(out_features, in_features, generator=g))
    lin = W8A8Panels(q, scales)
    x = torch.randn(21, in_features, generator=g) * torch.logspace(-3, 2, 21)[:, None]
    x[4] = 0
    x[5, : min(32, in_features)] = 0
    got = lin.product(x)
    assert got.shape == (21, out_features) and got.dtype == torch.float32
    want = w8a8_reference(x, q, scales)
    assert torch.equal(got[4], torch.zeros(out_features))
    err = (got.double() - want).abs() / want.abs().amax(-1, keepdim=True).clamp_min(1e-30)
    assert err.max() < 1e-6  # float32 sums of the blocks, against float64
    for rows in (1, 2, 3, 7, 8, 9, 20):  # bit for bit: whatever rows share the call
        for first in (0, 21 - rows):
            assert torch.equal(lin.product(x[first:first + rows]), got[first:first + rows])
    bias = torch.randn(out_features, generator=g)
    assert torch.equal(lin.product(x, bias), got + bias)
    with pytest.raises(RuntimeError, match="float32 x"):
        lin.product(x.bfloat16())


def test_w8a8_products_of_many_rows_give_each_rows_bits_of_one_row_products():
    """From 10 rows on an AMX CPU the products run on the tile unit (16 rows a tile: 40 rows are two full tiles and
    one of 8; 9 panels: two groups of 4 and a lone one, the last of 5 columns), one row on VPDPBUSD (AVX2 CPUs: on
    their own kernel at both counts): the same integer sums and float32 steps, so the same bits."""
    g = torch.Generator().manual_seed(3)
    q, scales = quantize_int8(torch.randn(133, 200, generator=g))
    lin = W8A8Panels(q, scales)
    x = torch.randn(40, 200, generator=g) * torch.logspace(-2, 2, 40)[:, None]
    x[11] = 0
    many = lin.product(x)
    for rows in (10, 16, 17, 33):
        assert torch.equal(lin.product(x[:rows]), many[:rows])
    assert torch.equal(torch.cat([lin.product(x[i:i + 1]) for i in range(40)]), many)
    err = (many.double() - w8a8_reference(x, q, scales)).abs().amax() / many.abs().amax()
    assert err < 1e-6


@pytest.mark.skipif(panel.build().split("+")[:2] != ["AVX512", "VNNI"], reason="AMX builds only beside VNNI")
def test_kernels_whose_amx_build_fails_build_without_it(tmp_path):
    """A compiler that cannot build the AMX path (here: a flag it does not know) costs AMX, not the kernels."""
    script = f"""
import torch
torch.cpu._is_amx_tile_supported = lambda: True
from idlm.models import panel
panel.FEATURE_FLAGS["AMX"] = ["-mno-such-flag-idlm"]
assert panel.build().endswith("+AMX")
from pathlib import Path
assert panel.available(Path({str(tmp_path)!r})) is None, panel.available()
assert "AMX" not in panel.build()
print(panel.build())
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "+".join(f for f in panel.build().split("+") if f != "AMX")


def test_w8a8_rounds_activations_half_to_even_and_sums_without_saturating():
    """x / scale exactly halfway (0.5, 1.5, 2.5 of a step) rounds to the even integer as torch.round does; and the
    largest products (127 x 127 at every input, either sign) sum exactly, where a saturating 16-bit pair sum
    (VPMADDUBSW on unsigned activations) would clip."""
    q = torch.tensor([[1] * 32, [-1] * 32], dtype=torch.int8)
    lin = W8A8Panels(q, torch.ones(2))
    x = torch.zeros(1, 32)
    x[0, :4] = torch.tensor([127.0, 0.5, 1.5, 2.5])  # scale 1: rounds to 127, 0, 2, 2
    assert torch.equal(lin.product(x), torch.tensor([[131.0, -131.0]]))
    big = torch.full((127, 64), 127, dtype=torch.int8)
    big[1::2] = -127
    lin = W8A8Panels(big, torch.ones(127))
    for sign in (1.0, -1.0):
        x = torch.full((2, 64), sign)  # 127 at every input
        torch.testing.assert_close(lin.product(x).double(), w8a8_reference(x, big, torch.ones(127)), rtol=1e-7, atol=0)


@pytest.mark.parametrize("fmt", ["fp32", "gguf", "int8"])
def test_the_choice_times_both_kernels_at_each_row_count(fmt):
    record = kernel_choice.panel_is_faster([(64, 32), (48, 32)], fmt, rows=(1, 3), repeats=3)
    assert set(record) == {"panel", "rows"} and set(record["rows"]) == {1, 3}
    assert all(lib > 0 and p > 0 for lib, p in record["rows"].values())
    assert record["panel"] == all(p < lib for lib, p in record["rows"].values())


def test_a_checkpoint_of_gguf_blocks_is_measured_and_packed_as_codes(tmp_path, tiny_tokenizer, monkeypatch):  # noqa: F811
    """A float32 checkpoint whose weights are GGUF blocks (as a converted GGUF file's are) gets its own kernel
    measurement ("gguf") and block-coded panels, and the greedy tokens of the same model on float32 panels."""
    from test_loading import save_tiny
    from idlm.models.block_codes import random_blocks

    model = save_tiny(tmp_path / "plain", tiny_tokenizer)
    with torch.no_grad():
        for name, w in model.named_parameters():
            if w.dim() == 2 and "embed" not in name:
                w.copy_(random_blocks(*w.shape))
    model.save_pretrained(tmp_path / "gguf")
    tiny_tokenizer.save_pretrained(tmp_path / "gguf")
    monkeypatch.setenv("IDLM_CACHE", str(tmp_path / "cache"))
    calls = []
    monkeypatch.setattr(kernel_choice, "panel_is_faster",
                        lambda shapes, fmt, **_: calls.append(fmt) or {"panel": True, "rows": {}})
    coded = LLM(str(tmp_path / "gguf"), kv_cache_tokens=256)
    assert calls == ["gguf"] and all(m.kernel.panels.dtype == torch.uint8 for m in _projs(coded))
    plain = LLM(str(tmp_path / "gguf"), kv_cache_tokens=256, panel="on")
    for m in _projs(plain):  # the same weights on float32 panels
        m.kernel = PanelLinear(m.weight, m.bias, read_codes=False)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    assert [o.token_ids for o in coded.generate(["hello", "the cat"], params, decoding="ar")] == \
        [o.token_ids for o in plain.generate(["hello", "the cat"], params, decoding="ar")]


def test_an_llm_chooses_the_panel_kernels_once_per_machine_and_format(tmp_path, tokenizer, monkeypatch):  # noqa: F811
    from test_loading import save_tiny

    save_tiny(tmp_path / "model", tokenizer)
    monkeypatch.setenv("IDLM_CACHE", str(tmp_path / "cache"))
    calls = []

    def fake(shapes, fmt, **_):
        calls.append((fmt, shapes))
        return {"panel": True, "rows": {}}

    monkeypatch.setattr(kernel_choice, "panel_is_faster", fake)
    path = str(tmp_path / "model")
    first = LLM(path, kv_cache_tokens=256)
    assert first.panel and len(calls) == 1 and calls[0][0] == "fp32" and (64, 64) in calls[0][1]
    assert all(isinstance(m.kernel, PanelLinear) for m in _projs(first)) and isinstance(first.model.head_kernel,
                                                                                          PanelLinear)
    assert LLM(path, kv_cache_tokens=256).panel and len(calls) == 1  # kept per machine
    off = LLM(path, kv_cache_tokens=256, panel="off")
    assert not off.panel and not any(isinstance(m.kernel, PanelLinear) for m in _projs(off))
    int8 = LLM(path, kv_cache_tokens=256, quantize="int8")  # its own measurement: int8 products
    assert int8.panel and calls[-1][0] == "int8" and int8.row_limits == {}  # at every row count: no limit
    assert all(isinstance(k, Int8PanelLinear) for k in [m.kernel for m in _projs(int8)] + [int8.model.head_kernel])
    aten = LLM(path, kv_cache_tokens=256, quantize="int8", panel="off")
    assert isinstance(aten.model.head_kernel, Int8Linear) and aten.row_limits
    from test_lora import random_gated_adapter

    random_gated_adapter(path, tmp_path / "adapter")
    for choice, packed in (("auto", True), ("off", False)):  # the adapter's products too
        llm = LLM(path, adapter=str(tmp_path / "adapter"), kv_cache_tokens=256, panel=choice)
        lora = [m for m in llm.model.modules() if isinstance(m, LoRAProj)]
        assert lora and all((m.delta_kernel is not None) == packed for m in lora)
    with pytest.raises(ValueError, match="panel"):
        LLM(path, panel="fast")
    count = len(calls)
    w8a8 = LLM(path, kv_cache_tokens=256, quantize="w8a8")  # on the panel kernels: nothing to choose or measure
    assert w8a8.panel and len(calls) == count and w8a8.row_limits == {}
    assert all(isinstance(k, W8A8Linear) for k in [m.kernel for m in _projs(w8a8)] + [w8a8.model.head_kernel])
    with pytest.raises(ValueError, match="w8a8 runs on the panel kernels"):
        LLM(path, kv_cache_tokens=256, quantize="w8a8", panel="off")


def _projs(llm: LLM):
    return [m for m in llm.model.modules() if getattr(m, "kernel", None) is not None]


def test_risd_equals_ar_with_panel_products_on_a_tiny_model(tokenizer):
    from test_quantize import assert_risd_equals_ar_on_tiny

    def fp32(m):
        m.pack_for_cpu_inference(PanelLinear)
        pack_adapter(m, PanelLoRA)

    def quantized(fmt):
        def weights(m):
            quantize_model(m, fmt, panel=True)
            pack_adapter(m, PanelLoRA)
        return weights

    assert_risd_equals_ar_on_tiny(tokenizer, fp32, "panel", strides=(2, 3, 4))
    assert_risd_equals_ar_on_tiny(tokenizer, quantized("int8"), "int8 panel", strides=(2, 4))
    assert_risd_equals_ar_on_tiny(tokenizer, quantized("w8a8"), "w8a8", strides=(2, 3, 4))


@requires_embedded
def test_embedded_panel_gives_onednns_tokens_and_int8_risd_equals_ar_batched_or_alone():
    """fp32 either way (the kernels sum in different orders: logits agree to float32 rounding; greedy tokens are the
    same on these prompts, R-ISD with the shipped adapter included). int8 on the panel kernel, which runs at every
    row count: R-ISD int8 gives AR int8's tokens exactly, four prompts batched and one alone (with a dense path
    above a 64-row limit, the batched prefill and verify steps left the lone steps' bits: measured divergences at
    tokens 0, 16 and 34 of three of these prompts, near-ties at bf16 precision)."""
    convs = [[{"role": "user", "content": p}] for p in heldout_prompts(4)]
    params = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True, logprobs=1)
    runs = {}
    for choice in ("off", "on"):
        llm = LLM("smollm2-135m", panel=choice, kv_cache_tokens=4096)
        assert llm.panel == (choice == "on")
        runs[choice] = (llm.chat(convs, params, decoding="ar"), llm.chat(convs, params, decoding="risd", stride=4))
    for ar_o, ar_p, risd_p in zip(runs["off"][0], runs["on"][0], runs["on"][1]):
        assert ar_p.token_ids == ar_o.token_ids and risd_p.token_ids == ar_p.token_ids
        for a, b in zip(ar_o.logprobs, ar_p.logprobs):
            assert abs(a.logprob - b.logprob) < 1e-3
    int8 = LLM("smollm2-135m", quantize="int8", panel="on", kv_cache_tokens=4096)
    assert isinstance(int8.model.head_kernel, Int8PanelLinear) and int8.row_limits == {}
    ar = [o.token_ids for o in int8.chat(convs, params, decoding="ar")]
    assert [o.token_ids for o in int8.chat(convs, params, decoding="risd", stride=4)] == ar
    assert [int8.chat([c], params, decoding="risd", stride=4)[0].token_ids for c in convs[2:]] == ar[2:]
