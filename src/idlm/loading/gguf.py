"""GGUF -> HF directory, through transformers' GGUF reader (dequantized to float32)."""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from idlm.atomic_dir import publish_dir
from idlm.loading.cache import cache_dir
from idlm.loading.errors import ModelLoadError

GENERATION_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")


def _write_hf_dir(gguf_path: Path, out: Path) -> None:
    """Write config.json, model.safetensors, tokenizer files and generation_config.json for `gguf_path` into `out`."""
    kwargs = {"gguf_file": gguf_path.name, "local_files_only": True}
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, dtype=torch.float32, **kwargs)
    except Exception as e:  # transformers/gguf raise many types for unreadable or unsupported files
        raise ModelLoadError(f"cannot read GGUF file ({e}): {gguf_path}") from e

    config = model.config.to_dict()
    config.pop("quantization_config", None)  # the weights we write are plain float32
    config.pop("_name_or_path", None)
    config["architectures"] = [type(model).__name__]
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")

    tied = bool(config.get("tie_word_embeddings"))
    state = {k: v.contiguous() for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")}
    save_file(state, out / "model.safetensors", metadata={"format": "pt"})

    tokenizer.save_pretrained(out)
    generation = {k: getattr(model.generation_config, k, None) for k in GENERATION_KEYS}
    generation = {k: v if v is not None else getattr(tokenizer, k) for k, v in generation.items()}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")


def convert_gguf(gguf_path: Path, out_dir: Path) -> Path:
    """Convert a GGUF file into a complete HF directory at `out_dir` (which must not exist yet); returns it.

    The directory is built next to `out_dir` and renamed into place, so a failed, interrupted or concurrent
    conversion never leaves a partial directory at `out_dir`.
    """
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if not gguf_path.is_file():
        raise ModelLoadError(f"GGUF file not found: {gguf_path}")
    if out_dir.exists():
        raise ModelLoadError(f"conversion destination already exists: {out_dir}")
    return publish_dir(out_dir, lambda tmp: _write_hf_dir(gguf_path, tmp), replace=False)


def cached_conversion(gguf_path: Path, dest: Path) -> Path:
    """`dest` if it already holds the conversion of `gguf_path`, else convert into it (noting so on stderr)."""
    if dest.is_dir():
        return dest
    print(f"idlm: converting {gguf_path.name} into {dest} (once; takes about a minute)", file=sys.stderr, flush=True)
    try:
        return convert_gguf(gguf_path, dest)
    except ModelLoadError:
        if dest.is_dir():  # another process finished the same conversion first
            return dest
        raise


def gguf_cache_path(gguf_path: Path) -> Path:
    """Cache directory for a user-supplied GGUF file, keyed by its name, size and modification time."""
    st = gguf_path.stat()
    key = hashlib.sha256(f"{gguf_path.name}\0{st.st_size}\0{st.st_mtime_ns}".encode()).hexdigest()[:12]
    return cache_dir() / "gguf" / f"{gguf_path.stem}-{key}"
