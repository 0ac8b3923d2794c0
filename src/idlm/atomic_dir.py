"""Publishing a directory atomically: it is built in a fresh sibling and renamed into place, so a reader
never sees a partial directory and a crash leaves at most a hidden `.NAME.*.partial` behind."""
from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def staging_dir(dest: Path) -> Path:
    """A fresh, empty, hidden sibling of `dest` to build into."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".partial", dir=dest.parent))
    os.chmod(tmp, 0o755)
    return tmp


def publish(tmp: Path, dest: Path, replace: bool = True) -> Path:
    """Rename the built `tmp` to `dest`. An existing `dest` is swapped out and deleted (`replace`), or kept
    and `tmp` discarded (not `replace`: another process published the same thing first)."""
    if dest.exists() and not replace:
        shutil.rmtree(tmp, ignore_errors=True)
        return dest
    old = None
    if dest.exists():
        old = dest.with_name(f".{dest.name}.{os.getpid()}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(dest, old)
    try:
        os.rename(tmp, dest)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not dest.is_dir():  # not a lost race with another publisher
            raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return dest


def publish_dir(dest: Path, build: Callable[[Path], None], replace: bool = True) -> Path:
    """Run `build(tmp)` in a staging directory, then `publish` it; a build that raises leaves nothing."""
    tmp = staging_dir(dest)
    try:
        build(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return publish(tmp, dest, replace)
