"""Package data located by path without importing the package; a missing one names its install command."""
from __future__ import annotations


import pytest

from idlm.package_files import PackageFileError, package_dir, package_file


def test_found_by_path_without_import_and_missing_is_a_clear_error():
    root = package_dir("idlm")
    assert root is not None and (root / "cli.py").is_file()
    assert package_file("idlm", "data/heldout_prompts.jsonl", "pip install idlm").is_file()
    assert package_dir("no_such_package_xyz") is None
    with pytest.raises(PackageFileError, match="pip install --no-deps nothing==1"):
        package_file("no_such_package_xyz", "data.jsonl", "pip install --no-deps nothing==1")
    with pytest.raises(PackageFileError, match="not installed"):
        package_file("idlm", "data/missing.jsonl", "x")
