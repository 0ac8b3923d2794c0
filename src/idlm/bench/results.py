"""Writing benchmark results: one JSON and one markdown file per run, stamped with time and device."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any


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
