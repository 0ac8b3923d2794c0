"""The paged KV pool: per-layer k/v tensors of shape [num_blocks, block_size, kv_heads, head_dim].

Only the model runner holds it; which sequence owns which kv block is the block manager's business
(engine/block_manager.py), as plain integers.
"""
from __future__ import annotations

import torch

from idlm.config import ModelConfig


class KVCache:
    def __init__(self, cfg: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype, device):
        shape = (num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_layers)]
        self.num_blocks = num_blocks
        self.block_size = block_size

    @staticmethod
    def bytes_per_block(cfg: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
        elem = torch.finfo(dtype).bits // 8
        return 2 * cfg.num_layers * block_size * cfg.num_kv_heads * cfg.head_dim * elem
