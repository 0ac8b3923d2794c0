"""Products for few-row steps on AVX2 and AVX-512 CPUs: our own kernels (panel.cpp), built on first use.

A decode step multiplies 1-8 rows by every weight of the model. oneDNN's packed float32 product pays a fixed cost
per call and grows with the rows of a verify step; aten's int8 kernel (bf16 inputs) is compute-bound at one row on
AVX2. The panel kernels pack each weight into panels of 16 output columns ([panel][K][16]); one call streams every
panel once and runs all the rows against it in register blocks of R rows x P panels (AVX2: up to 3 rows x 2-4
panels, 8-12 independent sums; AVX-512, with twice the registers: up to 8 rows x 2-8 panels, so a verify step of
stride 4 widens each int8 weight once for all its 7 rows). Enough sums run side by side to hide the FMA latency even
for one row (a block of 4 rows x 1 panel, the first version, left a lone row waiting on two sums at every input:
int8 1.1x, float32 1.15-1.7x slower). Weights are float32 (`PanelLinear`; kept in bfloat16 when every value is a
bfloat16 one, as a bf16 adapter's are) or int8 per output channel, widened in registers (`Int8Panels`, inside
models/quantize.py's `Int8Linear`; bfloat16 inputs, summed over pairs of inputs, and on CPUs with AVX512-BF16
by VDPBF16PS from 2 rows on: twice an FMA's products per instruction for the compute-bound verify steps). Every row
is summed in the same order whatever the row count, the instruction and the vector width, so a row's output does
not depend on the rows beside it (an AR step and a verify step compute it bit for bit alike) nor on the machine.
Measured against the library's kernels: docs/benchmarks.md,
"Our panel kernels"; which a model uses is measured per machine (models/kernel_choice.py).

The kernels are C++ with AVX2/FMA, AVX-512, and AVX512-VNNI / AVX512-BF16 intrinsics (`build()`: chosen by the
CPU at build time), built by `torch.utils.cpp_extension` with the compiler that compiled steps already need, once per torch
version and build (about 30 s; the build directory is the caller's). They register the operators
`idlm_panel::pack`, `idlm_panel::pack_codes`, `idlm_panel::pack_pairs`, `idlm_panel::linear`, `idlm_panel::linear_int8`,
`idlm_panel::pack_w8a8`, `idlm_panel::linear_w8a8` (int8 weights against int8 activations: `W8A8Panels`; from 10
rows on AMX's tiles where the CPU has AMX-INT8, the same integer sums) and
`idlm_panel::add_lora` (a gated adapter's delta, in place), which compiled graphs call directly, and
`idlm_panel::argmax` (each row's first largest value, for greedy steps); with them, from attention.cpp,
`idlm_panel::attention` (a step's few query rows over the paged pool: models/attention.py). Where they cannot
be built or run (no compiler, a CPU without AVX2), `available` says why and the library's kernels stay.
"""
from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import torch
from torch import Tensor

from idlm.models.block_codes import codes


log = logging.getLogger("idlm")
SOURCES = (Path(__file__).with_name("panel.cpp"), Path(__file__).with_name("attention.cpp"))
HEADERS = (Path(__file__).with_name("simd.h"),)
# which kernels: part of every measurement's key
SOURCE_ID = hashlib.sha256(b"".join(f.read_bytes() for f in SOURCES + HEADERS)).hexdigest()[:12]
ISA_FLAGS = {  # by ATen's CPU capability
    "AVX2": ["-mavx2", "-mfma", "-mf16c"],
    "AVX512": ["-mavx2", "-mfma", "-mf16c", "-mavx512f"],
}
CAPABILITIES = tuple(ISA_FLAGS)
FEATURE_FLAGS = {  # AVX-512 CPUs' extensions the kernels use where the CPU has them
    "VNNI": ["-mavx512bw", "-mavx512vnni"],  # VPDPBUSD: the w8a8 products' integer sums
    "BF16": ["-mavx512bw", "-mavx512bf16"],  # VDPBF16PS: the int8 products' pair path
    "AMX": ["-mamx-tile", "-mamx-int8"],  # TDPBSUD: the w8a8 products of several rows (with VNNI)
}


