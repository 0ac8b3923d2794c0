"""Where converted models live."""
from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """Root of idlm's cache: `$IDLM_CACHE`, else `~/.cache/idlm`."""
    return Path(os.environ.get("IDLM_CACHE") or Path.home() / ".cache" / "idlm").expanduser()
