"""Float32 products for few-row steps on AVX2 CPUs: our own kernel (panel.cpp), built on first use.

A decode step multiplies 1-8 rows by every weight of the model. oneDNN's packed float32 product (`PackedLinear`)
pays a fixed cost per call and, at 4-8 rows, splits the rows over its register blocks so that the weights are read
more than once. `PanelLinear` packs each weight into panels of 16 output columns ([panel][K][16]); one call streams
every panel once and runs all the rows against it in register blocks of 4 rows x 16 columns. Measured on a 2-core
AVX2 EPYC, each weight out of cache (docs/benchmarks.md): 0.6-0.8x oneDNN's time at 1 and 7 rows for every
projection of the embedded model and the LM head, and no slower up to 256 rows. Every row is summed in the same
order whatever the row count, so a row's output does not depend on the rows beside it (an AR step and a verify
step compute it bit for bit alike).

The kernel is C++ with AVX2 and FMA intrinsics, built by `torch.utils.cpp_extension` with the compiler that
compiled steps already need, once per torch version (about 30 s; the build directory is the caller's). It
registers the operators `idlm_panel::pack` and `idlm_panel::linear`, which compiled graphs call directly. Where it
cannot be built or run (no compiler, a CPU without AVX2), `available` says why and the oneDNN path stays.
Which of the two a model uses is measured per machine (`faster_than_onednn`).
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import Tensor


log = logging.getLogger("idlm")
SOURCE = Path(__file__).with_name("panel.cpp")
CAPABILITIES = ("AVX2", "AVX512")  # ATen's names for CPUs with AVX2 and FMA (AVX512 ones have both)
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


def ready() -> bool:
    """Whether the kernel is loaded in this process (`available()` returned None)."""
    return _state.get("error", "not loaded") is None


class PanelLinear:
    """x @ w.T (+ bias) in float32 by the panel kernel; `available()` must have returned None. Plain tensors and
    one operator: compiled graphs trace it (models/compile.py)."""

    traceable = True

    def __init__(self, weight: Tensor, bias: Tensor | None = None):
        with torch.no_grad():
            self.panels = torch.ops.idlm_panel.pack(weight.float())
        self.out_features = weight.shape[0]
        self.bias = bias

    def __call__(self, x: Tensor, row_limit: int | None = None) -> Tensor:  # noqa: ARG002 (one path)
        return torch.ops.idlm_panel.linear(x, self.panels, self.out_features, self.bias)


class Int8Panels:
    """An int8 weight per output channel (w ~ q * scales) in panels: `product(x)` = (x @ q.T) * scales, x float32,
    summed in float32 (models/quantize.py `Int8Linear` rounds its inputs and output to bfloat16 around it)."""

    def __init__(self, q: Tensor, scales: Tensor):
        self.panels = torch.ops.idlm_panel.pack(q)
        self.scales = torch.nn.functional.pad(scales.float(), (0, self.panels.shape[0] * 16 - q.shape[0]))
        self.out_features = q.shape[0]

    def product(self, x: Tensor) -> Tensor:
        return torch.ops.idlm_panel.linear_int8(x, self.panels, self.scales, self.out_features, None)