def _features() -> list[str]:
    if torch.backends.cpu.get_cpu_capability() != "AVX512":
        return []
    vnni = torch.cpu._is_vnni_supported()
    has = {"VNNI": vnni, "BF16": torch.cpu._is_avx512_bf16_supported(),
           "AMX": vnni and getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()}
    return [name for name in FEATURE_FLAGS if has[name] and name not in _unbuilt]


# features whose build failed in this process (a compiler without -mamx-int8, before gcc 11): the kernels build
# without them rather than not at all
_unbuilt: set[str] = set()


def build() -> str:
    """Which build of the kernels this CPU takes: its capability and the extensions used ("AVX512+VNNI+BF16")."""
    return "+".join([torch.backends.cpu.get_cpu_capability(), *_features()])


def kernels_id() -> str:
    """Which kernels measurements are made with: the source and the build."""
    return f"{SOURCE_ID} {build()}"

_state: dict[str, str | None] = {}  # "error": None once loaded, else why not


def available(build_dir: Path | None = None) -> str | None:
    """Load (building if needed) the kernel into this process. Returns None when it is ready, else why not."""
    if "error" not in _state:
        _state["error"] = _load(build_dir)
        if _state["error"]:
            log.info("float32 products stay on oneDNN: %s", _state["error"])
    return _state["error"]


def _load(build_dir: Path | None) -> str | None:
    capability = torch.backends.cpu.get_cpu_capability()
    if capability not in CAPABILITIES:
        return f"the panel kernel needs AVX2 and FMA (this CPU: {capability})"
    try:
        from torch.utils.cpp_extension import load
        if build_dir is not None:
            build_dir.mkdir(parents=True, exist_ok=True)
        while True:
            name = build()
            flags = ISA_FLAGS[capability] + sorted({f for feature in _features() for f in FEATURE_FLAGS[feature]})
            try:  # the source in the name: checkouts of different kernels never share (and rebuild over) a directory
                load(f"idlm_panel_{name.lower().replace('+', '_')}_{SOURCE_ID}", [str(f) for f in SOURCES],
                     extra_cflags=["-O3", *flags, "-fopenmp"], extra_ldflags=["-fopenmp"],
                     build_directory=str(build_dir) if build_dir else None,
                     is_python_module=False, verbose=False)
                break
            except Exception:
                if "AMX" not in _features():
                    raise
                log.info("the panel kernels did not build with AMX; building them without it")
                _unbuilt.add("AMX")
    except Exception as e:  # no compiler, no headers, a failed build: the oneDNN path still works
        return f"the panel kernel did not build ({type(e).__name__}: {str(e).strip().splitlines()[-1:]})"
    torch.library.register_fake("idlm_panel::linear")(_linear_shape)
    torch.library.register_fake("idlm_panel::linear_int8")(_linear_int8_shape)
    torch.library.register_fake("idlm_panel::linear_w8a8")(_linear_shape_w8a8)
    torch.library.register_fake("idlm_panel::add_lora")(_add_lora_shape)
    torch.library.register_fake("idlm_panel::attention")(_attention_shape)
    return None


def _linear_shape(x: Tensor, panels: Tensor, out_features: int, bias: Tensor | None,  # noqa: ARG001
                  lora_a: Tensor | None, lora_rank: int, lora_b: list[Tensor], lora_blocks: list[int],  # noqa: ARG001
                  lora_rows: Tensor | None) -> Tensor:  # noqa: ARG001
    return x.new_empty(*x.shape[:-1], out_features)


def _linear_int8_shape(x: Tensor, panels: Tensor, pairs: Tensor | None, scales: Tensor,  # noqa: ARG001
                       out_features: int, bias: Tensor | None) -> Tensor:  # noqa: ARG001
    return x.new_empty(*x.shape[:-1], out_features, dtype=torch.float32)


