"""Weight-only quantized projections for CPU inference: int8 per output channel, int4 per group of 32.

int8 (`Int8Linear`): each projection (and the LM head) keeps w_int8 [N, K] with scales s [N] (w ~ w_int8 * s,
|w_int8| <= 127) and computes `aten._weight_int8pack_mm(x_bf16, w_int8, s_bf16)`: it reads a quarter of fp32's
bytes, is fast with bfloat16 inputs (and many times slower with fp32 ones), and rounds its output to bfloat16.

int4 (`Int4Linear`): 4-bit codes q in 0..15 per group of 32 inputs with a scale and a zero per group (w ~ (q - 8)
* scale + zero, asymmetric: the group's min and max are on the grid), by `aten._weight_int4pack_mm_for_cpu`
(bfloat16 inputs, scales and zeros): an eighth of fp32's bytes. This is GGUF's Q4_1 layout (blocks of 32, a
scale and a minimum each), so quantizing weights that were dequantized from Q4_1 (the embedded default) gives
back their codes: the int4 model is the checkpoint's own 4-bit weights, with the scale and zero rounded to
bfloat16. The LM head stays int8 in this format (the embedded default's is Q8_0; 4 bits would be a different
model), as do projections the int4 kernel cannot take (out features not a multiple of 16, in features not of
32).

Only the products run in bfloat16: the residual stream, attention, norms, the KV cache and the gated LoRA keep the model's dtype
(float32 on CPU). A model kept in bfloat16 end to end drifted from itself between an AR step and a verify step
(rounding of the residual stream compounds over layers and tokens). Even so, rounding the products' inputs
to bf16 turns any difference between a 1-row AR step and a many-row verify step into bf16 steps, so with aten's
kernels greedy R-ISD int8 equals greedy AR int8 up to near-ties at bf16 precision, not bitwise
(docs/architecture.md); with our panel kernel (`Int8PanelLinear`) a row's bits do not depend on the step, and
the two are equal token for token.

aten's kernels are fastest for few-row products and slower than oneDNN's packed float32 product once a step has
many rows, so a start-up microbenchmark (`measure_row_limit`, per machine: AVX2 and AVX-512-BF16 CPUs differ)
picks the row count up to which each is used; above it, the dequantized weight in float32, with the inputs and
outputs rounded to bfloat16 as the kernels round them (the same quantized model; the two differ only in the
order of float32 accumulation). A limit of 0 means the plain float32 path everywhere. Our int8 panel kernel runs
at every row count: no limit.

w8a8 (`W8A8Linear`): int8 weights as int8's, against activations quantized to int8 as each product starts, per row
and block of 32 inputs (llama.cpp's Q8 activations, which its Q4_1 products use too), by our panel kernel: each
block's sum is an exact integer, so the kernel is free to use VPDPBUSD (AVX512-VNNI: 64 products per instruction,
no widening) and its cost grows less with the rows of a verify step; nothing is rounded to bfloat16. The price is
the activations' rounding: top-1 agreement with fp32 96.2% on 8 held-out prompts, 95.3% on 16 (int8: 96.1% on
1,040 positions; one scale per row instead of per block: 87.7%), and greedy output leaves fp32's sooner.

The other weight format here, bf16 (`Bf16Linear`): each weight rounded to bfloat16 once and packed by oneDNN,
the same bf16 rounding of the products' inputs and outputs, and everything else in float32 as above. On CPUs
with AVX512-BF16 its cost hardly grows with the row count, which is what verify steps need (the int8 kernel's
grows 2-2.7x from 1 to 7 rows). A bf16 copy of an int8 model's weights would not be the same model (w_int8 x
scale needs up to 15 significant bits; power-of-two scales, which would make it exact, cost top-1 agreement
with fp32: 94.2% vs 96.1% on 1,040 held-out positions), so the two formats stay separate.
"""
from __future__ import annotations

import itertools
import logging

import torch
import torch.nn.functional as F
from torch import Tensor

from idlm.models.llama import CausalLM, PackedLinear, Proj
from idlm.models.panel import Int8Panels, PanelLoRA, W8A8Panels
from idlm.models.timing import copies_beyond_cache, interleaved_medians, on_copies

