"""Products for few-row steps on AVX2 CPUs: our own kernels (panel.cpp), built on first use.

A decode step multiplies 1-8 rows by every weight of the model. oneDNN's packed float32 product pays a fixed cost
per call and grows with the rows of a verify step; aten's int8 kernel (bf16 inputs) is compute-bound at one row on
AVX2. The panel kernels pack each weight into panels of 16 output columns ([panel][K][16]); one call streams every
panel once and runs all the rows against it in register blocks of 4 rows x 16 columns. Weights are float32
(`PanelLinear`) or int8 per output channel, widened in registers (`Int8Panels`, inside models/quantize.py's
`Int8Linear`). Every row is summed in the same order whatever the row count, so a row's output does not depend on
the rows beside it (an AR step and a verify step compute it bit for bit alike). Measured against the library's
kernels: docs/benchmarks.md, "Our panel kernels"; which a model uses is measured per machine
(models/kernel_choice.py).

The kernels are C++ with AVX2 and FMA intrinsics, built by `torch.utils.cpp_extension` with the compiler that
compiled steps already need, once per torch version (about 30 s; the build directory is the caller's). They
register the operators `idlm_panel::pack`, `idlm_panel::linear` and `idlm_panel::linear_int8`, which compiled graphs
call directly. Where they cannot be built or run (no compiler, a CPU without AVX2), `available` says why and the
library's kernels stay.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from idlm.models.llama import PackedLinear


log = logging.getLogger("idlm")
SOURCE = Path(__file__).with_name("panel.cpp")
CAPABILITIES = ("AVX2", "AVX512")
ROW_LIMIT = 8  # PanelLinear: rows up to which the kernel runs a float32 product (above: oneDNN)  # ATen's names for CPUs with AVX2 and FMA (AVX512 ones have both)
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
        load("idlm_panel", [str(SOURCE)], extra_cflags=["-O3", "-mavx2", "-mfma", "-fopenmp"],
             extra_ldflags=["-fopenmp"], build_directory=str(build_dir) if build_dir else None,
             is_python_module=False, verbose=False)
    except Exception as e:  # no compiler, no headers, a failed build: the oneDNN path still works
        return f"the panel kernel did not build ({type(e).__name__}: {str(e).strip().splitlines()[-1:]})"
    torch.library.register_fake("idlm_panel::linear")(_linear_shape)
    torch.library.register_fake("idlm_panel::linear_int8")(_linear_int8_shape)
    return None


def _linear_shape(x: Tensor, panels: Tensor, out_features: int, bias: Tensor | None) -> Tensor:  # noqa: ARG001
    return x.new_empty(*x.shape[:-1], out_features)


def _linear_int8_shape(x: Tensor, panels: Tensor, scales: Tensor, out_features: int,  # noqa: ARG001
                       bias: Tensor | None) -> Tensor:  # noqa: ARG001
    return x.new_empty(*x.shape[:-1], out_features)


class PanelLinear:
    """x @ w.T (+ bias) in float32 by the panel kernel up to `row_limit` rows (`available()` must have returned
    None), above it by oneDNN's packed product (compiled graphs: F.linear, the packed weight being opaque there):
    with register blocks of 4 rows the kernel is latency-bound on its 8 accumulators once a call has many row
    blocks per panel, and oneDNN's blocking wins from about 16 rows (`bench kernels` on a 2-core AVX2 EPYC: gate/up
    at 16 rows 959 vs 628 us). The default limit keeps every decode step of one request (AR 1 row, R-ISD stride 4
    up to 7) on the kernel, prefill chunks and large batches on oneDNN, at the cost of a second packed copy of the
    weights. Plain tensors and one operator: compiled graphs trace it (models/compile.py)."""

    traceable = True

    def __init__(self, weight: Tensor, bias: Tensor | None = None, row_limit: int = ROW_LIMIT):
        with torch.no_grad():
            self.panels = torch.ops.idlm_panel.pack(weight.float())
        self.weight, self.bias, self.row_limit = weight, bias, row_limit
        self.out_features = weight.shape[0]
        try:
            self.dense = PackedLinear(weight, bias)
        except RuntimeError:  # no oneDNN for this dtype or device
            self.dense = None

    def __call__(self, x: Tensor, row_limit: int | None = None) -> Tensor:
        if x.numel() // x.shape[-1] <= (self.row_limit if row_limit is None else row_limit):
            return torch.ops.idlm_panel.linear(x, self.panels, self.out_features, self.bias)
        if self.dense is not None and not torch.compiler.is_compiling():
            return self.dense(x)
        return F.linear(x, self.weight, self.bias)


class Int8Panels:
    """An int8 weight per output channel (w ~ q * scales) in panels: `product(x)` = (x @ q.T) * scales, x float32,
    summed in float32 (models/quantize.py `Int8Linear` rounds its inputs and output to bfloat16 around it)."""

    def __init__(self, q: Tensor, scales: Tensor):
        self.panels = torch.ops.idlm_panel.pack(q)
        self.scales = torch.nn.functional.pad(scales.float(), (0, self.panels.shape[0] * 16 - q.shape[0]))
        self.out_features = q.shape[0]

    def product(self, x: Tensor) -> Tensor:
        return torch.ops.idlm_panel.linear_int8(x, self.panels, self.scales, self.out_features, None)