def _linear_shape_w8a8(x: Tensor, panels: Tensor, scales: Tensor, out_features: int,  # noqa: ARG001
                       bias: Tensor | None, lora_a: Tensor | None, lora_rank: int,  # noqa: ARG001
                       lora_b: list[Tensor], lora_blocks: list[int], lora_rows: Tensor | None) -> Tensor:  # noqa: ARG001
    return x.new_empty(*x.shape[:-1], out_features)


def _attention_shape(q: Tensor, k_pool: Tensor, v_pool: Tensor, tables: Tensor, mask: Tensor) -> Tensor:  # noqa: ARG001
    return torch.empty_like(q, memory_format=torch.contiguous_format)


def _add_lora_shape(y: Tensor, x: Tensor, a_panels: Tensor, rank: int, b_panels: list[Tensor],  # noqa: ARG001
                    blocks: list[int], rows: Tensor | None) -> None:  # noqa: ARG001
    return None


NO_DELTA = (None, 0, [], [], None)  # the adapter operands of a product without one (`PanelLoRA.operands`)


class PanelLinear:
    """x @ w.T (+ bias) in float32 by the panel kernel at every row count (`available()` must have returned None);
    a weight that is GGUF Q4_1 or Q8_0 blocks made float32 is kept as those blocks (models/block_codes.py; the
    embedded model's every weight: 0.625 and 1.06 bytes a weight), one whose every value is a bfloat16 one in
    bfloat16, both rebuilt in registers: the same sums as the float32 weight's from fewer bytes.
    Against oneDNN's packed product on a 2-core AVX2 EPYC (docs/benchmarks.md): 0.66-0.85x its time at 1 row, 0.75-0.86x
    at 7, still ahead at 32 rows, within 8% either way at 256 (prefill chunks), so no oneDNN copy of the weights is
    kept beside the panels. Plain tensors and one operator: compiled graphs trace it (models/compile.py)."""

    traceable = True

    def __init__(self, weight: Tensor, bias: Tensor | None = None, read_codes: bool = True):
        with torch.no_grad():
            w = weight.float()
            found = codes(w) if read_codes else None  # GGUF blocks made float32 are read as their codes
            if found:
                self.panels = torch.ops.idlm_panel.pack_codes(*found)
            else:  # a weight bfloat16 holds exactly (a bf16 adapter's) is read at half the bytes
                bf16 = w.bfloat16()
                self.panels = torch.ops.idlm_panel.pack(bf16 if torch.equal(bf16.float(), w) else w)
        self.bias, self.out_features = bias, weight.shape[0]

    def __call__(self, x: Tensor) -> Tensor:
        return torch.ops.idlm_panel.linear(x, self.panels, self.out_features, self.bias, *NO_DELTA)

    def fused(self, x: Tensor, delta: "PanelLoRA", rows: Tensor | None) -> Tensor:
        """x @ w.T (+ bias) + the adapter's delta on `rows`, in one operator call: the same bits as the product
        followed by `delta(y, x, rows)`."""
        return torch.ops.idlm_panel.linear(x, self.panels, self.out_features, self.bias, *delta.operands(rows))


