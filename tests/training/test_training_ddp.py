"""DDP: 2 gloo processes on CPU give the loss curve of 1 process with the same global batch."""
from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from training_helpers import one_thread, read_metrics, tiny_config

STEPS = 4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, cfg_dict: dict, helpers_dir: str) -> None:
    sys.path.insert(0, helpers_dir)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from idlm.training.config import config_from_dict
    from idlm.training.trainer import train

    train(config_from_dict(cfg_dict))


def _as_dict(cfg) -> dict:
    d = cfg.to_dict()
    d.pop("source_path", None)
    return d


@pytest.mark.parametrize("mode", ["gated_lora"])
def test_ddp_two_processes_match_one_process(tmp_path, mode):
    extra = {"mode": mode, "max_steps": STEPS, "lora": {"r": 4, "alpha": 8}, "save_dtype": "float32"}
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    one = tiny_config(tmp_path / "one", micro_batch_size=4, grad_accum=1, **extra)
    two = tiny_config(tmp_path / "two", micro_batch_size=1, grad_accum=2, **extra)  # 2 procs x 1 x 2 accum = 4

    from idlm.training.trainer import train

    with one_thread():
        train(one)
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, 2, port, _as_dict(two), str(Path(__file__).parent)))
             for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=240)
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]

    a, b = read_metrics(tmp_path / "one" / "run"), read_metrics(tmp_path / "two" / "run")
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, STEPS + 1))
    for ra, rb in zip(a, b):
        assert abs(ra["loss"] - rb["loss"]) < 1e-5, (ra, rb)
        assert abs(ra["grad_norm"] - rb["grad_norm"]) < 1e-4 * max(1.0, ra["grad_norm"]), (ra, rb)
    assert a[-1]["tokens"] == b[-1]["tokens"]
    summary = json.loads((tmp_path / "two" / "run" / "train_summary.json").read_text())
    assert summary["steps"] == STEPS
