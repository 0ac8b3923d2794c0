"""End to end: a random-init model trained with the all-masked objective on a counting language goes from
~1 token per forward to >= 2.5 at stride 4 under greedy ISD through the engine (CPU, well under 2 minutes)."""
from __future__ import annotations

import time

import torch

from idlm.eval.acceptance import evaluate_isd, load_eval_prompts
from idlm.training.trainer import Trainer, prepare_model, random_model, train  # noqa: E402
from training_helpers import TINY_MODEL, counting_records, one_thread, tiny_config, write_jsonl  # noqa: E402


def test_counting_language_reaches_tpf_2_5_at_stride_4(tmp_path):
    with one_thread():
        _run(tmp_path)


def _run(tmp_path):
    t0 = time.perf_counter()
    prompts = write_jsonl(tmp_path / "heldout.jsonl",
                          [{"prompt_ids": r["prompt_ids"]} for r in counting_records(8, seed=123)])
    write_jsonl(tmp_path / "train.jsonl", counting_records(1000, seed=0, resp_len=(12, 28)))
    cfg = tiny_config(
        tmp_path, mode="full", micro_batch_size=16, max_steps=80, lr=3e-3, warmup_steps=10, alpha=1.0,
        eval={"at_start": True, "at_end": True, "prompts": str(prompts), "num_prompts": 8, "max_tokens": 32},
    )
    cfg.data.train = [str(tmp_path / "train.jsonl")]

    # before training: the same random init (same seeds as the trainer uses)
    model = random_model(TINY_MODEL, cfg.seed)
    prepare_model(model, cfg)
    ids = load_eval_prompts(str(prompts), None, 8)
    before = evaluate_isd(model, None, [TINY_MODEL["eos_token_id"]], ids, stride=4, max_tokens=32, lora="none")
    assert before["tokens_per_forward"] < 1.6, before

    summary = train(cfg)
    start = summary["evals"][0]  # eval.at_start: the trainer's own figures before its first update
    assert start["step"] == 0 and {k: start[k] for k in ("tokens_per_forward", "acceptance_by_position")} == \
        {k: before[k] for k in ("tokens_per_forward", "acceptance_by_position")}
    after = summary["final_eval"]
    assert after["stride"] == 4
    assert after["tokens_per_forward"] >= 2.5, (before, after)
    assert min(after["acceptance_by_position"]) > 0.5, after
    assert time.perf_counter() - t0 < 120


def test_bf16_on_a_cpu_without_native_bf16_products_warns(tmp_path, monkeypatch, caplog):
    for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"):
        monkeypatch.setattr(torch.cpu, name, lambda: False, raising=False)
    with caplog.at_level("WARNING", logger="idlm.train"):
        Trainer(tiny_config(tmp_path, precision="bf16"))._setup()
    assert "without native bf16 products" in caplog.text
    caplog.clear()
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True, raising=False)
    with caplog.at_level("WARNING", logger="idlm.train"):
        Trainer(tiny_config(tmp_path, precision="bf16"))._setup()
        Trainer(tiny_config(tmp_path, precision="fp32"))._setup()
    assert "bf16" not in caplog.text
