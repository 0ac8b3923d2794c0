"""Where converted models live, and how a directory is published there atomically."""
from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def cache_dir() -> Path:
    """Root of idlm's cache: `$IDLM_CACHE`, else `~/.cache/idlm`."""
    return Path(os.environ.get("IDLM_CACHE") or Path.home() / ".cache" / "idlm").expanduser()


def build_dir_atomically(dest: Path, build: Callable[[Path], None]) -> Path:
    """Run `build(tmp)` in a fresh directory next to `dest`, then rename it to `dest`.

    A build that raises (or a process that dies) never leaves anything at `dest`. When another process
    published `dest` first, its directory is kept and ours is discarded.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".partial", dir=dest.parent))
    try:
        build(tmp)
        os.chmod(tmp, 0o755)
        try:
            os.rename(tmp, dest)
        except OSError:
            if not dest.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest
