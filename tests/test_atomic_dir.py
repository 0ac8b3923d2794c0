"""Atomic directory publishing: all or nothing, replace or keep, no leftovers."""
from __future__ import annotations

import pytest

from idlm.atomic_dir import publish_dir


def test_publish_replaces_or_keeps_and_a_failed_build_leaves_nothing(tmp_path):
    dest = tmp_path / "d"
    publish_dir(dest, lambda t: (t / "a").write_text("1"))
    publish_dir(dest, lambda t: (t / "b").write_text("2"))  # replaced whole
    assert sorted(p.name for p in dest.iterdir()) == ["b"]
    publish_dir(dest, lambda t: (t / "c").write_text("3"), replace=False)  # kept: published first
    assert sorted(p.name for p in dest.iterdir()) == ["b"]

    def fail(t):
        (t / "half").write_text("x")
        raise RuntimeError("build failed")

    with pytest.raises(RuntimeError):
        publish_dir(tmp_path / "e", fail)
    assert not (tmp_path / "e").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]  # no staging or old directories left
