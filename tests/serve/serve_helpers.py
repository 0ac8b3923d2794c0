"""Start `idlm serve` as users do (a subprocess on 127.0.0.1 at a free port) and read its /metrics."""
from __future__ import annotations

import re
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from idlm.bench.serve import ServerProcess
from idlm.loading import load_checkpoint
from idlm.models.lora import AdapterConfig, add_lora, save_adapter
from test_loading import save_tiny, tiny_tokenizer  # noqa: F401 (fixture)


class Server(ServerProcess):
    """A running `idlm serve` (started as users start it) with readers of its /metrics and memory."""

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


def random_gated_adapter(model_dir: Path, path: Path, r: int = 4) -> Path:
    """A gated adapter with random nonzero A and B for the model in model_dir (drafts garbage, output unchanged)."""
    model = load_checkpoint(str(model_dir), torch.float32, "cpu").model
    cfg = AdapterConfig(r=r, lora_alpha=2 * r, gated=True, draft_len=3, trained_stride=4)
    torch.manual_seed(0)
    for mod in add_lora(model, cfg):
        torch.nn.init.normal_(mod.lora_B, std=0.05)
    save_adapter(model, cfg, path)
    return path


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, tiny_tokenizer):  # noqa: F811
    """(model dir, gated adapter dir): a tiny random model with a byte-level BPE tokenizer, for fast servers."""
    root = tmp_path_factory.mktemp("serve-model")
    save_tiny(root / "model", tiny_tokenizer)
    return root / "model", random_gated_adapter(root / "model", root / "adapter")
