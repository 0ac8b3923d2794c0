"""Start `idlm serve` as users do (a subprocess on 127.0.0.1 at a free port) and read its /metrics."""
from __future__ import annotations

import re
import time
import urllib.request
from pathlib import Path

import pytest

from idlm.bench.serve import ServerProcess
from test_loading import save_tiny, tiny_tokenizer  # noqa: F401 (fixture)
from test_lora import random_gated_adapter


class Server(ServerProcess):
    """A running `idlm serve` (started as users start it) with readers of its /metrics and memory.

    Eager steps unless `compile=True` (serve's default): compiling costs a server start-up tens of seconds on a
    cold cache, and tests/test_compile.py covers the compiled forward."""

    def __init__(self, *args: str, compile: bool = False, **kw):
        super().__init__(*args, *([] if compile else ["--no-compile"]), **kw)

    def metrics(self) -> dict[str, float]:
        """Unlabelled samples and labelled ones as name{labels} -> value."""
        text = urllib.request.urlopen(f"{self.url}/metrics", timeout=30).read().decode()
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                out[name] = float(value)
        return out

    def wait_for(self, predicate, timeout: float = 30.0) -> dict[str, float]:
        """Poll /metrics until predicate(metrics) holds; returns the last reading."""
        end = time.monotonic() + timeout
        while True:
            m = self.metrics()
            if predicate(m) or time.monotonic() > end:
                return m
            time.sleep(0.05)

    def rss_mb(self) -> float:
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        return int(re.search(r"VmRSS:\s+(\d+)", status).group(1)) / 1024


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, tiny_tokenizer):  # noqa: F811
    """(model dir, gated adapter dir): a tiny random model with a byte-level BPE tokenizer, for fast servers."""
    root = tmp_path_factory.mktemp("serve-model")
    save_tiny(root / "model", tiny_tokenizer)
    return root / "model", random_gated_adapter(root / "model", root / "adapter")
