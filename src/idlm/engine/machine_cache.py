"""What was measured on this machine, kept in $IDLM_CACHE under a key naming the machine.

`machine_key()` names the CPU, its kernel capability, the thread count and torch; a measurement's key adds
what else it depends on (model, dtype, layouts...). Each record is one JSON file `<kind>/<digest of key>.json`
holding the key itself (a digest collision or an edited file is a miss, not a wrong answer), written
atomically so that concurrent start-ups never read half a file.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
from pathlib import Path
from typing import Any

import torch


def machine_key() -> dict[str, Any]:
    cpu = platform.processor()
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                   if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "capability": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads(),
            "torch": torch.__version__}


def record_path(root: Path, kind: str, key: dict[str, Any]) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return root / kind / f"{digest}.json"


def load_record(root: Path, kind: str, key: dict[str, Any]) -> Any | None:
    """The value stored under `key`, or None."""
    p = record_path(root, kind, key)
    try:
        d = json.loads(p.read_text())
    except (OSError, ValueError):
        return None
    return d.get("value") if isinstance(d, dict) and d.get("key") == key else None


def save_record(root: Path, kind: str, key: dict[str, Any], value: Any) -> Path:
    p = record_path(root, kind, key)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps({"key": key, "value": value}, indent=1))
    os.replace(tmp, p)
    return p
