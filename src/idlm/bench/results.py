"""Writing benchmark results: one JSON and one markdown file per run, stamped with time and device."""
from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

from idlm.engine.machine_cache import machine_key


def write_results(result: dict[str, Any], out: Path, kind: str, markdown: str) -> Path:
    """Write `<kind>-<device>-<UTC stamp>.json` and `.md` under `out`; print the table; return the JSON path."""
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    base = out / f"{kind}-{result['machine']['device']}-{stamp}"
    base.with_suffix(".json").write_text(json.dumps(result, indent=2))
    base.with_suffix(".md").write_text(markdown)
    print(markdown)
    print(f"wrote {base}.json and .md", file=sys.stderr)
    return base.with_suffix(".json")


def machine_info(device: str) -> dict[str, Any]:
    """The machine a figure was measured on, with the CPU capability that picks the kernels."""
    key = machine_key()
    info = {"platform": platform.platform(), "cpu": key["cpu"], "cpu_capability": key["capability"],
            "cores": os.cpu_count(), "torch_threads": key["threads"], "torch": key["torch"],
            "python": platform.python_version(), "device": device}
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
    return info