class PanelLoRA:
    """A frozen adapter's delta by the panel kernels: `(y, x, rows)` adds (x[rows] @ scaled_a.T) @ b.T to y[rows] in
    place (every row when rows is None), gather, two products and scatter in one operator call; or, given to a
    panel product (`PanelLinear.fused`, `W8A8Panels.product`), inside that product's call. `blocks` (models/lora.py
    `LoRAProj.blocks`): b's nonzero blocks, the only ones kept and multiplied (a fused group's b is block-diagonal:
    0.5-0.67x the work). Its sums are two `PanelLinear` products', so the delta is theirs bit for bit (up to the sign
    of a zero)."""

    def __init__(self, scaled_a: Tensor, b: Tensor, blocks: list[tuple[int, int, int, int]] | None = None):
        self.a = PanelLinear(scaled_a, read_codes=False)  # the delta's products take float or bfloat16 panels
        blocks = blocks or [(0, b.shape[0], 0, b.shape[1])]
        self.b = [PanelLinear(b[r0:r1, c0:c1], read_codes=False) for r0, r1, c0, c1 in blocks]
        self.blocks = [n for r0, r1, c0, _ in blocks for n in (r0, r1 - r0, c0)]

    def operands(self, rows: Tensor | None) -> tuple:
        """The adapter's arguments of the panel operators: A's panels, the rank, B's blocks' panels, their places."""
        return self.a.panels, self.a.out_features, [b.panels for b in self.b], self.blocks, rows

    def __call__(self, y: Tensor, x: Tensor, rows: Tensor | None) -> None:
        torch.ops.idlm_panel.add_lora(y, x, *self.operands(rows))


def argmax(x: Tensor) -> Tensor:
    """x.argmax(-1), by the kernels' `idlm_panel::argmax` where they are loaded and x is float32 on the CPU (the LM
    head's greedy choice: aten's reduction costs 70 us a row of 49,152 logits here, docs/benchmarks.md)."""
    if _state.get("error", "not loaded") is None and x.dtype == torch.float32 and x.device.type == "cpu":
        return torch.ops.idlm_panel.argmax(x)
    return x.argmax(-1)


def _padded_to_panels(scales: Tensor, panels: Tensor) -> Tensor:
    """Per-output-channel scales as the int8 kernels read them: float32, zero-padded to 16 per panel."""
    return torch.nn.functional.pad(scales.float(), (0, panels.shape[0] * 16 - scales.shape[0]))


class Int8Panels:
    """An int8 weight per output channel (w ~ q * scales) in panels: `product(xb)` = (xb @ q.T) * scales, xb bfloat16,
    summed in float32 over pairs of inputs and rounded to bfloat16 values, returned in float32 (so a float32
    consumer, such as an adapter's in-place delta, needs no cast of its own). On
    AVX512-BF16 CPUs a second copy of the weight laid out for VDPBF16PS serves products of 2 rows or more (verify
    steps: 0.6-0.7x the FMAs' time at 7 rows); its sums are the FMAs' bit for bit, so a row's output still does not
    depend on the rows beside it, nor on the machine."""

    def __init__(self, q: Tensor, scales: Tensor):
        self.panels = torch.ops.idlm_panel.pack(q)
        self.pairs = torch.ops.idlm_panel.pack_pairs(q) if "BF16" in _features() else None
        self.scales = _padded_to_panels(scales, self.panels)
        self.out_features = q.shape[0]

    def product(self, xb: Tensor) -> Tensor:
        return torch.ops.idlm_panel.linear_int8(xb, self.panels, self.pairs, self.scales, self.out_features, None)


class W8A8Panels:
    """An int8 weight per output channel (w ~ q * scales) against int8 activations: `product(x)` quantizes each row
    of x (float32) per block of 32 inputs (scale max |x| / 127, round to nearest even) and sums each block exactly in
    int32 (VPDPBUSD on AVX512-VNNI, VPMADDUBSW on AVX2), the blocks in float32 in order: a row's output is the same
    bit for bit whatever rows share the call, whichever build runs it."""

    def __init__(self, q: Tensor, scales: Tensor):
        self.panels = torch.ops.idlm_panel.pack_w8a8(q)
        self.scales = _padded_to_panels(scales, self.panels)
        self.out_features = q.shape[0]

    def product(self, x: Tensor, bias: Tensor | None = None, delta: PanelLoRA | None = None,
                rows: Tensor | None = None) -> Tensor:
        """x @ w.T (+ bias) (+ an adapter's delta on `rows`, as `PanelLinear.fused` adds it)."""
        adapter = delta.operands(rows) if delta is not None else NO_DELTA
        return torch.ops.idlm_panel.linear_w8a8(x, self.panels, self.scales, self.out_features, bias, *adapter)
