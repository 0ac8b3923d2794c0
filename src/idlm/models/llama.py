"""Native decoder for the Llama family: Llama, Qwen2 (qkv bias), Qwen3 (q/k RMSNorm), SmolLM2.

One forward serves both worlds:
- serving: token rows flattened to [T], attending through a paged KV cache (`attention.PagedAttention`);
- training: [B, L] sequences with an explicit boolean mask and no cache (`attention.DenseAttention`).

Every projection takes an optional per-row `lora_gate` so that a (gated) LoRA adapter can act on
chosen rows only (see `models/lora.py`); the base projections ignore it.
"""
from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from idlm.config import ModelConfig
from idlm.models.attention import AttentionBackend


LORA_OFF = object()
"""Pass as `lora_gate` to run the base model alone (adapter deltas skipped, not computed)."""


@dataclass(frozen=True)
class RowGate:
    """The flattened row indices where adapter deltas apply (gate 1); other rows get exactly the base output.

    `span` = (start, stop) when the rows are one contiguous range (a single R-ISD request's MASK rows):
    adapters then slice instead of gathering and scattering, which halves the adapter's cost per step.
    """

    rows: torch.Tensor
    span: tuple[int, int] | None = None

    @classmethod
    def from_mask(cls, gate: torch.Tensor) -> "RowGate | object":
        """From a 0/1 gate tensor; LORA_OFF when no row is gated."""
        rows = gate.reshape(-1).nonzero().squeeze(-1)
        n = rows.numel()
        if not n:
            return LORA_OFF
        first, last = int(rows[0]), int(rows[-1])
        return cls(rows, (first, last + 1) if last - first + 1 == n else None)


# oneDNN keeps one primitive per product shape (each row count: a server sees hundreds) in a cache of 1,024 by
# default, about 0.2-0.6 MB each here: RSS grew 200-300 MB over a soak's first 2,000 requests. 256 still holds
# every shape of a step at a few dozen row counts, and a miss costs about 0.5 ms per shape (the env var wins).
ONEDNN_PRIMITIVE_CACHE_CAPACITY = "256"


