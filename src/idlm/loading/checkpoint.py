"""A loaded checkpoint: native model, tokenizer, EOS ids and generation defaults."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from idlm.config import ModelConfig, UnsupportedModelError
from idlm.loading.errors import ModelLoadError
from idlm.loading.hf_dir import load_weights, read_config, read_generation_config
from idlm.loading.resolve import resolve_model
from idlm.loading.tokenizer import eos_token_ids, load_tokenizer
from idlm.models.llama import CausalLM, build_model


@dataclass
class Checkpoint:
    """Everything the engine and trainer need from a model: weights in the native forward, tokenizer, EOS ids."""

    name: str
    path: Path
    config: ModelConfig
    model: CausalLM
    tokenizer: PreTrainedTokenizerBase
    eos_token_ids: list[int]
    generation_config: dict[str, Any]
    default_adapter: Path | None


def model_config(hf_config: dict[str, Any], hf_dir: Path) -> ModelConfig:
    """ModelConfig from a config.json dict, with errors as ModelLoadError."""
    try:
        return ModelConfig.from_hf(hf_config)
    except UnsupportedModelError as e:
        raise ModelLoadError(f"{e}: {hf_dir}") from e
    except KeyError as e:
        raise ModelLoadError(f"config.json lacks {e.args[0]!r}: {hf_dir}") from e


def build_native(
    cfg: ModelConfig, state: dict[str, torch.Tensor], dtype: torch.dtype, device: str | torch.device, hf_dir: Path
) -> CausalLM:
    """Native model from HF-named weights; missing, misshapen or unused weights are errors."""
    try:
        model = build_model(cfg, state, dtype, device)
    except (KeyError, ValueError) as e:
        raise ModelLoadError(f"{e.args[0]}: {hf_dir}") from e
    used = set(dict(model.named_parameters()))
    ignorable = {"lm_head.weight"} if cfg.tie_word_embeddings else set()
    unused = [k for k in state if k not in used and k not in ignorable and not k.endswith("rotary_emb.inv_freq")]
    if unused:
        raise ModelLoadError(
            f"checkpoint has {len(unused)} weights the native {cfg.family} model does not use, e.g. {unused[:3]}: {hf_dir}"
        )
    return model


def load_checkpoint(name_or_path: str, dtype: torch.dtype, device: str | torch.device) -> Checkpoint:
    """Resolve, then load config, tokenizer and weights into the native model (no remote code, no network)."""
    resolved = resolve_model(name_or_path)
    hf_dir = resolved.hf_dir
    hf_config = read_config(hf_dir)
    cfg = model_config(hf_config, hf_dir)
    tokenizer = load_tokenizer(hf_dir, hf_config, cfg.family)
    generation_config = read_generation_config(hf_dir)
    model = build_native(cfg, load_weights(hf_dir), dtype, device, hf_dir)
    return Checkpoint(
        name=resolved.name,
        path=hf_dir,
        config=cfg,
        model=model,
        tokenizer=tokenizer,
        eos_token_ids=eos_token_ids(generation_config, tokenizer),
        generation_config=generation_config,
        default_adapter=resolved.default_adapter,
    )
