"""Model configuration: the architecture facts the native forward needs, read from an HF config.json."""
from __future__ import annotations

from dataclasses import dataclass, asdict
from typing import Any

# HF `architectures` / `model_type` values we can run, mapped to our family name.
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "SDARForCausalLM": "qwen3",  # official I-DLM checkpoints: Qwen3 layout
}
SUPPORTED_MODEL_TYPES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "sdar": "qwen3"}


class UnsupportedModelError(ValueError):
    """The checkpoint's architecture is not one the native forward implements."""


@dataclass
class ModelConfig:
    """Decoder-only transformer shape (Llama / Qwen2 / Qwen3 / SmolLM2 family)."""

    family: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # Qwen2: bias on q/k/v projections
    qk_norm: bool = False  # Qwen3: RMSNorm on q and k per head
    mask_token_id: int | None = None  # I-DLM MASK id when the checkpoint defines one
    draft_len: int | None = None  # I-DLM draft length b = N-1 MASKs per step (HF config key `block_size`)

    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> "ModelConfig":
        """Build from an HF config.json dict; raises UnsupportedModelError for other architectures."""
        archs = d.get("architectures") or []
        family = None
        for a in archs:
            family = SUPPORTED_ARCHITECTURES.get(a)
            if family:
                break
        if family is None:
            family = SUPPORTED_MODEL_TYPES.get(str(d.get("model_type", "")).lower())
        if family is None:
            name = archs[0] if archs else d.get("model_type", "<none>")
            raise UnsupportedModelError(
                f"unsupported architecture {name!r}; supported: {', '.join(sorted(SUPPORTED_ARCHITECTURES))}"
            )
        if d.get("hidden_act", "silu") not in ("silu", "swish"):
            raise UnsupportedModelError(f"unsupported activation {d.get('hidden_act')!r} (SwiGLU with silu only)")
        heads = int(d["num_attention_heads"])
        hidden = int(d["hidden_size"])
        rope_params = d.get("rope_parameters") or {}
        rope_theta = d.get("rope_theta", rope_params.get("rope_theta", 10000.0))
        scaling = d.get("rope_scaling") or None
        if scaling is None and rope_params.get("rope_type", "default") not in ("default", None):
            scaling = dict(rope_params)
        if scaling is not None:
            kind = scaling.get("rope_type", scaling.get("type"))
            if kind in (None, "default"):
                scaling = None
            elif kind != "llama3":
                raise UnsupportedModelError(f"unsupported rope scaling {kind!r} (only llama3-style)")
        qk_norm = family == "qwen3"
        attention_bias = bool(d.get("attention_bias", family == "qwen2"))
        if family == "qwen3":
            attention_bias = bool(d.get("attention_bias", False))
        return cls(
            family=family,
            vocab_size=int(d["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(d["intermediate_size"]),
            num_layers=int(d["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(d.get("num_key_value_heads") or heads),
            head_dim=int(d.get("head_dim") or hidden // heads),
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            rope_theta=float(rope_theta),
            rope_scaling=scaling,
            max_position_embeddings=int(d.get("max_position_embeddings", 4096)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            attention_bias=attention_bias,
            qk_norm=qk_norm,
            mask_token_id=d.get("mask_token_id"),
            draft_len=d.get("block_size") if isinstance(d.get("block_size"), int) else None,
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
