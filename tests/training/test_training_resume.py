"""Checkpoint / resume: N steps straight == N/2 steps, SIGTERM (checkpoint), resume, N/2 steps."""
from __future__ import annotations

import os
import signal

import pytest
import torch
from safetensors.torch import load_file

from idlm.training.trainer import Trainer, train
from training_helpers import one_thread, read_metrics, tiny_config

N = 6


@pytest.mark.parametrize("mode", ["gated_lora", "full"])
def test_resume_after_sigterm_continues_exactly(tmp_path, mode):
    with one_thread():
        _run(tmp_path, mode)


def _run(tmp_path, mode):
    extra = {"mode": mode, "grad_accum": 2, "micro_batch_size": 2, "max_steps": N, "lora": {"r": 4, "alpha": 8},
             "save_dtype": "float32"}
    (tmp_path / "a").mkdir()
    out_a = train(tiny_config(tmp_path / "a", **extra))
    assert out_a["steps"] == N and not out_a["interrupted"]

    (tmp_path / "b").mkdir()
    cfg_b = tiny_config(tmp_path / "b", **extra)

    def kill_at_half(step, rec):
        if step == N // 2:
            os.kill(os.getpid(), signal.SIGTERM)  # the handler only sets a flag; the step finishes

    first = Trainer(cfg_b, on_step=kill_at_half).train()
    assert first["interrupted"] and first["steps"] == N // 2
    ckpts = list((tmp_path / "b" / "run" / "checkpoints").iterdir())
    assert not [p for p in ckpts if p.name.startswith(".tmp")]  # nothing half-written left behind
    assert not (tmp_path / "b" / "run" / "adapter").exists() and not (tmp_path / "b" / "run" / "model").exists()

    second = Trainer(cfg_b, resume=True).train()
    assert second["steps"] == N and not second["interrupted"]

    la, lb = read_metrics(tmp_path / "a" / "run"), read_metrics(tmp_path / "b" / "run")
    assert [r["step"] for r in la] == [r["step"] for r in lb] == list(range(1, N + 1))
    for ra, rb in zip(la, lb):
        assert abs(ra["loss"] - rb["loss"]) < 1e-6, (ra, rb)
        assert abs(ra["lr"] - rb["lr"]) < 1e-12
    # the final weights match too
    name = "adapter/adapter_model.safetensors" if mode != "full" else "model/model.safetensors"
    wa, wb = load_file(tmp_path / "a" / "run" / name), load_file(tmp_path / "b" / "run" / name)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-5, atol=1e-6)


def test_resume_without_checkpoint_is_a_clear_error(tmp_path):
    cfg = tiny_config(tmp_path)
    with pytest.raises(ValueError, match="no checkpoint"):
        Trainer(cfg, resume=True).train()