log = logging.getLogger("idlm")
ROW_CANDIDATES = (1, 2, 4, 8, 16, 32, 64)
KERNEL_DTYPE = torch.bfloat16  # the quantized kernels' activation dtype
EXACT_TOP = 8  # logits recomputed exactly per row (Products.exact_top)
GROUP = 32  # int4: inputs per scale and zero (GGUF's Q4 blocks)
FORMATS = ("int8", "int4", "w8a8")  # quantize_model's weight formats


def _bf16_at_least(x: Tensor) -> Tensor:
    """x (float32) rounded to a bfloat16 value >= x, as float32."""
    r = x.to(KERNEL_DTYPE)
    return torch.where(r.float() < x, torch.nextafter(r, torch.full_like(r, float("inf"))), r).float()


def quantize_int8(w: Tensor) -> tuple[Tensor, Tensor]:
    """(w_int8 [N, K], scales [N] float32): symmetric per output channel, w ~ w_int8 * scales, scales from each
    channel's largest |w| rounded up to a bfloat16 value (the int8 kernel takes bf16 scales, so the model is
    exactly what it computes). (Choosing each channel's clip ratio for the least squared error changed top-1
    agreement with fp32 on 1,040 held-out positions only from 95.6% to 95.8%: not kept.)"""
    w = w.float()
    scales = _bf16_at_least(w.abs().amax(1).clamp_min(1e-12) / 127.0)
    return torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8), scales


