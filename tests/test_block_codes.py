"""models/block_codes.py: the codes of float32 weights that are GGUF Q4_1 / Q8_0 blocks dequantized (by the gguf
library's own quantizer and dequantizer), which rebuild every value bit for bit; any other weight has none."""
from __future__ import annotations

import pytest
import torch
from gguf import GGMLQuantizationType, quants

from idlm.models.block_codes import BLOCK, codes, random_blocks


def gguf_values(w: torch.Tensor, kind: GGMLQuantizationType) -> torch.Tensor:
    """w quantized to `kind` blocks and dequantized (float32), as loading/gguf.py's conversion makes a checkpoint."""
    return torch.from_numpy(quants.dequantize(quants.quantize(w.numpy(), kind), kind).copy())


def rebuilt(c) -> torch.Tensor:
    q, d = c.q.float().unflatten(1, (-1, BLOCK)), c.d.float().unsqueeze(-1)
    value = q * d + c.m.float().unsqueeze(-1) if c.m is not None else q * d
    return value.flatten(1)


@pytest.mark.parametrize("kind", [GGMLQuantizationType.Q4_1, GGMLQuantizationType.Q8_0])
@pytest.mark.parametrize("scale", [1.0, 1e-3, 300.0])
def test_gguf_blocks_are_found_and_rebuilt_bit_for_bit(kind, scale):
    w = gguf_values(torch.randn(70, 4 * BLOCK, generator=torch.Generator().manual_seed(3)) * scale, kind)
    w[5, :BLOCK] = 0.25  # a block of one value (scale 0)
    w = gguf_values(w, kind)
    c = codes(w)
    assert c is not None and (c.m is not None) == (kind == GGMLQuantizationType.Q4_1)
    assert c.q.dtype == torch.int8 and c.q.shape == w.shape and c.d.dtype == torch.float16 and c.d.shape == (70, 4)
    lo, hi = (0, 15) if c.m is not None else (-127, 127)
    assert int(c.q.min()) >= lo and int(c.q.max()) <= hi
    assert torch.equal(rebuilt(c), w)


def test_other_weights_have_no_codes():
    g = torch.Generator().manual_seed(0)
    w = gguf_values(torch.randn(16, 2 * BLOCK, generator=g), GGMLQuantizationType.Q4_1)
    assert codes(w) is not None
    off = w.clone()
    off[3, 40] = torch.nextafter(off[3, 40], torch.tensor(1e9))  # one value an ulp away from every code
    assert codes(off) is None
    assert codes(torch.randn(16, 2 * BLOCK, generator=g)) is None  # plain float32
    assert codes(w[:, :BLOCK + 8]) is None  # inputs not whole blocks
    assert codes(w.double()) is None and codes(w[0]) is None


@pytest.mark.parametrize("kind", ["q4_1", "q8_0"])
def test_random_blocks_have_their_codes(kind):
    w = random_blocks(40, 3 * BLOCK, kind)
    c = codes(w)
    assert w.shape == (40, 3 * BLOCK) and c is not None and (c.m is not None) == (kind == "q4_1")
    assert torch.equal(rebuilt(c), w)
    with pytest.raises(ValueError, match="q4_1 or q8_0"):
        random_blocks(4, BLOCK, "q5_0")
