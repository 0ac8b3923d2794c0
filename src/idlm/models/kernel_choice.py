"""Which kernels a model's products get on this machine: our panel kernels (models/panel.py) or the library's.

`panel_is_faster` times both on the model's own weight shapes at the row counts of decode steps (1: AR; 7: an
R-ISD stride 4 verify step), each call on a weight copy out of cache, interleaved, medians: float32 weights against
oneDNN's packed product (as float32 values, or, format "gguf", float32 values that are GGUF Q4_1 blocks, which
the panel kernels read as their codes: models/block_codes.py), int8 ones against `aten._weight_int8pack_mm`. The
panel kernels are chosen where they are faster at every row count (the caller keeps the answer per machine:
engine/llm.py).
"""
from __future__ import annotations

import itertools
from collections.abc import Callable

import torch
from torch import Tensor

from idlm.models.block_codes import random_blocks
from idlm.models.llama import PackedLinear
from idlm.models.panel import PanelLinear
from idlm.models.quantize import Int8Linear, Int8PanelLinear
from idlm.models.timing import copies_beyond_cache, interleaved_medians, on_copies

FORMATS = ("fp32", "gguf", "int8")  # what a model's panel-eligible products hold


def _kernels(fmt: str, w: Tensor) -> dict[str, Callable[[], Callable[[Tensor], Tensor]]]:
    """Constructors of the library's kernel and ours for a weight in `fmt`."""
    if fmt in ("fp32", "gguf"):
        return {"library": lambda: PackedLinear(w), "panel": lambda: PanelLinear(w)}
    return {"library": lambda: Int8Linear(w, None, 1 << 30), "panel": lambda: Int8PanelLinear(w, None)}


def panel_is_faster(shapes: list[tuple[int, int]], fmt: str, rows: tuple[int, ...] = (1, 7),
                    repeats: int = 15) -> dict:
    """{"panel": bool, "rows": {rows: [library seconds, panel seconds] summed over the [out, in] shapes}}."""
    if fmt not in FORMATS:
        raise ValueError(f"panel kernels take {', '.join(FORMATS)} weights, not {fmt!r}")
    sums = {m: [0.0, 0.0] for m in rows}
    with torch.inference_mode():
        for out_features, in_features in sorted(set(shapes)):
            w = random_blocks(out_features, in_features) if fmt == "gguf" else torch.randn(out_features, in_features)
            copies = copies_beyond_cache(int(w.numel() * {"fp32": 4, "gguf": 0.625, "int8": 1}[fmt]))
            kernels = {name: [make() for _ in range(copies)] for name, make in _kernels(fmt, w).items()}
            for m in rows:
                x = torch.randn(m, in_features)
                t = interleaved_medians({name: on_copies(itertools.cycle(ks), lambda k, x=x: k(x))
                                         for name, ks in kernels.items()}, repeats)
                sums[m][0] += t["library"]
                sums[m][1] += t["panel"]
    rows = {m: [round(lib, 9), round(p, 9)] for m, (lib, p) in sums.items()}  # the choice is what the record shows
    return {"panel": all(p < lib for lib, p in rows.values()), "rows": rows}