def quantize_int4(w: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(codes [N, K] int32 in 0..15, scales [N, K/GROUP], zeros [N, K/GROUP], both bfloat16 values in float32):
    per group of GROUP inputs, w ~ (codes - 8) * scale + zero with scale = (max - min) / 15 rounded up to a bf16
    value and zero = min + 8 * scale rounded to bf16, the codes chosen for the rounded grid. On weights
    dequantized from GGUF Q4_1 (each block's min and max are on its grid) this returns their codes."""
    n, k = w.shape
    g = w.float().view(n, k // GROUP, GROUP)
    lo, hi = g.amin(-1), g.amax(-1)
    scales = _bf16_at_least(((hi - lo) / 15).clamp_min(1e-12))
    zeros = (lo + 8 * scales).to(KERNEL_DTYPE).float()
    codes = torch.round((g - zeros[..., None]) / scales[..., None] + 8).clamp(0, 15).to(torch.int32)
    return codes.view(n, k), scales, zeros


def dequantize_int4(codes: Tensor, scales: Tensor, zeros: Tensor) -> Tensor:
    n, k = codes.shape
    g = (codes.view(n, k // GROUP, GROUP).float() - 8) * scales[..., None] + zeros[..., None]
    return g.view(n, k)


class Products:
    """The frame the weight formats share: x's rows cast to `input_dtype` (bfloat16: the kernels' activations), the
    subclass's `product` of them, the result returned in x's dtype, plus the bias.

    `weight`: the model the product computes, as a [N, K] tensor in the model's dtype (what anything reading the
    projection's weight sees). `exact_top` (the LM head of formats whose products are rounded to bfloat16, whose
    step is 0.125 at a logit of 16, so close candidates would tie or swap by rounding alone): the `exact_top`
    largest outputs of each row are recomputed from the same bf16 inputs and `weight` in x's dtype (a k-row gather
    and a small product), so the argmax and the near-top probabilities are those of the rounded model, not of its
    rounding."""

    weight: Tensor
    bias: Tensor | None
    exact_top: int
    input_dtype: torch.dtype = KERNEL_DTYPE

    def product(self, xb: Tensor, row_limit: int | None = None) -> Tensor:
        """[rows, K] `input_dtype` -> [rows, N] (bfloat16 values, as bfloat16 or float32, where the kernels round
        their outputs; w8a8's float32); `row_limit` overrides a quantized format's own."""
        raise NotImplementedError

    def __call__(self, x: Tensor, row_limit: int | None = None) -> Tensor:
        rows, k = x.numel() // x.shape[-1], x.shape[-1]
        xb = x.reshape(rows, k).to(self.input_dtype)
        y = self.product(xb, row_limit).to(x.dtype)
        if self.exact_top:
            top = y.topk(self.exact_top, dim=-1).indices  # [rows, k]
            exact = torch.bmm(self.weight[top], xb.to(self.weight.dtype)[:, :, None])[..., 0]
            y = y.scatter(-1, top, exact.to(y.dtype))
        y = y.view(*x.shape[:-1], self.weight.shape[0])
        return y if self.bias is None else y + self.bias


class QuantizedLinear(Products):
    """x @ w.T (+ bias) with a quantized weight: the subclass's `kernel` up to `row_limit` rows, the dequantized
    weight (oneDNN-packed where possible) above it; x and the result keep x's dtype."""

    format: str  # the name row limits are recorded under
    traceable = True  # compiled graphs trace it (models/compile.py): its tensors are plain, its kernels aten ops

    def __init__(self, dequantized: Tensor, bias: Tensor | None, row_limit: int, exact_top: int):
        self.weight = dequantized
        self.bias = bias
        self.row_limit = row_limit
        self.exact_top = exact_top
        try:
            self.dense = PackedLinear(self.weight) if dequantized.device.type == "cpu" else None
        except RuntimeError:
            self.dense = None

    def kernel(self, xb: Tensor) -> Tensor:
        """[rows, K] bfloat16 -> [rows, N] bfloat16 values (as bfloat16, or float32) by the quantized kernel."""
        raise NotImplementedError

    def product(self, xb: Tensor, row_limit: int | None = None) -> Tensor:
        if xb.shape[0] <= (self.row_limit if row_limit is None else row_limit):
            return self.kernel(xb)
        xd = xb.to(self.weight.dtype)
        onednn = self.dense is not None and not torch.compiler.is_compiling()  # its packed weight is opaque there
        return (self.dense(xd) if onednn else F.linear(xd, self.weight)).to(KERNEL_DTYPE)


class Int8Linear(QuantizedLinear):
    """int8 weight per output channel (`quantize_int8`) by `aten._weight_int8pack_mm` up to the row limit."""

    format = "int8"

    def __init__(self, weight: Tensor, bias: Tensor | None, row_limit: int, exact_top: int = 0):
        self.q, scales = quantize_int8(weight)
        self.scales = scales.to(KERNEL_DTYPE)  # exact: quantize_int8 picks bf16 values
        super().__init__((self.q.float() * scales[:, None]).to(weight.dtype), bias, row_limit, exact_top)

    def kernel(self, xb: Tensor) -> Tensor:
        return torch.ops.aten._weight_int8pack_mm(xb, self.q, self.scales)


class Int8PanelLinear(Products):
    """int8 weight per output channel (`quantize_int8`): the same quantized model as `Int8Linear`, bf16 inputs and
    bf16-rounded outputs alike, by our panel kernel (models/panel.py `Int8Panels`, which must be loaded) at every
    row count, with no dense path above a row limit: a row's output is the same bit for bit whatever rows share
    the step (a 7-row verify step and a 1-row AR step, a batch and a lone request, a prefill chunk of any length),
    so greedy R-ISD gives AR's tokens exactly. On this project's AVX-512 EPYC the kernel took 0.33-0.38x the dense
    float32 product's time at 7 rows and 0.49-0.67x from 64 to 512 rows (docs/benchmarks.md)."""

    traceable = True  # compiled graphs trace it (models/compile.py): one operator on plain tensors
    panels_kind: type = Int8Panels

    def __init__(self, weight: Tensor, bias: Tensor | None, exact_top: int = 0):
        q, scales = quantize_int8(weight)
        self.panels = self.panels_kind(q, scales)
        self.weight = (q.float() * scales[:, None]).to(weight.dtype)
        self.bias = bias
        self.exact_top = exact_top

    def product(self, xb: Tensor, row_limit: int | None = None) -> Tensor:  # noqa: ARG002 (one path)
        return self.panels.product(xb)  # bfloat16 values in float32


class W8A8Linear(Int8PanelLinear):
    """int8 weight per output channel (`quantize_int8`) against int8 activations, quantized per row and block of 32
    inputs as each product starts (llama.cpp's Q8 activations), by our panel kernel (models/panel.py `W8A8Panels`,
    which must be loaded) at every row count: each block's sum is exact in int32, so a row's output does not depend
    on the rows beside it, nor on the instructions (AVX512-VNNI or AVX2); the blocks add up in float32, nothing is
    rounded to bfloat16 (so no exact top logits either). No dense path for long prefill chunks: on this project's
    AVX-512 VNNI CPU the kernel beats oneDNN's float32 product 1.8-2.9x from 32 to 512 rows (docs/benchmarks.md),
    and a dense path would make a row's output depend on the chunk it is in."""

    input_dtype = torch.float32
    panels_kind = W8A8Panels

    def fused(self, x: Tensor, delta: PanelLoRA, rows: Tensor | None) -> Tensor:
        """x @ w.T (+ bias) + a float32 adapter's delta on `rows` in one call (models/panel.py `PanelLinear.fused`):
        the same bits as the call followed by `delta(y, x, rows)`."""
        return self.panels.product(x, self.bias, delta, rows)


class Int4Linear(QuantizedLinear):
    """int4 weight per group of GROUP inputs (`quantize_int4`), `aten._weight_int4pack_mm_for_cpu`."""

    format = "int4"

    def __init__(self, weight: Tensor, bias: Tensor | None, row_limit: int, exact_top: int = 0):
        if not self.fits(weight):
            raise ValueError(f"int4 needs out features % 16 == 0 and in features % {GROUP} == 0, got "
                             f"{tuple(weight.shape)}")
        codes, scales, zeros = quantize_int4(weight)
        self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 2)  # [N, K/2] uint8
        self.scales_zeros = torch.stack([scales, zeros], -1).transpose(0, 1).contiguous().to(KERNEL_DTYPE)  # exact
        super().__init__(dequantize_int4(codes, scales, zeros).to(weight.dtype), bias, row_limit, exact_top)

    @staticmethod
    def fits(weight: Tensor) -> bool:
        return weight.shape[0] % 16 == 0 and weight.shape[1] % GROUP == 0

    def kernel(self, xb: Tensor) -> Tensor:
        return torch.ops.aten._weight_int4pack_mm_for_cpu(xb, self.packed, GROUP, self.scales_zeros)


class Bf16Linear(Products):
    """x @ w.T (+ bias) with the weight rounded to bfloat16 once and packed by oneDNN. On CPUs with AVX512-BF16 (or
    AMX) the product reads half of fp32's bytes and its cost hardly grows with the row count (measured here: 1 to 7
    rows +3% to +14%, where the int8 kernel pays 2-2.7x), so a verify step costs about what an AR step costs.
    Raises RuntimeError where oneDNN cannot pack bfloat16."""

    def __init__(self, weight: Tensor, bias: Tensor | None, exact_top: int = 0):
        self.weight = weight.to(KERNEL_DTYPE).to(weight.dtype)  # the rounded model, in the weight's dtype
        self.packed = PackedLinear(weight.to(KERNEL_DTYPE))
        self.bias = bias
        self.exact_top = exact_top

    def product(self, xb: Tensor, row_limit: int | None = None) -> Tensor:  # noqa: ARG002 (one path)
        return self.packed(xb)


def measure_row_limit(kind: type[QuantizedLinear], in_features: int, out_features: int,
                      dtype: torch.dtype = torch.float32, repeats: int = 20) -> int:
    """The largest row count (of ROW_CANDIDATES) up to which `kind`'s kernel beats the dense
    path on this machine for a [rows, in] x [in, out] projection with `dtype` activations (0: never). Interleaved,
    median of `repeats`, casts included, each call on a weight copy out of cache."""
    w = torch.randn(out_features, in_features).to(dtype)
    lins = [kind(w, None, 0) for _ in range(copies_beyond_cache(w.numel() * w.element_size()))]
    limit, shared = 0, itertools.cycle(lins)  # both paths on the same copies, never one the call before read
    with torch.inference_mode():
        for m in ROW_CANDIDATES:
            x = torch.randn(m, in_features, dtype=dtype)
            t = interleaved_medians({"kernel": on_copies(shared, lambda lin, x=x: lin(x, row_limit=1 << 30)),
                                     "dense": on_copies(shared, lambda lin, x=x: lin(x, row_limit=0))}, repeats)
            if t["kernel"] >= t["dense"]:
                break
            limit = m
    return limit


def _require_frozen_cpu(model: CausalLM, fmt: str) -> None:
    w = model.model.embed_tokens.weight
    if w.device.type != "cpu" or w.requires_grad:
        raise ValueError(f"{fmt} weights are for frozen inference on CPU (got a model on {w.device.type}"
                         f"{', trainable' if w.requires_grad else ''})")


def quantize_model(model: CausalLM, fmt: str = "int8", row_limit: int | None = None,
                   known: dict[str, int] | None = None, panel: bool = False) -> dict[str, int]:
    """Give every projection and the LM head of a frozen CPU model a quantized kernel (the embedding lookup keeps
    the exact weight): `fmt` "int8" gives every one an `Int8Linear` (with `panel`: an `Int8PanelLinear`, our
    panel kernel, models/panel.py, loaded); "int4" gives the projections the int4 kernel can take an `Int4Linear`
    and the rest and the LM head int8's; "w8a8" gives every one a `W8A8Linear` (which runs on the panel kernels:
    `panel` must be True). The row limit of each aten kernel and weight shape is measured on this machine (the
    crossover differs by shape: measured here 4 rows for int8 gate/up, 7 for down, 4 for the LM head) unless
    `row_limit` fixes one for all or `known` has it from an earlier measurement; the panel kernels run at every
    row count and have none. Returns {"format out x in": limit}. Call after fusing and before
    `pack_for_cpu_inference`, which leaves kernels in place."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown weight format {fmt!r}; choose one of {', '.join(FORMATS)}")
    _require_frozen_cpu(model, fmt)
    if fmt == "w8a8" and not panel:
        raise ValueError("w8a8 products run on the panel kernels (models/panel.py): load them and pass panel=True")
    limits: dict[str, int] = {}
    known = known or {}

    def kernel_for(weight: Tensor, bias: Tensor | None, exact_top: int = 0) -> Products:
        if fmt == "w8a8":  # one kernel at every row count: no limit to measure
            return W8A8Linear(weight, bias)
        kind = Int4Linear if fmt == "int4" and not exact_top and Int4Linear.fits(weight) else Int8Linear
        if kind is Int8Linear and panel:  # likewise
            return Int8PanelLinear(weight, bias, exact_top)
        key = f"{kind.format} {weight.shape[0]}x{weight.shape[1]}"
        if key not in limits:
            limits[key] = row_limit if row_limit is not None else known[key] if key in known else \
                measure_row_limit(kind, weight.shape[1], weight.shape[0], weight.dtype)
        return kind(weight, bias, limits[key], exact_top)

    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, Proj):
                m.kernel = kernel_for(m.weight, m.bias)
                m.weight.data = m.kernel.weight  # what anything reading the weight sees is the quantized model
        model.head_kernel = kernel_for(model.output_weight(), None, exact_top=EXACT_TOP)
    log.info("%s (%s): each kernel runs products of up to these row counts (measured), larger ones the "
             "dequantized weight: %s", fmt, torch.backends.cpu.get_cpu_capability(), limits)
    return limits


def bf16_weights(model: CausalLM) -> None:
    """Give every projection and the LM head of a frozen CPU model a `Bf16Linear` kernel (the embedding lookup
    keeps the exact weight). Raises ValueError where this CPU cannot run oneDNN's bfloat16 product."""
    _require_frozen_cpu(model, "bf16")
    try:
        with torch.no_grad():
            kernels = {m: Bf16Linear(m.weight, m.bias) for m in model.modules() if isinstance(m, Proj)}
            head = Bf16Linear(model.output_weight(), None, exact_top=EXACT_TOP)
    except RuntimeError as e:
        raise ValueError(f"bf16 weights need oneDNN's bfloat16 product, which this CPU lacks "
                         f"({torch.backends.cpu.get_cpu_capability()}): {e}") from e
    for m, k in kernels.items():
        m.kernel = k
        m.weight.data = k.weight  # what anything reading the weight sees is the rounded model
    model.head_kernel = head
