"""Read an HF checkpoint directory: config.json, generation_config.json and safetensors weights.

Weights come from `model.safetensors` or from `model.safetensors.index.json` plus its shards. Official
I-DLM checkpoints (`SDARForCausalLM`) use the Qwen3 weight names unchanged (`model.layers.N.self_attn.q_norm.weight`,
`lm_head.weight`, ... as in their modeling_sdar.py), so no renaming is needed.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from idlm.loading.errors import ModelLoadError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"cannot read {path.name} ({e}): {path}") from e


def read_config(hf_dir: Path) -> dict[str, Any]:
    """The parsed config.json of `hf_dir`."""
    path = hf_dir / "config.json"
    if not path.is_file():
        raise ModelLoadError(f"no config.json in {hf_dir}")
    return _read_json(path)


def read_generation_config(hf_dir: Path) -> dict[str, Any]:
    """The parsed generation_config.json of `hf_dir`, or {} when there is none."""
    path = hf_dir / "generation_config.json"
    return _read_json(path) if path.is_file() else {}


def weight_files(hf_dir: Path) -> list[Path]:
    """The safetensors files holding the weights of `hf_dir` (one file, or the shards its index lists)."""
    if (hf_dir / SINGLE_FILE).is_file():
        return [hf_dir / SINGLE_FILE]
    if (hf_dir / INDEX_FILE).is_file():
        weight_map = _read_json(hf_dir / INDEX_FILE).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ModelLoadError(f"{INDEX_FILE} has no weight_map: {hf_dir / INDEX_FILE}")
        return [hf_dir / name for name in sorted(set(weight_map.values()))]
    raise ModelLoadError(f"no weights ({SINGLE_FILE} or {INDEX_FILE}) in {hf_dir}")


def load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of one safetensors file, on CPU (memory-mapped read)."""
    if not path.is_file():
        raise ModelLoadError(f"weight file listed in {INDEX_FILE} is missing: {path}")
    try:
        return load_file(path)
    except (SafetensorError, OSError) as e:
        raise ModelLoadError(f"corrupt or truncated weight file ({e}): {path}") from e


def load_weights(hf_dir: Path) -> dict[str, torch.Tensor]:
    """Every weight of `hf_dir`, HF-named, in the dtype it was stored in."""
    state: dict[str, torch.Tensor] = {}
    for path in weight_files(hf_dir):
        state.update(load_safetensors(path))
    return state
