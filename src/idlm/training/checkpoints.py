"""Training checkpoints and exports: `step-NNNNNNN` directories under `<output_dir>/checkpoints` with a
`latest` pointer (each published atomically; the newest `keep` kept), RNG states per rank, and the export
of a fully fine-tuned model as an HF-layout directory (adapters are written by models/lora.py)."""
from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from idlm.atomic_dir import publish, publish_dir

LATEST = "latest"
STATE = "state.pt"


def rng_state() -> dict[str, Any]:
    import numpy as np

    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def set_rng_state(s: dict[str, Any]) -> None:
    import numpy as np

    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    torch.set_rng_state(s["torch"])
    if s.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


class Checkpoints:
    """Saving: the main rank `stage`s a directory, every rank writes its `rng_file` there, the main rank
    `publish`es it with the state. Loading: `latest()`, `load()`, `restore_rng()`."""

    def __init__(self, root: Path, keep: int):
        self.root = Path(root)
        self.keep = max(1, keep)

    def latest(self) -> Path | None:
        f = self.root / LATEST
        if not f.is_file():
            return None
        p = self.root / f.read_text().strip()
        return p if (p / STATE).is_file() else None

    def path(self, step: int) -> Path:
        """Where step `step`'s checkpoint is published."""
        return self.root / f"step-{step:07d}"

    def staged(self, step: int) -> Path:
        """Where step `step` is built (the same path on every rank)."""
        return self.root / f".step-{step:07d}.partial"

    def stage(self, step: int) -> Path:
        tmp = self.staged(step)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        return tmp

    @staticmethod
    def rng_file(directory: Path, rank: int) -> Path:
        return directory / f"rng-{rank}.pt"

    def publish(self, step: int, state: dict[str, Any]) -> Path:
        """Write the state into the staged directory, rename it into place, point `latest` at it, prune."""
        final = self.path(step)
        name = final.name
        tmp = self.staged(step)
        torch.save(state, tmp / STATE)
        publish(tmp, final)
        pointer = self.root / f".{LATEST}.tmp"
        pointer.write_text(name)
        os.replace(pointer, self.root / LATEST)
        old = sorted(p for p in self.root.glob("step-*") if p.is_dir() and p.name != name)
        for p in old[: max(0, len(old) - (self.keep - 1))]:
            shutil.rmtree(p, ignore_errors=True)
        return final

    def load(self) -> tuple[dict[str, Any], Path] | None:
        path = self.latest()
        if path is None:
            return None
        return torch.load(path / STATE, map_location="cpu", weights_only=False), path

    def restore_rng(self, path: Path, rank: int) -> None:
        f = self.rng_file(path, rank)
        if f.is_file():
            set_rng_state(torch.load(f, map_location="cpu", weights_only=False))


def export_full_model(
    state: dict[str, torch.Tensor], mask_token_id: int, hf_config: dict[str, Any], tokenizer: Any, draft_len: int,
    path: Path, dtype: torch.dtype,
) -> None:
    """Write an HF-layout model dir from the model's full named parameters: config.json with `mask_token_id`
    and `block_size` (the draft length, under the key official I-DLM checkpoints use), model.safetensors,
    tokenizer files. A MASK outside the vocabulary keeps its id (= vocab_size) and is stored as the extra
    tensor `mask_embedding` (what CausalLM.load_hf_state_dict restores); the vocabulary is unchanged."""
    state = {n: t.to(dtype).cpu().contiguous() for n, t in state.items()}
    cfg = dict(hf_config)
    cfg["mask_token_id"] = mask_token_id
    cfg["block_size"] = draft_len
    cfg["torch_dtype"] = cfg["dtype"] = str(dtype).replace("torch.", "")

    def build(tmp: Path) -> None:
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))

    publish_dir(Path(path), build)