class PackedLinear:
    """x @ w.T (+ bias) by oneDNN with the weight packed once: for frozen CPU inference, where oneDNN keeps
    few-row products (AR and ISD steps) near the cost of one row and the default BLAS path pays up to 2x at 4-7
    rows. Raises RuntimeError where oneDNN cannot pack the dtype (bf16 needs AVX512-BF16 / AVX-NE-CONVERT)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        with torch.no_grad():
            self.weight = torch.ops.mkldnn._reorder_linear_weight(weight, None)
        self.bias = bias

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")


class Proj(nn.Linear):
    """nn.Linear whose forward accepts (and ignores) a LoRA gate; LoRA wrappers replace it.

    `kernel`: an optional frozen-inference product replacing F.linear, bias included: a `PackedLinear`
    (`CausalLM.pack_for_cpu_inference`) or an int8 one (models/quantize.py).
    """

    kernel: Callable[[torch.Tensor], torch.Tensor] | None = None

    def base(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel is not None:
            return self.kernel(x)
        return F.linear(x, self.weight, self.bias)

    def forward(self, x: torch.Tensor, lora_gate: torch.Tensor | None = None) -> torch.Tensor:  # noqa: ARG002
        return self.base(x)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """Inverse RoPE frequencies, with llama3-style scaling when the config asks for it."""
    dim = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float64, device="cpu") / dim))
    sc = cfg.rope_scaling
    if sc:
        factor = float(sc["factor"])
        low = float(sc.get("low_freq_factor", 1.0))
        high = float(sc.get("high_freq_factor", 4.0))
        old_ctx = float(sc.get("original_max_position_embeddings", 8192))
        low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > low_wavelen, inv / factor, inv)
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv = torch.where(medium, smoothed, scaled)
    return inv.float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE (HF layout). x: [..., heads, head_dim]; cos/sin: [..., head_dim]."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    rotated = torch.cat((-x2, x1), dim=-1)
    return x * cos.unsqueeze(-2) + rotated * sin.unsqueeze(-2)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_proj = Proj(cfg.hidden_size, cfg.num_heads * cfg.head_dim, bias=cfg.attention_bias)
        self.k_proj = Proj(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=cfg.attention_bias)
        self.v_proj = Proj(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=cfg.attention_bias)
        self.o_proj = Proj(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=False)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.qkv: Proj | None = None  # q, k, v in one projection (inference; models/fuse.py)

    def forward(self, x, cos, sin, attn: AttentionBackend, lora_gate):
        lead = x.shape[:-1]
        if self.qkv is not None:
            q, k, v = self.qkv(x, lora_gate).split([self.n_heads * self.head_dim] + [self.n_kv * self.head_dim] * 2, -1)
        else:
            q, k, v = self.q_proj(x, lora_gate), self.k_proj(x, lora_gate), self.v_proj(x, lora_gate)
        q = q.reshape(*lead, self.n_heads, self.head_dim)
        k = k.reshape(*lead, self.n_kv, self.head_dim)
        v = v.reshape(*lead, self.n_kv, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = attn.attend(self.layer_idx, q, k, v)  # [..., heads, head_dim]
        return self.o_proj(out.reshape(*lead, self.n_heads * self.head_dim), lora_gate)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = Proj(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = Proj(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = Proj(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self.gate_up: Proj | None = None  # gate and up in one projection (inference; models/fuse.py)

    def forward(self, x, lora_gate):
        if self.gate_up is not None:
            gate, up = self.gate_up(x, lora_gate).chunk(2, -1)
        else:
            gate, up = self.gate_proj(x, lora_gate), self.up_proj(x, lora_gate)
        return self.down_proj(F.silu(gate) * up, lora_gate)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, attn, lora_gate):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, attn, lora_gate)
        return x + self.mlp(self.post_attention_layernorm(x), lora_gate)


class Backbone(nn.Module):
    """`model.*` of an HF checkpoint: embeddings, layers, final norm."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class CausalLM(nn.Module):
    """Decoder-only LM with HF parameter names (`model.layers.N.self_attn.q_proj.weight`, `lm_head.weight`).

    MASK handling: when the checkpoint has no `mask_token_id`, the MASK id is `vocab_size` and its input
    embedding is the extra parameter `mask_embedding`; the output head keeps `vocab_size` rows, so MASK is
    never produced as output.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = Backbone(cfg)
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.mask_embedding: nn.Parameter | None = None
        self.head_kernel: Callable[[torch.Tensor], torch.Tensor] | None = None  # frozen inference, like Proj.kernel
        self._inv_freq = rope_inv_freq(cfg)  # float32 always; not a buffer so dtype casts leave it alone

    # ---- MASK token -------------------------------------------------------------------------
    @property
    def mask_token_id(self) -> int:
        """The checkpoint's MASK id, else `vocab_size` (an extra input-only embedding)."""
        return self.config.mask_token_id if self.config.mask_token_id is not None else self.config.vocab_size

    def init_mask_embedding(self, value: torch.Tensor | None = None) -> None:
        """Create the extra MASK input embedding (default: the mean token embedding) if MASK is outside the vocab."""
        if self.mask_token_id < self.config.vocab_size or (self.mask_embedding is not None and value is None):
            return
        w = self.model.embed_tokens.weight
        init = w.detach().float().mean(0) if value is None else value.detach().float()
        self.mask_embedding = nn.Parameter(init.to(device=w.device, dtype=w.dtype))

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        w = self.model.embed_tokens.weight
        if self.mask_embedding is None:
            return F.embedding(input_ids, w)
        is_mask = input_ids == self.mask_token_id
        emb = F.embedding(input_ids.masked_fill(is_mask, 0), w)
        return torch.where(is_mask.unsqueeze(-1), self.mask_embedding.to(emb.dtype), emb)

    # ---- forward ------------------------------------------------------------------------------
    def rope(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        if self._inv_freq.device != positions.device:
            self._inv_freq = self._inv_freq.to(positions.device)
        freqs = positions.float().unsqueeze(-1) * self._inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        attn: AttentionBackend,
        lora_gate: torch.Tensor | None | object = None,
    ) -> torch.Tensor:
        """Final-norm hidden states, same leading shape as `input_ids` ([T] paged or [B, L] dense).

        `lora_gate` (same leading shape, 0/1): adapter deltas only where 1 (computed for those rows alone);
        None = adapters on every row; LORA_OFF = base model only.
        """
        x = self.embed(input_ids)
        cos, sin = self.rope(positions, x.dtype)
        gate = lora_gate
        if isinstance(lora_gate, torch.Tensor):
            gate = RowGate.from_mask(lora_gate)
        for layer in self.model.layers:
            x = layer(x, cos, sin, attn, gate)
        return self.model.norm(x)

    def pack_for_cpu_inference(self, kind: Callable[..., Callable[[torch.Tensor], torch.Tensor]] | None = None) -> bool:
        """Give every frozen projection without a kernel (and the LM head) a oneDNN-packed one (CPU, float32 /
        bfloat16), or one of `kind` (`kind(weight, bias)`, e.g. models/panel.py's `PanelLinear`). Weights must not
        change afterwards (training never calls this). Returns False where oneDNN is unavailable."""
        w = self.model.embed_tokens.weight
        if w.device.type != "cpu" or w.requires_grad or (kind is None and not torch.backends.mkldnn.is_available()):
            return False
        if kind is None:
            os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", ONEDNN_PRIMITIVE_CACHE_CAPACITY)  # read at first use
            kind = PackedLinear
        projs = [m for m in self.modules() if isinstance(m, Proj) and m.kernel is None]
        try:
            kernels = [kind(m.weight, m.bias) for m in projs]
            head = self.head_kernel or kind(self.output_weight())
        except RuntimeError:  # e.g. bf16 packing on a CPU without bf16 support; keep the plain path
            return False
        for m, k in zip(projs, kernels):
            m.kernel = k
        self.head_kernel = head
        return True

    def output_weight(self) -> torch.Tensor:
        return self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits over the real vocabulary for the given hidden rows; MASK can never be produced."""
        if self.head_kernel is not None and not hidden.requires_grad:
            out = self.head_kernel(hidden)
        else:
            out = F.linear(hidden, self.output_weight())
        if self.mask_token_id < self.config.vocab_size:  # MASK inside the vocab (official checkpoints)
            out = out.index_fill(-1, torch.tensor([self.mask_token_id], device=out.device), float("-inf"))
        return out

    # ---- weights ------------------------------------------------------------------------------
    def load_hf_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load HF-named weights, checking that every parameter is present with the right shape."""
        if "mask_embedding" in state and self.mask_embedding is None:
            self.init_mask_embedding(state["mask_embedding"])  # a full conversion with MASK outside the vocab
        own = dict(self.named_parameters())
        if "mask_embedding" not in state:
            own.pop("mask_embedding", None)
        missing = [k for k in own if k not in state]
        if missing:
            raise KeyError(f"checkpoint lacks {len(missing)} weights, e.g. {missing[:3]}")
        with torch.no_grad():
            for name, p in own.items():
                t = state[name]
                if tuple(t.shape) != tuple(p.shape):
                    raise ValueError(f"weight {name} has shape {tuple(t.shape)}, expected {tuple(p.shape)}")
                p.copy_(t.to(p.dtype))


def build_model(
    cfg: ModelConfig, state: dict[str, torch.Tensor], dtype: torch.dtype, device: str | torch.device
) -> CausalLM:
    """Instantiate without random init, load weights, switch to eval."""
    with torch.device("meta"):
        model = CausalLM(cfg)
    model = model.to_empty(device=device).to(dtype)
    model.load_hf_state_dict(state)
    return model.eval().requires_grad_(False)
