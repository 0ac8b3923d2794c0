"""Training data: chat / instruction JSONL (plain or gzipped) -> ids with the response marked; data order; config."""
from __future__ import annotations

import argparse
import json

import pytest
import torch

from idlm.training.commands import register
from idlm.training.config import ConfigError, load_config
from idlm.training.data import DataError, SampleOrder, load_examples, step_indices
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


def test_sample_order_grouped_by_length_pads_less_and_stays_a_pure_permutation():
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(10, 500, (103,), generator=g).tolist()
    plain = SampleOrder(103, seed=5)
    grouped, again = (SampleOrder(103, seed=5, sizes=lengths, group=24, chunk=4) for _ in range(2))
    seq = [grouped[i] for i in range(206)]
    assert [again[i] for i in reversed(range(206))] == list(reversed(seq))  # random access (resume), same answers
    assert sorted(seq[:103]) == list(range(103)) and sorted(seq[103:]) == list(range(103))
    assert seq[:103] != seq[103:]

    def padded(order):  # tokens of micro-batches of 4, each padded to its longest
        ids = [order[i] for i in range(100)]
        return sum(4 * max(lengths[j] for j in ids[c:c + 4]) for c in range(0, 100, 4))

    assert padded(grouped) < 0.8 * padded(plain)
    ascending = []
    for w in range(0, 96, 24):  # a window holds the plain order's samples, in runs sorted by length, shuffled
        window = seq[w:w + 24]
        assert sorted(window) == sorted(plain[i] for i in range(w, w + 24))
        runs = [sorted(lengths[j] for j in window[c:c + 4]) for c in range(0, 24, 4)]
        assert [x for run in sorted(runs) for x in run] == sorted(lengths[j] for j in window)
        ascending.append(runs == sorted(runs))
    assert not all(ascending)
    with pytest.raises(ValueError, match="whole micro-batches"):
        SampleOrder(103, seed=5, sizes=lengths, group=10, chunk=4)


def test_config_rejects_unknown_keys_and_resolves_paths(tmp_path):
    (tmp_path / "d.jsonl").write_text("")
    cfgf = tmp_path / "c.yaml"
    cfgf.write_text("model: random\nmodel_config: {a: 1}\ndata: {train: d.jsonl}\nmax_steps: 3\n")
    cfg = load_config(cfgf, {"lora.r": 8})
    assert cfg.data.train == [str(tmp_path / "d.jsonl")] and cfg.lora.r == 8 and cfg.stride == 4
    cfgf.write_text("model: random\nmodel_config: {a: 1}\ndata: {train: d.jsonl}\nlearning_rate: 1\n")
    with pytest.raises(ConfigError, match="unknown key.*learning_rate"):
        load_config(cfgf)
    cfgf.write_text("model: random\nmodel_config: {a: 1}\ndata: {train: d.jsonl}\nmax_steps: 3\nmicro_batch_size: 4\n")
    assert load_config(cfgf, {"data.group_by_length": 64}).data.group_by_length == 64
    with pytest.raises(ConfigError, match="group_by_length"):
        load_config(cfgf, {"data.group_by_length": 6})


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


def test_gzipped_jsonl_reads_like_plain(tmp_path):
    import gzip

    rec = {"prompt_ids": [1, 2, 3], "response_ids": [4, 5]}
    with gzip.open(tmp_path / "d.jsonl.gz", "wt") as f:
        f.write(json.dumps(rec) + "\n")
    (ex,) = load_examples(tmp_path / "d.jsonl.gz", None, [], max_len=64)
    assert (ex.ids, ex.prompt_len) == ([1, 2, 3, 4, 5], 3)
