"""Turn what the user typed (directory, .gguf file or known name) into a local HF directory."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from idlm.loading.cache import cache_dir
from idlm.loading.errors import ModelLoadError
from idlm.loading.gguf import cached_conversion, gguf_cache_path
from idlm.loading.registry import KNOWN_MODELS, default_adapter_path, embedded_gguf, known_models


@dataclass(frozen=True)
class ResolvedModel:
    """A local HF directory to load, under the name the user knows it by."""

    name: str
    hf_dir: Path
    default_adapter: Path | None


def resolve_model(name_or_path: str) -> ResolvedModel:
    """Local path first (HF directory, or .gguf converted once into the cache), then known model names."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return ResolvedModel(path.resolve().name, path, None)
    if path.is_file() and path.suffix == ".gguf":
        return ResolvedModel(path.stem, cached_conversion(path, gguf_cache_path(path)), None)
    model = KNOWN_MODELS.get(name_or_path)
    if model is None:
        raise ModelLoadError(
            f"model not found: {name_or_path} (not a directory, .gguf file or known model name;"
            f" known: {', '.join(known_models())})"
        )
    dest = cache_dir() / "models" / model.name
    hf_dir = dest if dest.is_dir() else cached_conversion(embedded_gguf(model), dest)
    return ResolvedModel(model.name, hf_dir, default_adapter_path(model.name))


def cached_models() -> list[tuple[str, Path]]:
    """(name, directory) of every converted model in the cache."""
    root = cache_dir()
    found = [d for kind in ("models", "gguf") if (root / kind).is_dir() for d in (root / kind).iterdir()]
    return sorted((d.name, d) for d in found if not d.name.startswith(".") and (d / "config.json").is_file())
