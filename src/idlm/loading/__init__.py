"""Loaders: local HF directories (single or sharded safetensors), official I-DLM directories, GGUF files and the
embedded default model, all resolved to an HF directory and loaded into the native model."""
from idlm.loading.cache import cache_dir
from idlm.loading.checkpoint import Checkpoint, load_checkpoint
from idlm.loading.errors import ModelLoadError
from idlm.loading.gguf import convert_gguf
from idlm.loading.registry import default_adapter_path, known_models
from idlm.loading.resolve import ResolvedModel, cached_models, resolve_model

__all__ = [
    "Checkpoint",
    "ModelLoadError",
    "ResolvedModel",
    "cache_dir",
    "cached_models",
    "convert_gguf",
    "default_adapter_path",
    "known_models",
    "load_checkpoint",
    "resolve_model",
]
