"""DDP and FSDP: 2 gloo processes on CPU give the loss curve of 1 process with the same global batch, and an
FSDP run interrupted by SIGTERM resumes to the same curve and the same exported weights."""
from __future__ import annotations

import json
import os
import signal
import socket
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from idlm.training.toy import counting_records
from training_helpers import TINY_MODEL, one_thread, read_metrics, tiny_config, write_jsonl

STEPS = 4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, cfg_dict: dict, helpers_dir: str, resume: bool, stop_at: int) -> None:
    sys.path.insert(0, helpers_dir)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from idlm.training.config import config_from_dict
    from idlm.training.trainer import train

    def on_step(step: int, rec: dict) -> None:
        if step == stop_at and rank == 0:  # one rank's signal stops every rank at the same step
            os.kill(os.getpid(), signal.SIGTERM)

    train(config_from_dict(cfg_dict), resume=resume, on_step=on_step)


def _run_two(cfg, resume: bool = False, stop_at: int = 0) -> None:
    d = cfg.to_dict()
    d.pop("source_path", None)
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, 2, port, d, str(Path(__file__).parent), resume, stop_at))
             for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=240)
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]


def _same_curve(a: list[dict], b: list[dict]) -> None:
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, STEPS + 1))
    for ra, rb in zip(a, b):
        assert abs(ra["loss"] - rb["loss"]) < 1e-5, (ra, rb)
        assert abs(ra["grad_norm"] - rb["grad_norm"]) < 1e-4 * max(1.0, ra["grad_norm"]), (ra, rb)
    assert a[-1]["tokens"] == b[-1]["tokens"]


def _evals(run: Path) -> list[dict]:
    recs = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines() if "eval" in l]
    return [{k: r["eval"][k] for k in ("step", "tokens_per_forward", "acceptance_by_position", "generated_tokens")}
            for r in recs]


def _one_process(tmp_path: Path, extra: dict) -> Path:
    (tmp_path / "one").mkdir()
    with one_thread():
        from idlm.training.trainer import train

        train(tiny_config(tmp_path / "one", micro_batch_size=4, grad_accum=1, **extra))
    return tmp_path / "one" / "run"


@pytest.mark.parametrize("parallel,mode,mask_in_vocab", [
    ("ddp", "gated_lora", False), ("fsdp", "gated_lora", False), ("fsdp", "full", False),
    ("fsdp", "lora", True),  # MASK is a vocabulary row: only that row of the sharded embedding trains
])
def test_two_processes_match_one_process(tmp_path, parallel, mode, mask_in_vocab):
    prompts = write_jsonl(tmp_path / "heldout.jsonl",
                          [{"prompt_ids": r["prompt_ids"]} for r in counting_records(4, seed=123)])
    held_out = {"every": 2, "at_end": True, "prompts": str(prompts), "num_prompts": 4, "max_tokens": 12}
    extra = {"mode": mode, "max_steps": STEPS, "lora": {"r": 4, "alpha": 8}, "save_dtype": "float32",
             "eval": held_out}
    if mask_in_vocab:
        extra["model_config"] = dict(TINY_MODEL, mask_token_id=45)
    one = _one_process(tmp_path, extra)
    (tmp_path / "two").mkdir()
    # 2 procs x 1 x 2 accum = 4
    _run_two(tiny_config(tmp_path / "two", micro_batch_size=1, grad_accum=2, parallel=parallel, **extra))
    two = tmp_path / "two" / "run"
    _same_curve(read_metrics(one), read_metrics(two))
    summary = json.loads((two / "train_summary.json").read_text())
    assert summary["steps"] == STEPS
    # held-out ISD evaluation ran (under FSDP on both ranks: sharded forwards) and saw the same model
    evals = [_evals(run) for run in (one, two)]
    assert [e["step"] for e in evals[1]] == [2, 4] and evals[0] == evals[1]
    name = "adapter/adapter_model.safetensors" if mode != "full" else "model/model.safetensors"
    a, b = load_file(one / name), load_file(two / name)  # rank 0 wrote whole (gathered) tensors
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
    if mask_in_vocab:
        assert "idlm.mask_embedding" in b


def test_fsdp_interrupted_run_resumes_exactly(tmp_path):
    extra = {"mode": "gated_lora", "max_steps": STEPS, "lora": {"r": 4, "alpha": 8}, "save_dtype": "float32"}
    one = _one_process(tmp_path, extra)
    (tmp_path / "two").mkdir()
    cfg = tiny_config(tmp_path / "two", micro_batch_size=1, grad_accum=2, parallel="fsdp", **extra)
    _run_two(cfg, stop_at=2)
    run = tmp_path / "two" / "run"
    assert (run / "checkpoints" / "latest").read_text() == "step-0000002"
    assert torch.load(run / "checkpoints" / "step-0000002" / "state.pt", weights_only=False)["parallel"] == "fsdp"
    assert not (run / "adapter").exists()
    _run_two(cfg, resume=True)
    _same_curve(read_metrics(one), read_metrics(run))
    a, b = load_file(one / "adapter/adapter_model.safetensors"), load_file(run / "adapter/adapter_model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
