"""Float32 weights that are exactly GGUF blocks dequantized: their codes, for the panel kernels' block-coded panels.

A checkpoint converted from a GGUF file (loading/gguf.py) holds `d * q + m` (Q4_1: per 32 inputs of a row a float16
scale d and offset m, 4-bit codes q) and `d * q` (Q8_0: 8-bit signed q) made float32; the embedded model's layers are
Q4_1 and its embedding (the tied LM head) Q8_0. `codes(w)` finds d, m and q again where every block rebuilds w bit for
bit, so the kernels read 0.625 or 1.06 bytes a weight instead of 4 and compute the float32 weight's own products
(models/panel.cpp, "block-coded float32 weights"). d * q is exact in float32, so the rebuilt value needs no rounding
but the one of adding m, which is the dequantization's own.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

BLOCK = 32  # inputs per scale


class Codes(NamedTuple):
    q: Tensor  # int8 [out, in]
    d: Tensor  # float16 [out, in / 32]
    m: Tensor | None  # float16 [out, in / 32] (Q4_1), None (Q8_0)


def codes(w: Tensor) -> Codes | None:
    """The Q4_1 or Q8_0 codes that rebuild the float32 weight w [out, in] bit for bit, or None."""
    if w.dim() != 2 or w.dtype != torch.float32 or w.shape[1] % BLOCK or not w.numel():
        return None
    with torch.no_grad():
        blocks = w.reshape(w.shape[0], -1, BLOCK)
        return _q4_1(blocks) or _q8_0(blocks)


def _rebuilt(blocks: Tensor, d: Tensor, m: Tensor | None, lo: int, hi: int) -> tuple[Tensor, Tensor]:
    """The nearest codes for scales d (and offsets m), and which blocks they rebuild exactly."""
    df = d.float()
    base = blocks - m if m is not None else blocks
    q = torch.where(df > 0, base / df, torch.zeros_like(base)).round_().clamp_(lo, hi)
    value = q * df + m if m is not None else q * df
    return q, (value == blocks).all(-1, keepdim=True)


def _nearby_scales(blocks: Tensor, d: Tensor, m: Tensor, lo: int, hi: int) -> tuple[Tensor, Tensor] | None:
    """Q4_1 codes and scales for every block: the estimated float16 scale, else its float16 neighbours (the
    quantizer's float32 scale was rounded to float16, so the estimate can miss by an ulp); None if a block fails."""
    q, ok = _rebuilt(blocks, d, m, lo, hi)
    for step in (1, -1, 2, -2):
        if bool(ok.all()):
            return q, d
        bad = ~ok.squeeze(-1)
        near = (d[bad].view(torch.int16) + step).clamp_(min=0).view(torch.float16)
        q_near, ok_near = _rebuilt(blocks[bad], near, m[bad], lo, hi)
        fixed = ok_near.squeeze(-1)
        idx = bad.nonzero(as_tuple=True)
        sel = tuple(i[fixed] for i in idx)
        q[sel], d[sel], ok[sel] = q_near[fixed], near[fixed], True
    return (q, d) if bool(ok.all()) else None


def _q4_1(blocks: Tensor) -> Codes | None:
    m = blocks.amin(-1, keepdim=True)
    if not torch.equal(m.half().float(), m):
        return None
    d = ((blocks.amax(-1, keepdim=True) - m) / 15).half()  # the largest value has code 15
    found = _nearby_scales(blocks, d, m, 0, 15)
    if found is None:
        return None
    q, d = found
    return Codes(q.to(torch.int8).flatten(1), d.flatten(1), m.half().flatten(1))


def _q8_0(blocks: Tensor) -> Codes | None:
    # the largest magnitude has code +-127 and 127 d is exact, so it is 127 d and the scale is found exactly (a
    # weight that is not Q8_0 stops here, before any codes are tried)
    scale = blocks.abs().amax(-1, keepdim=True) / 127
    d = scale.half()
    if not torch.equal(d.float(), scale):
        return None
    q, ok = _rebuilt(blocks, d, None, -127, 127)
    return Codes(q.to(torch.int8).flatten(1), d.flatten(1), None) if bool(ok.all()) else None


def random_blocks(out_features: int, in_features: int, kind: str = "q4_1") -> Tensor:
    """A random float32 weight [out, in] of GGUF `kind` blocks ("q4_1" or "q8_0"), as a converted checkpoint holds
    them (each block's least and largest codes present, as the quantizer makes them): what measurements of the
    block-coded panels run on."""
    blocks = (out_features, in_features // BLOCK, 1)
    d = (torch.rand(blocks) / 100).half().float()
    if kind == "q4_1":
        q = torch.randint(0, 16, (*blocks[:2], BLOCK)).float()
        q[..., 0], q[..., 1] = 0, 15
        return (q * d - (torch.rand(blocks) / 10).half().float()).reshape(out_features, -1)
    if kind == "q8_0":
        q = torch.randint(-127, 128, (*blocks[:2], BLOCK)).float()
        q[..., 0] = 127
        return (q * d).reshape(out_features, -1)
    raise ValueError(f"unknown GGUF block kind {kind!r}; choose q4_1 or q8_0")
